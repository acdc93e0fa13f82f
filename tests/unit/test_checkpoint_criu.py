"""vmagent.checkpoint.criu: finding CRIU, reading `criu check`, command lines (pure parts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmagent.checkpoint import criu as C


def test_dcp_criu_wins_and_a_missing_one_is_none(tmp_path: Path) -> None:
    exe = tmp_path / "criu"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert C.find_criu({"DCP_CRIU": str(exe), "PATH": ""}) == str(exe)
    assert C.find_criu({"DCP_CRIU": str(tmp_path / "nope"), "PATH": str(tmp_path)}) is None


def test_path_is_searched_when_the_prefix_has_none(tmp_path: Path) -> None:
    exe = tmp_path / "criu"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    found = C.find_criu({"PATH": str(tmp_path)})
    built = os.path.join(C.DEFAULT_PREFIX, "sbin", "criu")
    assert found == (built if os.access(built, os.X_OK) else str(exe))


def test_no_criu_is_one_line_naming_the_cure() -> None:
    with pytest.raises(C.CriuUnavailable) as info:
        C.check(None) if C.find_criu() is None else C.check("/nonexistent/criu")
    text = str(info.value)
    assert text.startswith("checkpoint unavailable: ") and "\n" not in text


def test_a_failed_check_names_criu_s_first_error_not_the_harmless_one() -> None:
    said = (
        "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self\n"
        "Error (criu/kerndat.c:1): vdso area bounds\nfoo\n"
    )
    got = C.verdict("/x/criu", 1, said, "")
    assert isinstance(got, C.CriuUnavailable)
    assert str(got) == "checkpoint unavailable: /x/criu check failed: " + (
        "Error (criu/kerndat.c:1): vdso area bounds"
    )


def test_looks_good_is_a_working_criu_with_its_version() -> None:
    got = C.verdict("/x/criu", 0, "Looks good.\n", "Version: 4.2.1\n")
    assert got == C.Criu("/x/criu", "4.2.1")
    assert isinstance(C.verdict("/x/criu", 0, "Looks bad.\n", ""), C.CriuUnavailable)


def test_command_lines_keep_the_tree_stopped_and_hand_back_the_pipes() -> None:
    dump = C.dump_argv("/c", 42, "/img")
    assert dump[:4] == ["/c", "dump", "-t", "42"] and "--leave-stopped" in dump
    assert "--tcp-established" in dump
    restore = C.restore_argv("/c", "/img", [(7, "pipe:[99]")], tcp=False)
    assert {"-d", "--leave-stopped", "--restore-sibling"} <= set(restore)
    assert restore[-2:] == ["--inherit-fd", "fd[7]:pipe:[99]"]
    assert "--tcp-established" not in restore
