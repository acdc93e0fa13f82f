"""Syscall catalog types: one `SyscallSpec` per syscall, kept as data per architecture.

Each entry names the syscall's argument formats (how the tracer decodes and
rewrites them), its category (what kind of resource it touches) and the OSS
service that serves it when a program runs on the cluster (`LOCAL` means the
instance's own kernel answers it, as the seed's "local resources" split).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import NamedTuple


class Category(enum.Enum):
    """What a syscall touches."""

    MEMORY = "memory"
    STORAGE = "storage"
    PROCESS = "process"
    SIGNAL = "signal"
    NETWORK = "network"
    IPC = "ipc"
    TIME = "time"
    OTHER = "other"


class Service(enum.Enum):
    """The OSS service that implements a syscall on the cluster."""

    COMPUTE = "compute"
    MEMORY = "memory"
    STORAGE = "storage"
    NETWORK = "network"
    IPC = "ipc"
    LOCAL = "local"


# Argument formats.  `path` is a NUL-terminated path the kernel resolves (relative
# to the nearest preceding `dirfd`, else the cwd); `target` is a symlink's
# stored content; `buf_in`/`buf_out` are byte buffers whose length is the next
# `size` argument (read at entry / at exit); `argv`/`envp` are string arrays.
# `sockaddr` is a socket address whose length is the next argument (an AF_UNIX
# one names a path); `sockaddr_out` one the call fills, its length at the
# pointer that is the next argument.
ARG_FORMATS = frozenset(
    {
        "int", "uint", "ulong", "ptr", "size", "fd", "dirfd", "path", "target", "str",
        "buf_in", "buf_out", "argv", "envp", "oflags", "mode", "prot", "signo", "pid",
        "sockaddr", "sockaddr_out",
    }
)  # fmt: skip


class SyscallSpec(NamedTuple):
    """One syscall of one architecture."""

    nr: int
    name: str
    args: tuple[str, ...]
    category: Category
    service: Service

    def path_args(self) -> tuple[tuple[int, int | None], ...]:
        """(path index, index of the dirfd it is relative to or None) for each path argument."""
        out = []
        dirfd: int | None = None
        for i, fmt in enumerate(self.args):
            if fmt == "dirfd":
                dirfd = i
            elif fmt == "path":
                out.append((i, dirfd))
                dirfd = None
        return tuple(out)

    def output_arg(self) -> int | None:
        """Index of the buffer the call fills (`buf_out`); its size is the next argument."""
        return self.args.index("buf_out") if "buf_out" in self.args else None


SyscallTable = Mapping[int, SyscallSpec]


def spec(nr: int, name: str, args: str, category: Category, service: Service) -> SyscallSpec:
    """Build one table entry from its one-line form."""
    return SyscallSpec(nr, name, tuple(args.split()), category, service)


def by_name(table: SyscallTable) -> dict[str, SyscallSpec]:
    """Index a table by syscall name."""
    return {s.name: s for s in table.values()}
