"""/proc of the program's pids held elsewhere, on an instance (pure parts, a fake home)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracer.arch import table_for
from tracer.coordinator import Allow, Rewrite, SyscallCall
from tracer.syscalls import by_name
from vmagent.trace import procview
from vmagent.trace.host import coordinator_for
from vmagent.trace.placing import InstanceCoordinator

Fixture = tuple[InstanceCoordinator, "FakeHome"]

TABLE = table_for("x86_64")
HOME_FILES = {
    "stat": b"500 (sleep) S 400",
    "status": b"Name:\tsleep\n",
    "cmdline": b"sleep\x0060\x00",
    "comm": b"sleep\n",
}


def test_proc_pid_takes_paths_under_proc_digits_only() -> None:
    assert procview.proc_pid(b"/proc/500") == (500, b"")
    assert procview.proc_pid(b"/proc/500/stat") == (500, b"/stat")
    for other in (
        b"/proc/self/stat",
        b"/proc/sys/kernel/pid_max",
        b"/proc",
        b"/proc/",
        b"/proc/05/stat",
        b"/procs/5",
        b"/tmp/proc/5",
        b"/proc/12345678901",
    ):
        assert procview.proc_pid(other) is None, other  # fmt: skip


def test_dirents_are_linux_dirent64_records_that_fit() -> None:
    data = procview.dirents([7, 123456], 4096)
    ino, off, reclen, kind = procview.DIRENT.unpack_from(data)
    assert (ino, reclen % 8, kind) == (7, 0, procview.DT_DIR)
    assert data[procview.DIRENT.size : procview.DIRENT.size + 2] == b"7\0"
    second = data[reclen:]
    assert procview.DIRENT.unpack_from(second)[0] == 123456
    assert len(data) == reclen + procview.DIRENT.unpack_from(second)[2]
    assert procview.dirents([7, 123456], reclen) == data[:reclen]  # what fits, no more
    assert procview.dirents([7], 8) == b""


class FakeHome:
    """Home's /proc: pid 500 is the program's; nothing else is."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def files(self, pid: int) -> dict[str, bytes] | None:
        self.asked.append(pid)
        return dict(HOME_FILES) if pid == 500 else None

    def pids(self) -> list[int]:
        return [500, 77]

    def pid_max(self) -> bytes:
        return b"32768\n"


def _call(name: str, path: bytes, base: bytes | None = None) -> SyscallCall:
    spec = by_name(TABLE)[name]
    index = spec.args.index("path") if "path" in spec.args else 1
    bases = {index: base} if base is not None else {}
    return SyscallCall(os.getpid(), os.getpid(), spec.nr, name, (0,) * 6, {index: path}, bases)


@pytest.fixture
def coordinator() -> Iterator[Fixture]:
    home = FakeHome()
    c = coordinator_for(
        TABLE, (("/mnt/v", "/srv"),), lambda _m: None, proc=home
    )  # maps: path calls stop
    c.bind_pids("node1", os.getpid(), 77, 1)  # this instance holds program pid 77 only
    yield c, home
    c.close()


def test_a_pid_held_elsewhere_reads_a_private_snapshot_of_home_s(coordinator: Fixture) -> None:
    c, home = coordinator
    decision = c.on_syscall(_call("openat", b"/proc/500/status"))
    assert isinstance(decision, Rewrite)
    (path,) = decision.args.values()
    assert isinstance(path, bytes) and path.endswith(b"/status")
    assert Path(os.fsdecode(path)).read_bytes() == HOME_FILES["status"]
    where = Path(os.fsdecode(path)).parent
    assert stat.S_IMODE(where.stat().st_mode) == 0o500
    assert stat.S_IMODE(Path(os.fsdecode(path)).stat().st_mode) == 0o400
    assert stat.S_IMODE(where.parent.stat().st_mode) == 0o711  # not listable
    # A second read is a fresh snapshot; the first is gone.
    again = c.on_syscall(_call("newfstatat", b"/proc/500"))
    assert isinstance(again, Rewrite) and not where.exists()
    assert home.asked == [500, 500]


