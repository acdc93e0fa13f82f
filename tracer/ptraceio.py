"""Thin adapter over ptrace(2), process_vm_readv/writev(2) and /proc for x86_64.

Every request must come from the thread that seized the tracee (the tracer
thread).  Requests go straight to libc's ptrace(3) through ctypes (a generic
wrapper costs ~2.5 us a call, four calls a syscall); python-ptrace supplies the
register layout, imported on the first register request: its binding costs ~5 ms
(it imports `platform`, `re` and its own tables), which a plain run never pays.
Failures become `TracerError` subclasses, and a tracee that vanished
(ESRCH: killed under us) is a non-event, since waitpid reports its end.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
from typing import Protocol, cast

from tracer.errors import PtraceRequestError, TracerError

PTRACE_CONT = 7
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GET_SYSCALL_INFO = 0x420E

O_TRACESYSGOOD = 0x1
O_TRACEFORK = 0x2
O_TRACEVFORK = 0x4
O_TRACECLONE = 0x8
O_TRACEEXEC = 0x10
O_TRACEEXIT = 0x40
O_TRACESECCOMP = 0x80
O_EXITKILL = 0x100000
OPTIONS = (
    O_TRACESYSGOOD | O_TRACEFORK | O_TRACEVFORK | O_TRACECLONE | O_TRACEEXEC
    | O_TRACESECCOMP | O_EXITKILL
)  # fmt: skip

EVENT_FORK, EVENT_VFORK, EVENT_CLONE, EVENT_EXEC = 1, 2, 3, 4
EVENT_EXIT = 6
EVENT_SECCOMP = 7
EVENT_STOP = 128

SYSCALL_INFO_ENTRY, SYSCALL_INFO_EXIT, SYSCALL_INFO_SECCOMP = 1, 2, 3
AUDIT_ARCH_X86_64 = 0xC000003E

# The six syscall argument registers, in order (x86_64 syscall ABI).
ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
# The kernel never writes below the red zone of a thread stopped in a syscall;
# scratch strings for rewritten arguments go below it (as proot does).
RED_ZONE = 128

_libc = ctypes.CDLL(None, use_errno=True)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc.process_vm_readv.argtypes = [
    ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
    ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong,
]  # fmt: skip
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = _libc.process_vm_readv.argtypes
_libc.process_vm_writev.restype = ctypes.c_ssize_t

# Every request goes straight to libc (no generic wrapper: four calls a syscall).
_raw_ptrace = _libc.ptrace
_raw_ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong]
_raw_ptrace.restype = ctypes.c_long

_INFO = struct.Struct("<B3xIQQ")  # op, arch, instruction pointer, stack pointer
_SIX = struct.Struct("<Q6Q")
_EXIT = struct.Struct("<qB")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _user_regs() -> type[ctypes.Structure]:
    """x86_64 `struct user_regs_struct`, as python-ptrace declares it.

    Imported on the first register request, not at start-up: a plain run (no
    filter, nothing intercepted) never reads registers and so never pays the
    ~5 ms python-ptrace's binding costs to import.
    """
    from ptrace.binding.func import ptrace_registers_t

    return cast(type[ctypes.Structure], ptrace_registers_t)


def _request(command: int, pid: int, addr: int = 0, data: int = 0) -> int:
    """A request that returns 0 or -1 (SEIZE, GETREGS, SETREGS): errors raise."""
    result = _raw_ptrace(command, pid, addr, data)
    if result == -1:
        raise PtraceRequestError(pid=pid, request=command, errno=ctypes.get_errno())
    return int(result)


def seize(pid: int, options: int = OPTIONS) -> None:
    """Attach to `pid` without stopping it, with DCP's options (EXITKILL included).

    An instance tracer adds O_TRACEEXIT: each exiting thread stops once more,
    while /proc still shows its final I/O counters (tracer.runner meters it).
    """
    _request(PTRACE_SEIZE, pid, 0, options)


def resume(pid: int, request: int, sig: int = 0) -> None:
    """PTRACE_CONT / PTRACE_SYSCALL / PTRACE_LISTEN; a vanished tracee is ignored."""
    if _raw_ptrace(request, pid, 0, sig) == -1:
        err = ctypes.get_errno()
        if err != errno.ESRCH:
            raise PtraceRequestError(pid=pid, request=request, errno=err)


def interrupt(pid: int) -> None:
    """Ask a running tracee to enter a ptrace-stop (PTRACE_EVENT_STOP)."""
    resume(pid, PTRACE_INTERRUPT)


def detach(pid: int) -> None:
    """PTRACE_DETACH a stopped tracee (it runs on, untraced); a vanished one is ignored."""
    resume(pid, PTRACE_DETACH)


def event_message(pid: int) -> int:
    """PTRACE_GETEVENTMSG: the new pid of a fork event, the former tid of an exec."""
    out = ctypes.c_ulong(0)
    if _raw_ptrace(PTRACE_GETEVENTMSG, pid, 0, ctypes.addressof(out)) == -1:
        raise PtraceRequestError(pid=pid, request=PTRACE_GETEVENTMSG, errno=ctypes.get_errno())
    return out.value


class SyscallInfo:
    """A decoded `struct ptrace_syscall_info` (one request per stop)."""

    __slots__ = ("op", "arch", "sp", "nr", "args", "rval", "is_error")

    def __init__(self, buf: ctypes.Array[ctypes.c_char]) -> None:
        self.op, self.arch, _ip, self.sp = _INFO.unpack_from(buf, 0)
        self.nr = -1
        self.args: tuple[int, ...] = ()
        self.rval = 0
        self.is_error = False
        if self.op in (SYSCALL_INFO_ENTRY, SYSCALL_INFO_SECCOMP):
            nr, *args = _SIX.unpack_from(buf, _INFO.size)
            self.nr, self.args = nr, tuple(args)
        elif self.op == SYSCALL_INFO_EXIT:
            self.rval, is_error = _EXIT.unpack_from(buf, _INFO.size)
            self.is_error = bool(is_error)


_info_buf = ctypes.create_string_buffer(128)
_info_addr = ctypes.addressof(_info_buf)


def syscall_info(pid: int) -> SyscallInfo:
    """PTRACE_GET_SYSCALL_INFO for a tracee in a syscall or seccomp stop."""
    if _raw_ptrace(PTRACE_GET_SYSCALL_INFO, pid, 128, _info_addr) == -1:
        err = ctypes.get_errno()
        raise PtraceRequestError(pid=pid, request=PTRACE_GET_SYSCALL_INFO, errno=err)
    return SyscallInfo(_info_buf)  # parsed in place: no copy of the buffer


class Registers(Protocol):
    """The x86_64 user_regs_struct fields DCP reads and writes (python-ptrace is untyped)."""

    rax: int
    orig_rax: int
    rsp: int
    rip: int
    rdi: int
    rsi: int
    rdx: int
    r10: int
    r8: int
    r9: int


def get_regs(pid: int) -> Registers:
    """PTRACE_GETREGS."""
    regs = _user_regs()()
    _request(PTRACE_GETREGS, pid, 0, ctypes.addressof(regs))
    return cast(Registers, regs)


def set_regs(pid: int, regs: Registers) -> None:
    """PTRACE_SETREGS."""
    _request(PTRACE_SETREGS, pid, 0, ctypes.addressof(cast(ctypes.Structure, regs)))


def copy_regs(regs: Registers) -> Registers:
    """An independent copy of a register set."""
    out = _user_regs()()
    src = cast(ctypes.Structure, regs)
    ctypes.memmove(ctypes.addressof(out), ctypes.addressof(src), ctypes.sizeof(src))
    return cast(Registers, out)


_SCRATCH = 8192  # reads up to this size reuse one buffer (the tracer is single-threaded)
_scratch = ctypes.create_string_buffer(_SCRATCH)
_scratch_local = _IoVec(ctypes.addressof(_scratch), 0)
_scratch_remote = _IoVec(0, 0)


def read_memory(pid: int, addr: int, size: int) -> bytes:
    """Up to `size` bytes of the tracee's memory at `addr` (short at an unmapped page)."""
    if size <= 0 or addr == 0:
        return b""
    if size <= _SCRATCH:
        _scratch_local.len = _scratch_remote.len = size
        _scratch_remote.base = addr
        n = _libc.process_vm_readv(
            pid, ctypes.byref(_scratch_local), 1, ctypes.byref(_scratch_remote), 1, 0
        )
        return ctypes.string_at(_scratch, n) if n > 0 else b""
    buf = ctypes.create_string_buffer(size)
    local = _IoVec(ctypes.addressof(buf), size)
    remote = _IoVec(addr, size)
    n = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        return b""
    return buf.raw[:n]


