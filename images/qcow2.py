"""Reading a qcow2 header (pure, no qemu-img needed)."""

from __future__ import annotations

import struct
from pathlib import Path

MAGIC = b"QFI\xfb"


class NotQcow2(ValueError):
    """The file is not a qcow2 image."""


def parse_virtual_size(header: bytes) -> int:
    """The virtual size in bytes from the first 32 bytes of a qcow2 file."""
    if len(header) < 32 or header[:4] != MAGIC:
        raise NotQcow2("not a qcow2 image (bad magic)")
    (size,) = struct.unpack(">Q", header[24:32])
    return int(size)


def virtual_size(path: Path) -> int:
    """The virtual size in bytes of the qcow2 image at `path`."""
    with path.open("rb") as f:
        return parse_virtual_size(f.read(32))
