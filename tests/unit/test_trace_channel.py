"""The instance tracer's channel records (vmagent.trace.channel) and its coordinator."""

from __future__ import annotations

import os
import socket

import pytest

from tracer.arch import table_for
from tracer.coordinator import (
    Allow,
    ProcessExec,
    ProcessExited,
    ProcessSpawned,
    ProcessUsage,
    SyscallCall,
)
from tracer.runner import PathSkip, skips_available
from tracer.syscalls import by_name
from vmagent.exec import protocol as P
from vmagent.trace import channel, procview
from vmagent.trace.host import at_cwd_only, coordinator_for, interception
from vmagent.trace.listeners import net_calls
from vmagent.trace.placing import PID_CALLS, SIGWAIT, InstanceCoordinator

TABLE = table_for("x86_64")


def test_records_round_trip_with_their_fields() -> None:
    record = channel.decode(
        channel.trace_request("ab12", 4242, "node1", b"\x00view", (31337, 31000))
    )
    assert record == {
        b"op": b"trace",
        b"session": b"ab12",
        b"pid": b"4242",
        b"instance": b"node1",
        b"view": b"\x00view",
        b"vpid": b"31337",
        b"vppid": b"31000",
    }
    assert channel.number(record, b"pid") == 4242


def test_event_records() -> None:
    spawn = channel.decode(channel.spawned(12, 0))
    assert (spawn[b"op"], spawn[b"kind"], spawn[b"pid"], spawn[b"ppid"]) == (
        b"event", b"spawn", b"12", b"0",
    )  # fmt: skip
    assert float(spawn[b"ts"]) > 0
    exe = channel.decode(channel.exec_event(12, ("/bin/echo", "a b", "")))
    assert P.unrecord(exe[b"argv"]) == [b"/bin/echo", b"a b", b""]
    ok = channel.decode(channel.exited(12, 3, None))
    assert (ok[b"status"], b"signal" in ok) == (b"3", False)
    killed = channel.decode(channel.exited(12, None, 9))
    assert (killed[b"signal"], b"status" in killed) == (b"9", False)


def test_usage_record_carries_every_measured_counter_and_services() -> None:
    io = {"rchar": 10, "wchar": 20, "rbytes": 0, "wbytes": 4096, "net_rx": 7}
    record = channel.decode(channel.usage(12, 1500, 2048, io, {"storage": 3, "compute": 1}))
    assert record[b"op"] == b"usage" and record[b"final"] == b"1"
    assert {k: channel.number(record, k.encode()) for k in [*io, "cpu_us", "maxrss_kb"]} == {
        **io,
        "cpu_us": 1500,
        "maxrss_kb": 2048,
    }
    assert record[b"sys"] == b"compute=1,storage=3"
    assert channel.services(record) == {"compute": 1, "storage": 3}


@pytest.mark.parametrize(
    "data", [b"", b"\x00\x00\x00\x05ab", P.unpairs({b"pid": b"1"}), P.record([b"op"])]
)
def test_malformed_messages_are_one_error(data: bytes) -> None:
    with pytest.raises(channel.ChannelError):
        channel.decode(data)


@pytest.mark.parametrize("value", [None, b"", b"x1", b"1" * 30])
def test_a_bad_number_names_its_field(value: bytes | None) -> None:
    record = {b"op": b"usage"} | ({b"pid": value} if value is not None else {})
    with pytest.raises(channel.ChannelError, match="pid"):
        channel.number(record, b"pid")


def test_view_maps_round_trip_and_empty_view() -> None:
    maps = (("/mnt/v", "/srv/data"), ("/w", "/tmp/w"))
    assert channel.view_maps(channel.encode_maps(maps)) == maps
    assert channel.view_maps(b"") == ()
    assert channel.view_maps(P.unpairs({b"program": b"p1"})) == ()
    with pytest.raises(channel.ChannelError):
        channel.view_maps(P.unpairs({b"maps": P.record([b"\x00\x00\x00\x09x"])}))


def test_descriptors_travel_with_a_message() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        channel.send(a, channel.encode(channel.OP_DONE), (r, w))
        data, fds = channel.receive(b)
        assert channel.decode(data)[b"op"] == b"done" and len(fds) == 2
        for fd in fds:
            os.close(fd)
        a.close()
        assert channel.receive(b) == (b"", [])
    finally:
        for fd in (r, w):
            os.close(fd)
        b.close()


def test_interception_is_every_exec_plus_the_views_paths() -> None:
    plain = interception(TABLE, ())
    # issue 11: calls in the program's pids; issue 13: listen/close of listening sockets;
    # issue 14: lock calls (vmagent.trace.filelocks); issue 11: sigwaitinfo (its sender)
    # and the paths that can name /proc/N (those with a dirfd only from AT_FDCWD)
    want = {"execve", "execveat", "flock", "fcntl"} | PID_CALLS | net_calls() | SIGWAIT
    if skips_available():
        # no maps: the paths stop for /proc/N alone, and the C loop lets the others go
        assert plain == want | procview.CALLS
        assert at_cwd_only(TABLE, ()) == procview.AT_CALLS
        skip = coordinator_for(TABLE, (), lambda _m: None).skippable()
        assert skip == PathSkip((b"/proc",), procview.PATH_CALLS, procview.LISTING_CALLS)
    else:
        assert plain == want  # no maps and no C loop: no stop per path
        assert at_cwd_only(TABLE, ()) == frozenset()
    mapped = interception(TABLE, (("/mnt/v", "/srv"),))
    assert {"execve", "openat", "getcwd"} <= mapped
    assert "openat" not in at_cwd_only(TABLE, (("/mnt/v", "/srv"),))  # the map's: always
    skip = coordinator_for(TABLE, (("/mnt/v", "/srv"),), lambda _m: None).skippable()
    assert skip is not None and {"openat", "stat", "unlink"} <= skip.paths
    assert "execve" not in skip.paths and "rename" not in skip.paths  # two paths: Python
    assert {b"/proc", b"/dev/fd", b"/mnt/v", b"/srv"} <= set(skip.prefixes)


def test_coordinator_reports_events_and_runs_execs_here() -> None:
    sent: list[bytes] = []
    coordinator = coordinator_for(TABLE, (), sent.append)
    nr = by_name(TABLE)["execve"].nr
    call = SyscallCall(7, 7, nr, "execve", (0,) * 6, {0: b"/bin/true"}, {}, (b"true",))
    assert coordinator.on_syscall(call) == Allow()
    coordinator.on_process(ProcessSpawned(8, 7, False))
    coordinator.on_process(ProcessSpawned(9, 7, True))  # a thread: not a process event
    coordinator.on_process(ProcessExec(8, ("/bin/true",)))
    coordinator.on_process(ProcessExited(8, 0, None, 10, 900))
    coordinator.on_process(ProcessUsage(8, 10, 900, {"rchar": 1}, {"compute": 1}))
    ops = [(r[b"op"], r.get(b"kind")) for r in map(channel.decode, sent)]
    assert ops == [
        (b"event", b"spawn"),
        (b"event", b"exec"),
        (b"event", b"exit"),
        (b"usage", None),
    ]
    assert isinstance(coordinator, InstanceCoordinator)
