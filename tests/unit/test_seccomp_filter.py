"""The seccomp-BPF program, evaluated with the module's classic-BPF interpreter."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracer.arch import table_for
from tracer.errors import SeccompError, TracerError
from tracer.seccomp import (
    AUDIT_ARCH_X86_64,
    BPF_MAXINSNS,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_TRACE,
    X32_SYSCALL_BIT,
    build_filter,
    run_filter,
)

TABLE_NRS = sorted(table_for("x86_64"))
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
# Numbers just outside the table too: unknown syscalls must be allowed, not trapped.
PROBE_NRS = sorted(set(TABLE_NRS) | set(range(0, 460)) | {0xFFFF, X32_SYSCALL_BIT - 1})
SOCK_FILTER = struct.Struct("<HBBI")  # struct sock_filter: code u16, jt u8, jf u8, k u32


def _encodable(prog: list[tuple[int, int, int, int]]) -> bool:
    try:
        for insn in prog:
            SOCK_FILTER.pack(*insn)
    except struct.error:
        return False
    return True


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(st.sets(st.sampled_from(TABLE_NRS), max_size=120))
def test_trace_exactly_the_members(numbers: set[int]) -> None:
    prog = build_filter(numbers)
    for nr in PROBE_NRS:
        expected = SECCOMP_RET_TRACE if nr in numbers else SECCOMP_RET_ALLOW
        assert run_filter(prog, nr) == expected, nr


@settings(max_examples=30, deadline=None, database=None, derandomize=True)
@given(st.lists(st.sampled_from(TABLE_NRS), max_size=60))
def test_duplicates_and_order_do_not_matter(numbers: list[int]) -> None:
    assert build_filter(numbers) == build_filter(sorted(set(numbers), reverse=True))


def test_accepts_any_iterable() -> None:
    prog = build_filter(iter([257, 2]))
    assert run_filter(prog, 257) == SECCOMP_RET_TRACE
    assert run_filter(prog, 2) == SECCOMP_RET_TRACE
    assert run_filter(prog, 0) == SECCOMP_RET_ALLOW


@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(st.sets(st.sampled_from(TABLE_NRS), max_size=120))
def test_foreign_arch_and_x32_always_trace(numbers: set[int]) -> None:
    prog = build_filter(numbers)
    for nr in (0, 1, 2, 11, 59, 257, 300):
        assert run_filter(prog, nr, arch=AUDIT_ARCH_I386) == SECCOMP_RET_TRACE
        assert run_filter(prog, nr, arch=AUDIT_ARCH_AARCH64) == SECCOMP_RET_TRACE
        # x32 numbers are the x86_64 ones with bit 30 set, and arch stays x86_64.
        assert run_filter(prog, nr | X32_SYSCALL_BIT) == SECCOMP_RET_TRACE
    assert run_filter(prog, 0xFFFFFFFF) == SECCOMP_RET_TRACE


def test_trace_all_traces_everything() -> None:
    prog = build_filter([], trace_all=True)
    for nr in PROBE_NRS:
        assert run_filter(prog, nr) == SECCOMP_RET_TRACE
    assert run_filter(prog, 0, arch=AUDIT_ARCH_I386) == SECCOMP_RET_TRACE
    # The number set is irrelevant in trace_all mode.
    assert build_filter([1, 2, 3], trace_all=True) == prog


def test_empty_set_allows_every_native_call() -> None:
    prog = build_filter([])
    for nr in PROBE_NRS:
        assert run_filter(prog, nr) == SECCOMP_RET_ALLOW
    assert run_filter(prog, 0, arch=AUDIT_ARCH_I386) == SECCOMP_RET_TRACE
    assert run_filter(prog, X32_SYSCALL_BIT) == SECCOMP_RET_TRACE


def test_first_instruction_checks_the_arch() -> None:
    # seccomp_data: nr at offset 0, arch at offset 4; the arch must be checked first
    # or an i386 call with a harmless x86_64 number would slip through.
    prog = build_filter([257])
    code, _, _, k = prog[0]
    assert k == 4
    assert prog[1][3] == AUDIT_ARCH_X86_64


def test_too_many_numbers_raises() -> None:
    with pytest.raises(SeccompError, match="too many"):
        build_filter(range(0, 2 * (BPF_MAXINSNS + 10), 2))  # no two consecutive
    assert issubclass(SeccompError, TracerError)


def test_unknown_instruction_raises_in_interpreter() -> None:
    with pytest.raises(SeccompError):
        run_filter([(0xFF, 0, 0, 0)], 0)


def test_small_sets_fit_struct_sock_filter() -> None:
    prog = build_filter(TABLE_NRS[:100])
    assert _encodable(prog)
    assert len(prog) <= BPF_MAXINSNS


def test_whole_table_fits_struct_sock_filter() -> None:
    # Intercepting every syscall of the table (362) must either build a program
    # the kernel can load or fail with SeccompError, never a struct.error later.
    try:
        prog = build_filter(TABLE_NRS)
    except SeccompError:
        return
    assert _encodable(prog)
    for nr in TABLE_NRS:
        assert run_filter(prog, nr) == SECCOMP_RET_TRACE


def test_length_check_matches_program_length() -> None:
    n = BPF_MAXINSNS - 6  # the largest set the check accepts
    try:
        prog = build_filter(range(n))
    except SeccompError:
        return
    assert len(prog) <= BPF_MAXINSNS


def test_numbers_past_the_table_stop_when_asked() -> None:
    prog = build_filter([257], trace_from=470)
    assert run_filter(prog, 257) == SECCOMP_RET_TRACE
    assert run_filter(prog, 470) == SECCOMP_RET_TRACE
    assert run_filter(prog, 1000) == SECCOMP_RET_TRACE
    assert run_filter(prog, 469) == SECCOMP_RET_ALLOW
    assert run_filter(build_filter([257]), 470) == SECCOMP_RET_ALLOW


def test_nothing_intercepted_installs_no_filter() -> None:
    """A plain run (empty interception set, no observation) gets no filter at all."""
    from tracer.runner import interception_filter

    table = table_for("x86_64")
    assert not interception_filter(table, frozenset(), False, no_new_privs=True).installs
    assert interception_filter(table, frozenset(), True, no_new_privs=True).installs
    assert interception_filter(table, frozenset({59}), False, no_new_privs=True).installs


def test_a_call_not_intercepted_pays_a_few_compares() -> None:
    """The path-call set of `--map` (75 calls): a read or write runs ~20 instructions,
    not one compare per intercepted call (strace --seccomp-bpf keeps its filter as short)."""
    from oss.embedded import EmbeddedCoordinator
    from oss.storage.pathmap import PathMap
    from tracer.syscalls import by_name

    table = table_for("x86_64")
    names = EmbeddedCoordinator(table, PathMap({"/x": "/y"})).interception()
    numbers = {by_name(table)[n].nr for n in names}
    prog = build_filter(numbers, trace_from=max(table) + 1)
    for nr in (0, 1, 9, 202, 232):  # read, write, mmap, futex, epoll_wait
        assert nr not in numbers
        path: list[int] = []
        assert run_filter(prog, nr, path=path) == SECCOMP_RET_ALLOW
        assert len(path) <= 30, (nr, len(path))
    assert len(numbers) > 60


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(st.sets(st.integers(min_value=0, max_value=600), max_size=300))
def test_runs_of_consecutive_numbers_trace_exactly_the_members(numbers: set[int]) -> None:
    prog = build_filter(numbers)
    assert _encodable(prog)
    for nr in range(0, 610):
        expected = SECCOMP_RET_TRACE if nr in numbers else SECCOMP_RET_ALLOW
        assert run_filter(prog, nr) == expected, nr


def test_at_cwd_calls_trace_only_with_at_fdcwd() -> None:
    # openat (257) stops for a path from the working directory, not one relative to
    # an open directory; a call both lists name stops always.
    prog = build_filter([2, 262], at_cwd=[257, 262])
    at_fdcwd = -100
    assert run_filter(prog, 257, arg0=at_fdcwd) == SECCOMP_RET_TRACE
    assert run_filter(prog, 257, arg0=at_fdcwd & 0xFFFFFFFF) == SECCOMP_RET_TRACE
    assert run_filter(prog, 257, arg0=3) == SECCOMP_RET_ALLOW
    assert run_filter(prog, 262, arg0=3) == SECCOMP_RET_TRACE
    assert run_filter(prog, 2, arg0=3) == SECCOMP_RET_TRACE
    assert run_filter(prog, 0, arg0=at_fdcwd) == SECCOMP_RET_ALLOW
    assert run_filter(prog, 257, arch=AUDIT_ARCH_I386, arg0=3) == SECCOMP_RET_TRACE