def test_a_pid_held_here_is_its_real_one_and_others_stay_as_they_are(coordinator: Fixture) -> None:
    c, home = coordinator
    held = c.on_syscall(_call("openat", b"/proc/77/comm"))
    assert held == Rewrite({1: b"/proc/%d/comm" % os.getpid()})
    assert c.on_syscall(_call("openat", b"/proc/1/comm")) == Allow()  # not the program's
    assert c.on_syscall(_call("openat", b"/proc/self/status")) == Allow()
    assert c.on_syscall(_call("openat", b"/etc/passwd")) == Allow()
    assert home.asked == [1]
    pid_max = c.on_syscall(_call("openat", b"/proc/sys/kernel/pid_max"))
    assert isinstance(pid_max, Rewrite)
    assert Path(os.fsdecode(pid_max.args[1])).read_bytes() == b"32768\n"  # type: ignore[arg-type]


def test_close_removes_every_snapshot(coordinator: Fixture) -> None:
    c, _home = coordinator
    c.on_syscall(_call("openat", b"/proc/500/stat"))
    root = c.snapshots.root
    assert root and os.path.isdir(root)
    c.close()
    assert not os.path.exists(root)


def _getdents(fd: int) -> SyscallCall:
    nr = by_name(TABLE)["getdents64"].nr
    return SyscallCall(os.getpid(), os.getpid(), nr, "getdents64", (fd, 0x1000, 4096, 0, 0, 0))


def test_a_listing_of_proc_ends_with_home_s_pids_and_asks_home_once(
    coordinator: Fixture,
) -> None:
    c, home = coordinator
    fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        listing = _getdents(fd)
        assert c.on_syscall(listing) == Allow(observe_result=True)
        assert c.on_result(listing, 4000, None) is None  # this instance's own entries
        # While they are read: a pid home does not list is looked up here, no question
        # home; the program's pid at home is fetched once for the whole listing.
        assert c.on_syscall(_call("newfstatat", b"/proc/1234")) == Allow()
        first = c.on_syscall(_call("newfstatat", b"/proc/500"))
        second = c.on_syscall(_call("openat", b"/proc/500/stat"))
        assert isinstance(first, Rewrite) and isinstance(second, Rewrite)
        assert second.args[1] == first.args[1] + b"/stat"  # type: ignore[operator]
        assert home.asked == [500]
        assert c.on_syscall(listing) == Allow(observe_result=True)
        added = c.on_result(listing, 0, None)
        assert added is not None and added.result > 0
        ((address, records),) = added.writes
        assert address == 0x1000 and b"500\0" in records and b"77\0" not in records  # 77: here
        assert c.on_syscall(listing) == Allow(observe_result=True)
        assert c.on_result(listing, 0, None) is None  # the end, once
        assert c._scan == {} and c._listed == {}
    finally:
        os.close(fd)


def test_a_pid_that_is_not_the_program_s_is_asked_home_once_a_second() -> None:
    asked: list[int] = []
    now = [100.0]

    def fetch(pid: int) -> dict[str, bytes] | None:
        asked.append(pid)
        return {"comm": b"sleep\n"} if pid == 7 else None

    snaps = procview.Snapshots(fetch, clock=lambda: now[0])
    try:
        uid, gid = os.geteuid(), os.getegid()
        assert snaps.path(1, uid, gid) is None and snaps.path(1, uid, gid) is None
        assert asked == [1]  # known not home's: the instance's own /proc/1, no round trip
        first = snaps.path(7, uid, gid)
        second = snaps.path(7, uid, gid)
        assert first and second and first != second and asked == [1, 7, 7]  # fresh each read
        now[0] += procview.ABSENT_FOR + 0.01
        assert snaps.path(1, uid, gid) is None and asked == [1, 7, 7, 1]  # asked again
    finally:
        snaps.close()
