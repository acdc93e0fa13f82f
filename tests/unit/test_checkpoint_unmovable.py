"""What cannot be checkpointed is named before anything is frozen (vmagent.checkpoint.local)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from vmagent.checkpoint.local import resident_bytes, tree_of, unmovable

HOLD = "import os, sys; fds = [os.open(p, os.O_RDONLY) for p in sys.argv[1:]]; print(1, flush=True); sys.stdin.read()"  # noqa: E501


def holding(*paths: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, *paths], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert p.stdout is not None and p.stdout.readline() == b"1\n"
    return p


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def test_null_zero_and_random_move_a_device_does_not(procs: list[subprocess.Popen[bytes]]) -> None:
    plain = holding("/dev/null", "/dev/zero", "/dev/urandom")
    procs.append(plain)
    assert unmovable([plain.pid]) is None
    device = next(
        (d for d in ("/dev/fuse", "/dev/net/tun", "/dev/kmsg") if os.access(d, os.R_OK)), None
    )
    if device is None:
        pytest.skip("no readable /dev/fuse, /dev/net/tun or /dev/kmsg here")
    held = holding("/dev/null", device)
    procs.append(held)
    said = unmovable([held.pid])
    assert said == f"pid {held.pid} holds the device {device}: it cannot be checkpointed yet"


def test_the_tree_is_the_root_first_then_its_children(procs: list[subprocess.Popen[bytes]]) -> None:
    p = holding("/dev/null")
    procs.append(p)
    assert tree_of(os.getpid())[0] == os.getpid() and p.pid in tree_of(os.getpid())
    assert tree_of(p.pid) == [p.pid]
    assert resident_bytes([p.pid]) > 1 << 20  # an interpreter's pages at least