def read_string(pid: int, addr: int, limit: int = 4096) -> bytes | None:
    """A NUL-terminated string from the tracee, or None at a bad address.

    Reads page by page so a string ending just before an unmapped page is found.
    """
    if addr == 0:
        return None
    out = b""
    while len(out) < limit:
        chunk = min(_PAGE - (addr % _PAGE), limit - len(out))
        data = read_memory(pid, addr, chunk)
        if not data:
            return None if not out else out
        end = data.find(b"\0")
        if end >= 0:
            return out + data[:end]
        out += data
        addr += len(data)
    return out


def read_string_array(pid: int, addr: int, limit: int = 4096) -> tuple[bytes, ...] | None:
    """A NULL-terminated array of string pointers (argv, envp), or None at a bad address."""
    if addr == 0:
        return None
    out: list[bytes] = []
    while len(out) < limit:
        raw = read_memory(pid, addr + 8 * len(out), 8)
        if len(raw) < 8:
            return None
        (ptr,) = struct.unpack("<Q", raw)
        if ptr == 0:
            return tuple(out)
        s = read_string(pid, ptr)
        if s is None:
            return None
        out.append(s)
    return tuple(out)


def write_memory(pid: int, addr: int, data: bytes) -> None:
    """Copy `data` into the tracee at `addr`."""
    buf = ctypes.create_string_buffer(data, len(data))
    local = _IoVec(ctypes.addressof(buf), len(data))
    remote = _IoVec(addr, len(data))
    n = _libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != len(data):
        err = ctypes.get_errno() if n < 0 else errno.EFAULT
        raise TracerError(
            f"cannot write {len(data)} bytes at {addr:#x} in pid {pid}: {os.strerror(err)}"
        )


