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
    assert "--manage-cgroups=ignore" in restore  # the target's cgroups, not the source's
    assert restore[-2:] == ["--inherit-fd", "fd[7]:pipe:[99]"]
    assert "--tcp-established" not in restore


def test_pre_copy_command_lines_chain_each_round_to_the_one_before() -> None:
    first = C.predump_argv("/c", 42, "/b/pre0", None)
    assert first[:4] == ["/c", "pre-dump", "-t", "42"] and "--track-mem" in first
    assert "--prev-images-dir" not in first
    again = C.predump_argv("/c", 42, "/b/pre1", "../pre0")
    assert again[-2:] == ["--prev-images-dir", "../pre0"]
    final = C.dump_argv("/c", 42, "/b/final", parent="../pre1")
    assert final[-3:] == ["--track-mem", "--prev-images-dir", "../pre1"]
    assert "--leave-stopped" in final
    assert "--track-mem" not in C.dump_argv("/c", 42, "/b/final")
    held = C.predump_argv("/c", 42, "/b/pre0", None, freeze_cgroup="/sys/fs/cgroup/p")
    assert held[-2:] == ["--freeze-cgroup", "/sys/fs/cgroup/p"]  # not stopped: frozen


def test_pages_go_through_the_target_s_page_server_on_the_given_socket() -> None:
    final = C.dump_argv("/c", 42, "/b/final", parent="../pre0", ps_socket=9)
    assert final[-3:] == ["--page-server", "--ps-socket", "9"]
    assert "--prev-images-dir" in final and "--address" not in final
    rnd = C.predump_argv("/c", 42, "/b/pre1", "../pre0", freeze_cgroup="/g", ps_socket=8)
    assert rnd[-5:] == ["--freeze-cgroup", "/g", "--page-server", "--ps-socket", "8"]
    server = C.page_server_argv("/c", "/t/final", 5)
    assert server[:4] == ["/c", "page-server", "-D", "/t/final"]
    assert server[-2:] == ["--ps-socket", "5"] and "--port" not in server
    assert "--page-server" not in C.dump_argv("/c", 42, "/b/final")


def test_pre_copy_stops_when_the_dirty_set_stops_shrinking_or_is_small() -> None:
    mb = 1 << 20
    assert C.keep_copying([64 * mb])  # the first round copied everything: one more
    assert C.keep_copying([64 * mb, 20 * mb])  # shrank to under half: again
    assert not C.keep_copying([64 * mb, 40 * mb])  # shrinks too slowly: freeze now
    assert not C.keep_copying([64 * mb, 1 * mb])  # little left: the final dump takes it
    assert not C.keep_copying([2 * mb])  # a small tree: one round is enough
    rounds = [256 * mb, 100 * mb, 40 * mb, 16 * mb]
    assert len(rounds) == C.PRECOPY_ROUNDS and not C.keep_copying(rounds)  # at most a few
    assert not C.keep_copying([])
