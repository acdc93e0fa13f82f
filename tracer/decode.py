"""strace-like rendering of syscalls: decoded arguments, results and errno names."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable

from tracer.syscalls import SyscallSpec, SyscallTable

AT_FDCWD = -100
STRING_LIMIT = 32
ARRAY_LIMIT = 8

ReadString = Callable[[int, int], bytes | None]  # (pid, addr) -> bytes
ReadMemory = Callable[[int, int, int], bytes]  # (pid, addr, size) -> bytes
ReadArray = Callable[[int, int], tuple[bytes, ...] | None]

_O_ACCMODE = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR"}
_O_FLAGS = [
    (os.O_CREAT, "O_CREAT"), (os.O_EXCL, "O_EXCL"), (os.O_NOCTTY, "O_NOCTTY"),
    (os.O_TRUNC, "O_TRUNC"), (os.O_APPEND, "O_APPEND"), (os.O_NONBLOCK, "O_NONBLOCK"),
    (os.O_DSYNC, "O_DSYNC"), (0o40000, "O_DIRECT"), (os.O_DIRECTORY, "O_DIRECTORY"),
    (os.O_NOFOLLOW, "O_NOFOLLOW"), (os.O_NOATIME, "O_NOATIME"), (os.O_CLOEXEC, "O_CLOEXEC"),
    (0o10000000, "O_PATH"), (0o20000000, "O_TMPFILE"),
]  # fmt: skip
_PROT = [(1, "PROT_READ"), (2, "PROT_WRITE"), (4, "PROT_EXEC")]


def signed(value: int, bits: int = 64) -> int:
    """Reinterpret an unsigned register value as signed."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def quote(data: bytes, limit: int = STRING_LIMIT) -> str:
    """A C-style quoted string, truncated with ... as strace does."""
    out = []
    for b in data[:limit]:
        c = chr(b)
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append(f"\\{b:o}")
    return '"' + "".join(out) + '"' + ("..." if len(data) > limit else "")


def flags(value: int, table: list[tuple[int, str]], base: str = "") -> str:
    """OR-ed flag names, with any unknown bits in hex."""
    names = [base] if base else []
    for bit, name in table:
        if value & bit == bit and bit:
            names.append(name)
            value &= ~bit
    if value:
        names.append(hex(value))
    return "|".join(names) or "0"


def open_flags(value: int) -> str:
    """O_* flags of open/openat."""
    value &= 0xFFFFFFFF
    return flags(value & ~3, _O_FLAGS, _O_ACCMODE.get(value & 3, str(value & 3)))


def result(rval: int) -> str:
    """`= 3` or `= -1 ENOENT (No such file or directory)`."""
    if -4096 < rval < 0:
        err = -rval
        name = errno.errorcode.get(err, f"E{err}")
        if err == 512:
            return "? ERESTARTSYS (To be restarted if SA_RESTART is set)"
        if err in (513, 514, 516):
            return f"? ERESTART ({err})"
        return f"-1 {name} ({os.strerror(err)})"
    if rval > 0xFFFF:
        return hex(rval & 0xFFFFFFFFFFFFFFFF)
    return str(rval)


class Formatter:
    """Renders one syscall as an strace-like line, reading the tracee through callables."""

    def __init__(
        self,
        table: SyscallTable,
        read_string: ReadString,
        read_memory: ReadMemory,
        read_array: ReadArray,
    ) -> None:
        self.table = table
        self._str = read_string
        self._mem = read_memory
        self._arr = read_array

    def line(self, pid: int, nr: int, args: tuple[int, ...], rval: int) -> str:
        """`PID name(args) = result` (buffers of output arguments are read now)."""
        spec = self.table.get(nr)
        if spec is None:
            shown = ", ".join(hex(a) for a in args)
            return f"{pid} syscall_{nr}({shown}) = {result(rval)}"
        return f"{pid} {spec.name}({self.arguments(pid, spec, args, rval)}) = {result(rval)}"

    def arguments(self, pid: int, spec: SyscallSpec, args: tuple[int, ...], rval: int) -> str:
        """The decoded argument list."""
        out = []
        fmts = spec.args
        if "oflags" in fmts and not args[fmts.index("oflags")] & (os.O_CREAT | 0o20000000):
            fmts = fmts[: fmts.index("oflags") + 1]  # the mode only matters when creating
        for i, fmt in enumerate(fmts):
            value = args[i]
            size = args[i + 1] if i + 1 < len(fmts) else 0
            out.append(self.argument(pid, fmt, value, size, rval))
        return ", ".join(out)

    def argument(self, pid: int, fmt: str, value: int, size: int, rval: int) -> str:
        """One decoded argument."""
        if fmt in ("path", "target", "str"):
            s = self._str(pid, value) if value else None
            return "NULL" if not value else (quote(s, 4096) if s is not None else hex(value))
        if fmt in ("fd", "dirfd"):
            v = signed(value, 32)
            return "AT_FDCWD" if fmt == "dirfd" and v == AT_FDCWD else str(v)
        if fmt == "buf_in":
            return quote(self._mem(pid, value, min(size, STRING_LIMIT + 1)))
        if fmt == "buf_out":
            if rval < 0 or not value:
                return hex(value)
            return quote(self._mem(pid, value, min(rval, STRING_LIMIT + 1)))
        if fmt in ("argv", "envp"):
            arr = self._arr(pid, value) if value else None
            if arr is None:
                return "NULL" if not value else hex(value)
            if fmt == "envp":
                return f"{hex(value)} /* {len(arr)} vars */"
            shown = ", ".join(quote(a) for a in arr[:ARRAY_LIMIT])
            return "[" + shown + (", ..." if len(arr) > ARRAY_LIMIT else "") + "]"
        if fmt == "oflags":
            return open_flags(value)
        if fmt == "prot":
            return flags(value & 0xFFFFFFFF, _PROT) if value else "PROT_NONE"
        if fmt == "mode":
            return f"0{value & 0o7777:o}"
        if fmt == "signo":
            try:
                return signal.Signals(value).name
            except ValueError:
                return str(value)
        if fmt in ("int", "pid"):
            return str(signed(value, 32))
        if fmt == "size":
            return str(value)
        if fmt == "ptr":
            return hex(value) if value else "NULL"
        return hex(value) if value > 0xFFFF else str(value)
