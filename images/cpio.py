"""A minimal writer for the `newc` cpio format the kernel unpacks as initramfs (pure)."""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member: a directory, a regular file or a symlink."""

    name: str
    mode: int
    data: bytes = b""

    @staticmethod
    def directory(name: str, perm: int = 0o755) -> Entry:
        """A directory entry."""
        return Entry(name, stat.S_IFDIR | perm)

    @staticmethod
    def file(name: str, data: bytes, perm: int = 0o644) -> Entry:
        """A regular file entry."""
        return Entry(name, stat.S_IFREG | perm, data)

    @staticmethod
    def symlink(name: str, target: str) -> Entry:
        """A symbolic link entry (its data is the target)."""
        return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def _header(ino: int, entry: Entry, name: bytes) -> bytes:
    fields = [
        ino,
        entry.mode,
        0,
        0,
        1,
        0,
        len(entry.data),
        0,
        0,
        0,
        0,
        len(name) + 1,
        0,
    ]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def archive(entries: Iterable[Entry]) -> bytes:
    """The newc archive of `entries`, owned by root, with the trailer."""
    out = bytearray()
    members = list(entries) + [Entry(TRAILER, 0)]
    for ino, entry in enumerate(members, start=1):
        name = entry.name.lstrip("/").encode()
        head = _header(ino if entry.name != TRAILER else 0, entry, name) + name + b"\0"
        out += head + _pad(len(head))
        out += entry.data + _pad(len(entry.data))
    return bytes(out)


def read_names(data: bytes) -> list[str]:
    """The member names of a newc archive (for checks and tests)."""
    names: list[str] = []
    pos = 0
    while pos + 110 <= len(data):
        if data[pos : pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at offset {pos}")
        size = int(data[pos + 54 : pos + 62], 16)
        namesize = int(data[pos + 94 : pos + 102], 16)
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += (4 - pos % 4) % 4
        pos += size + (4 - size % 4) % 4
        if name == TRAILER:
            break
        names.append(name)
    return names
