"""What stays home: files the kernel would refuse, processes holding sockets."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from vmagent.cluster.coordinator import elf_interpreter, holds_socket, is_placeable_file


def script(where: Path, name: str, first_line: str) -> bytes:
    path = where / name
    path.write_text(f"{first_line}\necho hi\n")
    path.chmod(0o755)
    return os.fsencode(path)


def test_a_script_is_placeable_only_when_its_interpreter_would_run(tmp_path: Path) -> None:
    good = script(tmp_path, "good", "#!/bin/sh -e")
    bad = script(tmp_path, "bad", "#!/nonexistent/sh")
    assert is_placeable_file(good)
    assert not is_placeable_file(bad)
    assert is_placeable_file(script(tmp_path, "chain", f"#!{good.decode()}"))
    assert not is_placeable_file(script(tmp_path, "badchain", f"#!{bad.decode()}"))
    assert not is_placeable_file(script(tmp_path, "empty", "#!"))
    directory = script(tmp_path, "dir", f"#!{tmp_path}")
    assert not is_placeable_file(directory)


def test_elf_loader_is_read_from_pt_interp() -> None:
    ls = shutil.which("ls")
    assert ls is not None
    with open(ls, "rb") as f:
        head = f.read(256)
        loader = elf_interpreter(f, head)
    if loader is None:
        pytest.skip(f"{ls} is static: it has no PT_INTERP to read")
    assert loader.startswith(b"/") and os.path.exists(loader)
    assert is_placeable_file(os.fsencode(ls))


def test_holds_socket_sees_inheritable_sockets_beyond_stdio() -> None:
    a, b = socket.socketpair()
    try:
        assert not holds_socket(os.getpid())  # socket() is close-on-exec by default
        a.set_inheritable(True)
        assert holds_socket(os.getpid())
    finally:
        a.close()
        b.close()
