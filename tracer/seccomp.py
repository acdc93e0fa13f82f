"""The seccomp-BPF filter that makes only intercepted syscalls stop the program.

Pure builder (`build_filter`) plus the installer that runs in the child between
fork and exec.  Syscalls in the set return SECCOMP_RET_TRACE (a
PTRACE_EVENT_SECCOMP stop for the tracer); everything else SECCOMP_RET_ALLOW and
runs at native speed, the technique of `strace --seccomp-bpf`.  Calls from a
foreign ABI (i386 `int 0x80`, x32) always stop, so no path escapes interception;
so do, with `trace_from`, numbers past the end of the syscall table (calls
newer than dcptrace, which it cannot interpret and refuses while it serves).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable

from tracer.errors import SeccompError

BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_JGT_K = 0x25
BPF_JA = 0x05
BPF_RET_K = 0x06
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_TRACE = 0x7FF00000
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
BPF_MAXINSNS = 4096
ARG0_LOW = 16  # seccomp_data.args[0], low 32 bits (little-endian)
AT_FDCWD = 0xFFFFFF9C  # -100 as the 32-bit int the *at calls take

Insn = tuple[int, int, int, int]  # code, jt, jf, k


def build_filter(
    numbers: Iterable[int],
    trace_all: bool = False,
    trace_from: int | None = None,
    at_cwd: Iterable[int] = (),
) -> list[Insn]:
    """A BPF program returning TRACE for `numbers` (or every call) and ALLOW otherwise.

    With `trace_from`, every number from it up also returns TRACE.  The *at
    calls in `at_cwd` (and not in `numbers`) return TRACE only when their
    first argument, the directory descriptor, is AT_FDCWD: a path relative to
    an open directory runs at native speed (a program walking a tree).  The numbers,
    as runs of consecutive ones, are searched as a binary tree: a call that
    runs at native speed pays a few compares (about 2 log2 of the runs), not
    one per intercepted call, as `strace --seccomp-bpf` keeps its own filter short.
    """
    if trace_all:
        return [(BPF_RET_K, 0, 0, SECCOMP_RET_TRACE)]
    numbers = set(numbers)
    prog: list[Insn] = [
        (BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (BPF_RET_K, 0, 0, SECCOMP_RET_TRACE),
        (BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        (BPF_RET_K, 0, 0, SECCOMP_RET_TRACE),
    ]
    if trace_from is not None:
        prog.append((BPF_JGE_K, 0, 1, trace_from))
        prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_TRACE))
    for nr in sorted(set(at_cwd) - numbers):
        prog += [
            (BPF_JEQ_K, 0, 4, nr),
            (BPF_LD_W_ABS, 0, 0, ARG0_LOW),
            (BPF_JEQ_K, 0, 1, AT_FDCWD),
            (BPF_RET_K, 0, 0, SECCOMP_RET_TRACE),
            (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        ]
    prog += _search(_runs(sorted(numbers)))
    if len(prog) > BPF_MAXINSNS:
        raise SeccompError(f"too many syscalls to intercept: {len(numbers)}")
    return prog


def _runs(nrs: list[int]) -> list[tuple[int, int]]:
    """Sorted numbers as (first, last) runs of consecutive numbers."""
    runs: list[tuple[int, int]] = []
    for nr in nrs:
        if runs and runs[-1][1] == nr - 1:
            runs[-1] = (runs[-1][0], nr)
        else:
            runs.append((nr, nr))
    return runs


_LEAF_RUNS = 3  # runs tested one after the other at the bottom of the tree


def _search(runs: list[tuple[int, int]]) -> list[Insn]:
    """Code returning TRACE when the accumulator (nr) is in one of `runs`, else ALLOW.

    Every path ends in a return, so subtrees are laid out one after the other;
    the long jump over a subtree is a BPF_JA, whose 32-bit offset has no limit
    (the conditional jumps only skip one or two instructions).
    """
    if len(runs) <= _LEAF_RUNS:
        leaf: list[Insn] = []
        for first, last in runs:
            if first == last:
                leaf += [(BPF_JEQ_K, 0, 1, first), (BPF_RET_K, 0, 0, SECCOMP_RET_TRACE)]
            else:  # below first: skip both; above last: skip the return
                leaf += [
                    (BPF_JGE_K, 0, 2, first),
                    (BPF_JGT_K, 1, 0, last),
                    (BPF_RET_K, 0, 0, SECCOMP_RET_TRACE),
                ]
        return leaf + [(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)]
    mid = len(runs) // 2
    low, high = _search(runs[:mid]), _search(runs[mid:])
    # nr >= the first of the upper half: on into it; else jump over it.
    return [(BPF_JGE_K, 1, 0, runs[mid][0]), (BPF_JA, 0, 0, len(high)), *high, *low]


def run_filter(
    prog: list[Insn],
    nr: int,
    arch: int = AUDIT_ARCH_X86_64,
    path: list[int] | None = None,
    arg0: int = 0,
) -> int:
    """Evaluate the program on one syscall (for tests: a tiny classic-BPF interpreter).

    `path`, if given, receives the index of every instruction executed; `arg0`
    is the call's first argument.
    """
    acc, pc = 0, 0
    while True:
        if path is not None:
            path.append(pc)
        code, jt, jf, k = prog[pc]
        if code == BPF_LD_W_ABS:
            acc = {0: nr, 4: arch, ARG0_LOW: arg0 & 0xFFFFFFFF}[k]
        elif code == BPF_JEQ_K:
            pc += jt if acc == k else jf
        elif code == BPF_JGE_K:
            pc += jt if acc >= k else jf
        elif code == BPF_JGT_K:
            pc += jt if acc > k else jf
        elif code == BPF_JA:
            pc += k
        elif code == BPF_RET_K:
            return k
        else:
            raise SeccompError(f"unknown BPF instruction {code:#x}")
        pc += 1


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class PreparedFilter:
    """A filter encoded ahead of fork, so the child only makes two prctl calls.

    An empty `prog` installs nothing (and sets no no_new_privs): a run where no
    call must stop pays no filter at all (`tracer.runner.interception_filter`).
    """

    def __init__(self, prog: list[Insn], no_new_privs: bool) -> None:
        self.installs = bool(prog)
        raw = b"".join(struct.pack("<HBBI", *insn) for insn in prog)
        self._buf = ctypes.create_string_buffer(raw, len(raw))
        self._fprog = _SockFprog(len(prog), ctypes.addressof(self._buf))
        self._no_new_privs = no_new_privs
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._prctl = self._libc.prctl
        self._prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p,
                                ctypes.c_ulong, ctypes.c_ulong]  # fmt: skip

    def install(self) -> int:
        """Install in the calling process; returns 0 or an errno (child-side, no raising)."""
        if not self.installs:
            return 0
        if self._no_new_privs and self._prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
            return ctypes.get_errno()
        if self._prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(self._fprog), 0, 0):
            return ctypes.get_errno()
        return 0
