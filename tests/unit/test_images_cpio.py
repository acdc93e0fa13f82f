"""The newc writer the initramfs is made with."""

import stat

import pytest

from images.cpio import Entry, archive, read_names


def test_round_trip_names_and_alignment() -> None:
    data = archive(
        [
            Entry.directory("bin"),
            Entry.file("bin/busybox", b"\x7fELF" + b"x" * 13, 0o755),
            Entry.symlink("bin/sh", "busybox"),
            Entry.file("/init", b"#!/bin/busybox sh\n", 0o755),
        ]
    )
    assert read_names(data) == ["bin", "bin/busybox", "bin/sh", "init"]
    assert len(data) % 4 == 0
    assert data.startswith(b"070701")
    assert b"TRAILER!!!" in data


def test_modes_are_encoded() -> None:
    data = archive([Entry.file("x", b"abc", 0o640)])
    mode = int(data[14:22], 16)
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o640
    assert int(data[54:62], 16) == 3  # file size


def test_garbage_is_rejected() -> None:
    with pytest.raises(ValueError, match="magic"):
        read_names(b"x" * 200)
