"""The architecture -> syscall table registry.

`tracer.syscalls` holds the catalog's types only; each architecture's table
(`syscalls_x86_64.py`) builds on them, and this module picks one by name.  So
the types never import a table and no module imports itself in a loop.
"""

from __future__ import annotations

from tracer.syscalls import SyscallTable
from tracer.syscalls_x86_64 import SYSCALLS as X86_64

TABLES: dict[str, SyscallTable] = {"x86_64": X86_64}


def table_for(arch: str) -> SyscallTable:
    """The syscall table of an architecture (only x86_64 today)."""
    try:
        return TABLES[arch]
    except KeyError:
        raise ValueError(f"unsupported architecture: {arch}") from None
