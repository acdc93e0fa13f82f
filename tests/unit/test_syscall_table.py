"""Invariants of the syscall table over every entry (gVisor linux64_test style)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from tracer.arch import table_for
from tracer.syscalls import (
    ARG_FORMATS,
    Category,
    Service,
    SyscallSpec,
    by_name,
    spec,
)

UNISTD_64 = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
TABLE = table_for("x86_64")
NAMES = by_name(TABLE)


def _header_syscalls() -> dict[str, int]:
    if not UNISTD_64.exists():
        pytest.skip(f"{UNISTD_64} is absent (install linux-libc-dev to cross-check the table)")
    found: dict[str, int] = {}
    for m in re.finditer(r"^#define __NR_(\w+)\s+(\d+)\s*$", UNISTD_64.read_text(), re.M):
        found[m.group(1)] = int(m.group(2))
    assert found, f"no __NR_ definitions parsed from {UNISTD_64}"
    return found


def test_table_is_not_trivially_small() -> None:
    # x86_64 has had more than 330 syscalls since Linux 4.x.
    assert len(TABLE) > 330


def test_number_key_matches_spec_number() -> None:
    bad = {nr: s.nr for nr, s in TABLE.items() if nr != s.nr}
    assert not bad


def test_every_entry_is_a_syscallspec() -> None:
    assert all(isinstance(s, SyscallSpec) for s in TABLE.values())


def test_numbers_and_names_unique() -> None:
    nrs = Counter(s.nr for s in TABLE.values())
    names = Counter(s.name for s in TABLE.values())
    assert [n for n, c in nrs.items() if c > 1] == []
    assert [n for n, c in names.items() if c > 1] == []
    assert len(NAMES) == len(TABLE)


def test_names_are_identifiers() -> None:
    bad = [s.name for s in TABLE.values() if not re.fullmatch(r"[a-z_][a-z0-9_]*", s.name)]
    assert bad == []


def test_at_most_six_args() -> None:
    bad = [(s.name, len(s.args)) for s in TABLE.values() if len(s.args) > 6]
    assert bad == []


def test_every_arg_format_known() -> None:
    bad = [(s.name, a) for s in TABLE.values() for a in s.args if a not in ARG_FORMATS]
    assert bad == []


def test_every_category_and_service_is_an_enum_member() -> None:
    for s in TABLE.values():
        assert isinstance(s.category, Category), s.name
        assert isinstance(s.service, Service), s.name
        assert s.category in Category.__members__.values()
        assert s.service in Service.__members__.values()


def test_every_buffer_is_followed_by_its_size() -> None:
    # decode.Formatter reads a buffer's length from the next argument.
    bad = [
        s.name
        for s in TABLE.values()
        for i, a in enumerate(s.args)
        if a in ("buf_in", "buf_out") and (i + 1 >= len(s.args) or s.args[i + 1] != "size")
    ]
    assert bad == []


def test_every_dirfd_is_paired_with_the_next_path() -> None:
    for s in TABLE.values():
        pairs = s.path_args()
        dirfds = [i for i, a in enumerate(s.args) if a == "dirfd"]
        paired = [d for _, d in pairs if d is not None]
        assert sorted(paired) == dirfds, s.name
        for path_index, dirfd_index in pairs:
            assert s.args[path_index] == "path"
            if dirfd_index is not None:
                assert dirfd_index < path_index
                # Nothing path-like between a dirfd and its path.
                between = s.args[dirfd_index + 1 : path_index]
                assert "path" not in between and "dirfd" not in between, s.name


def test_path_args_of_non_at_calls_are_cwd_relative() -> None:
    for name in ("open", "stat", "rename", "link", "symlink", "readlink", "execve", "chdir"):
        s = NAMES[name]
        assert s.path_args(), name
        assert all(d is None for _, d in s.path_args()), name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("openat", ((1, 0),)),
        ("renameat2", ((1, 0), (3, 2))),
        ("linkat", ((1, 0), (3, 2))),
        ("symlinkat", ((2, 1),)),
        ("execveat", ((1, 0),)),
        ("rename", ((0, None), (1, None))),
    ],
)
def test_dirfd_pairing_of_known_calls(
    name: str, expected: tuple[tuple[int, int | None], ...]
) -> None:
    assert NAMES[name].path_args() == expected


def test_symlink_targets_are_not_paths() -> None:
    # A symlink's stored content is never resolved against a dirfd or the cwd.
    for name, target_index in (("symlink", 0), ("symlinkat", 0)):
        s = NAMES[name]
        assert s.args[target_index] == "target"
        assert target_index not in [p for p, _ in s.path_args()]


@pytest.mark.parametrize(
    ("name", "category", "service"),
    [
        ("read", Category.STORAGE, Service.STORAGE),
        ("write", Category.STORAGE, Service.STORAGE),
        ("openat", Category.STORAGE, Service.STORAGE),
        ("mmap", Category.MEMORY, Service.MEMORY),
        ("munmap", Category.MEMORY, Service.MEMORY),
        ("socket", Category.NETWORK, Service.NETWORK),
        ("connect", Category.NETWORK, Service.NETWORK),
        ("clone", Category.PROCESS, Service.COMPUTE),
        ("clone3", Category.PROCESS, Service.COMPUTE),
        ("execve", Category.PROCESS, Service.COMPUTE),
        ("kill", Category.SIGNAL, Service.IPC),
        ("getpid", Category.PROCESS, Service.LOCAL),
        ("clock_gettime", Category.TIME, Service.LOCAL),
        ("futex", Category.IPC, Service.IPC),
    ],
)
def test_category_and_service_of_well_known_calls(
    name: str, category: Category, service: Service
) -> None:
    s = NAMES[name]
    assert (s.category, s.service) == (category, service)


def test_the_header_number_of_well_known_calls() -> None:
    # Independent of the header: numbers every x86_64 ABI document agrees on.
    known = {"read": 0, "write": 1, "openat": 257, "execve": 59, "exit_group": 231, "clone3": 435}
    assert {n: NAMES[n].nr for n in known} == known


def test_every_header_syscall_is_in_the_table() -> None:
    header = _header_syscalls()
    missing = {n: nr for n, nr in header.items() if n not in NAMES}
    assert missing == {}
    wrong = {n: (nr, NAMES[n].nr) for n, nr in header.items() if NAMES[n].nr != nr}
    assert wrong == {}


def test_every_table_syscall_is_in_the_header() -> None:
    header = _header_syscalls()
    # The installed header may be older than the running kernel: the table
    # may know calls numbered past the header's last one, and only those.
    last = max(header.values())
    extra = sorted(s.name for s in TABLE.values() if s.name not in header and s.nr <= last)
    assert extra == []
    by_nr = {nr: n for n, nr in header.items()}
    known = [s for s in TABLE.values() if s.nr <= last]
    wrong = {s.nr: (s.name, by_nr.get(s.nr)) for s in known if by_nr.get(s.nr) != s.name}
    assert wrong == {}


def test_spec_helper_splits_formats() -> None:
    s = spec(7, "x", "dirfd path  oflags", Category.OTHER, Service.LOCAL)
    assert s.args == ("dirfd", "path", "oflags")
    assert spec(8, "y", "", Category.OTHER, Service.LOCAL).args == ()


def test_path_args_reset_dirfd_after_each_path() -> None:
    s = spec(9, "z", "dirfd path path", Category.OTHER, Service.LOCAL)
    assert s.path_args() == ((1, 0), (2, None))


def test_spec_is_frozen() -> None:
    s = NAMES["read"]
    with pytest.raises(AttributeError):
        s.nr = 1  # type: ignore[misc]


@pytest.mark.parametrize("arch", ["arm64", "aarch64", "i386", "", "X86_64"])
def test_table_for_unknown_arch_raises(arch: str) -> None:
    with pytest.raises(ValueError, match="unsupported architecture"):
        table_for(arch)


def test_table_for_returns_the_same_table() -> None:
    assert table_for("x86_64") is TABLE
