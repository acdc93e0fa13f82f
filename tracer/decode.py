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
OPEN_FLAGS = tuple(_O_FLAGS)  # what open_flags names, in order (tracer._fastpath's copy)


def signal_names() -> dict[int, str]:
    """The names the `signo` format shows, by number (any other number is shown as is)."""
    out = {}
    for n in range(65):
        try:
            out[n] = signal.Signals(n).name
        except ValueError:
            pass
    return out


def signed(value: int, bits: int = 64) -> int:
    """Reinterpret an unsigned register value as signed."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def quote(data: bytes, limit: int = STRING_LIMIT) -> str:
    """A C-style quoted string, truncated with ... as strace does."""
    out = []
    shown = data[:limit]
    for i, b in enumerate(shown):
        c = chr(b)
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif 32 <= b < 127:
            out.append(c)
        elif i + 1 < len(shown) and 48 <= shown[i + 1] <= 57:
            out.append(f"\\{b:03o}")  # a digit follows: \0012 is not \12
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


# Calls whose result is an address: shown in hex, every other result in decimal.
POINTER_RESULTS = frozenset({"mmap", "mremap", "brk", "shmat"})


def result(rval: int, pointer: bool = False) -> str:
    """`= 3` or `= -1 ENOENT (No such file or directory)`; addresses in hex."""
    if -4096 < rval < 0:
        err = -rval
        name = errno.errorcode.get(err, f"E{err}")
        if err == 512:
            return "? ERESTARTSYS (To be restarted if SA_RESTART is set)"
        if err in (513, 514, 516):
            return f"? ERESTART ({err})"
        return f"-1 {name} ({os.strerror(err)})"
    if pointer:
        return hex(rval & 0xFFFFFFFFFFFFFFFF)
    return str(rval)


Decoder = Callable[[int, int, int, int], str]  # (pid, value, size, rval) -> text
# Argument formats whose text is read from the tracee's memory: at the call's
# entry, or (`buf_out`) at its exit, while the tracee is stopped.
MEMORY_FORMATS = frozenset({"path", "target", "str", "buf_in", "buf_out", "argv", "envp"})


class Formatter:
    """Renders one syscall as an strace-like line, reading the tracee through callables.

    Each syscall gets a decoding plan once (one decoder per argument), so the
    per-call work is a loop over prepared functions: --trace runs it twice a
    syscall on the tracer's hot path.
    """

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
        self._decoders: dict[str, Decoder] = {
            "path": self._string, "target": self._string, "str": self._string,
            "fd": self._fd, "dirfd": self._dirfd, "buf_in": self._buf_in,
            "buf_out": self._buf_out, "argv": self._argv, "envp": self._envp,
            "oflags": lambda p, v, s, r: open_flags(v), "prot": self._prot,
            "mode": lambda p, v, s, r: f"0{v & 0o7777:o}", "signo": self._signo,
            "int": lambda p, v, s, r: str(signed(v, 32)),
            "pid": lambda p, v, s, r: str(signed(v, 32)),
            "size": lambda p, v, s, r: str(v), "ptr": lambda p, v, s, r: hex(v) if v else "NULL",
            "sockaddr": lambda p, v, s, r: hex(v) if v else "NULL",
            "sockaddr_out": lambda p, v, s, r: hex(v) if v else "NULL",
        }  # fmt: skip
        self._plans: dict[int, tuple[tuple[Decoder, int, int], ...]] = {}
        self._oflags: dict[int, int] = {}

    def _plan(self, spec: SyscallSpec) -> tuple[tuple[Decoder, int, int], ...]:
        plan = self._plans.get(spec.nr)
        if plan is None:
            fmts = spec.args
            plan = tuple(
                (self._decoders.get(fmt, _other), i, i + 1 if i + 1 < len(fmts) else -1)
                for i, fmt in enumerate(fmts)
            )
            self._plans[spec.nr] = plan
            if "oflags" in fmts:
                self._oflags[spec.nr] = fmts.index("oflags")
        return plan

    def line(self, pid: int, nr: int, args: tuple[int, ...], rval: int) -> str:
        """`PID name(args) = result` (buffers of output arguments are read now)."""
        spec = self.table.get(nr)
        if spec is None:
            shown = ", ".join(hex(a) for a in args)
            return f"{pid} syscall_{nr}({shown}) = {result(rval)}"
        shown = self.arguments(pid, spec, args, rval)
        return f"{pid} {spec.name}({shown}) = {result(rval, spec.name in POINTER_RESULTS)}"

    def arguments(self, pid: int, spec: SyscallSpec, args: tuple[int, ...], rval: int) -> str:
        """The decoded argument list."""
        plan = self._plan(spec)
        flags_at = self._oflags.get(spec.nr)
        if flags_at is not None and not args[flags_at] & (os.O_CREAT | 0o20000000):
            plan = plan[: flags_at + 1]  # the mode only matters when creating
        return ", ".join(dec(pid, args[i], args[j] if j >= 0 else 0, rval) for dec, i, j in plan)

    def argument(self, pid: int, fmt: str, value: int, size: int, rval: int) -> str:
        """One decoded argument."""
        return self._decoders.get(fmt, _other)(pid, value, size, rval)

    def _string(self, pid: int, value: int, size: int, rval: int) -> str:
        if not value:
            return "NULL"
        s = self._str(pid, value)
        return quote(s, 4096) if s is not None else hex(value)

    @staticmethod
    def _fd(pid: int, value: int, size: int, rval: int) -> str:
        return str(signed(value, 32))

    @staticmethod
    def _dirfd(pid: int, value: int, size: int, rval: int) -> str:
        v = signed(value, 32)
        return "AT_FDCWD" if v == AT_FDCWD else str(v)

    def _buf_in(self, pid: int, value: int, size: int, rval: int) -> str:
        return quote(self._mem(pid, value, min(size, STRING_LIMIT + 1)))

    def _buf_out(self, pid: int, value: int, size: int, rval: int) -> str:
        if rval < 0 or not value:
            return hex(value)
        return quote(self._mem(pid, value, min(rval, STRING_LIMIT + 1)))

    def _argv(self, pid: int, value: int, size: int, rval: int) -> str:
        arr = self._arr(pid, value) if value else None
        if arr is None:
            return "NULL" if not value else hex(value)
        shown = ", ".join(quote(a) for a in arr[:ARRAY_LIMIT])
        return "[" + shown + (", ..." if len(arr) > ARRAY_LIMIT else "") + "]"

    def _envp(self, pid: int, value: int, size: int, rval: int) -> str:
        arr = self._arr(pid, value) if value else None
        if arr is None:
            return "NULL" if not value else hex(value)
        return f"{hex(value)} /* {len(arr)} vars */"

    @staticmethod
    def _prot(pid: int, value: int, size: int, rval: int) -> str:
        return flags(value & 0xFFFFFFFF, _PROT) if value else "PROT_NONE"

    @staticmethod
    def _signo(pid: int, value: int, size: int, rval: int) -> str:
        try:
            return signal.Signals(value).name
        except ValueError:
            return str(value)


def _other(pid: int, value: int, size: int, rval: int) -> str:
    return hex(value) if value > 0xFFFF else str(value)