def force_write(pid: int, addr: int, data: bytes) -> None:
    """Write `data` at `addr` even into read-only text (the tracee's private copy)."""
    try:
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(addr)
            mem.write(data)
    except OSError as exc:
        raise TracerError(
            f"cannot write {len(data)} bytes at {addr:#x} in pid {pid}: {exc}"
        ) from exc


def proc_link(pid: int, name: str) -> bytes | None:
    """readlink of /proc/PID/NAME (cwd, fd/N, exe), or None when it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/{name}".encode())
    except OSError:
        return None


def tgid_of(tid: int) -> int:
    """The thread-group id of a task, from /proc (the task itself if unreadable)."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return tid


def cmdline(pid: int) -> tuple[str, ...]:
    """A process's argv from /proc/PID/cmdline."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ()
    return tuple(a.decode(errors="replace") for a in raw.split(b"\0")[:-1])


PTRACE_GETSIGINFO = 0x4202
PTRACE_SETSIGINFO = 0x4203
SIGINFO_SIZE = 128
_KILL_INFO = struct.Struct("<iii4xiI")  # si_signo, si_errno, si_code, (pad), si_pid, si_uid


def sender(pid: int) -> tuple[int, int, int, int]:
    """(si_signo, si_code, si_pid, si_uid) of the signal `pid` is stopped delivering."""
    buf = ctypes.create_string_buffer(SIGINFO_SIZE)
    if _raw_ptrace(PTRACE_GETSIGINFO, pid, 0, ctypes.addressof(buf)) == -1:
        raise PtraceRequestError(pid=pid, request=PTRACE_GETSIGINFO, errno=ctypes.get_errno())
    signo, _err, code, si_pid, si_uid = _KILL_INFO.unpack_from(buf, 0)
    return signo, code, si_pid, si_uid


def set_sender(pid: int, si_pid: int, si_uid: int) -> None:
    """Rewrite si_pid/si_uid of the kill()-style signal `pid` is stopped delivering."""
    buf = ctypes.create_string_buffer(SIGINFO_SIZE)
    if _raw_ptrace(PTRACE_GETSIGINFO, pid, 0, ctypes.addressof(buf)) == -1:
        raise PtraceRequestError(pid=pid, request=PTRACE_GETSIGINFO, errno=ctypes.get_errno())
    signo, err, code, _pid, _uid = _KILL_INFO.unpack_from(buf, 0)
    _KILL_INFO.pack_into(buf, 0, signo, err, code, si_pid, si_uid)
    if _raw_ptrace(PTRACE_SETSIGINFO, pid, 0, ctypes.addressof(buf)) == -1:
        raise PtraceRequestError(pid=pid, request=PTRACE_SETSIGINFO, errno=ctypes.get_errno())
