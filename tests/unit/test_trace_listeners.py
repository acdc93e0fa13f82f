"""The instance tracer's listener watch (vmagent.trace.listeners) on real sockets."""

from __future__ import annotations

import ctypes
import errno
import os
import socket

from oss.embedded import EmbeddedCoordinator
from oss.storage.pathmap import PathMap
from tracer.arch import table_for
from tracer.coordinator import Allow, Complete, Rewrite, SyscallCall
from vmagent.trace import channel
from vmagent.trace.listeners import (
    IN6_LOOPBACK,
    NET_CALLS,
    OP_LISTEN,
    OP_NETREFUSED,
    OP_UNLISTEN,
    Listeners,
    bind_port,
    datagram,
    fd_inode,
    listening,
)
from vmagent.trace.placing import InstanceCoordinator


def _call(name: str, fd: int) -> SyscallCall:
    return SyscallCall(os.getpid(), os.getpid(), 0, name, (fd, 0, 0, 0, 0, 0))


def test_listening_reads_the_local_address_of_a_socket_by_inode() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        inode = fd_inode(os.getpid(), s.fileno())
        assert inode > 0
        assert listening(os.getpid(), inode) == ("127.0.0.1", s.getsockname()[1])
    with socket.socket(socket.AF_INET6) as s6:
        s6.bind(("::", 0))
        s6.listen(1)
        assert listening(os.getpid(), fd_inode(os.getpid(), s6.fileno())) == (
            "::", s6.getsockname()[1])  # fmt: skip
    assert fd_inode(os.getpid(), 10**6) == 0  # no such descriptor


def test_listen_is_reported_refused_becomes_eaddrinuse_close_unlistens() -> None:
    asked: list[bytes] = []
    told: list[bytes] = []
    answer = {b"op": b"netack", b"address": b"10.214.0.2"}

    def ask(message: bytes, req: bytes) -> dict[bytes, bytes]:
        asked.append(message)
        return {**answer, b"req": req}

    w = Listeners(ask, told.append)
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen(1)
        assert w.on_syscall(_call("listen", s.fileno())) == Allow(observe_result=True)
        assert w.on_result(_call("listen", s.fileno()), 0) is None
        record = channel.decode(asked[0])
        assert record[b"op"] == OP_LISTEN and record[b"port"] == str(s.getsockname()[1]).encode()
        assert record[b"local"] == b"0.0.0.0" and w.address == "10.214.0.2"
        dup = os.dup(s.fileno())
        assert w.on_syscall(_call("close", dup)) == Allow(observe_result=True)
        os.close(dup)
        assert w.on_result(_call("close", dup), 0) is None and told == []  # still open
        fd = s.fileno()
        assert w.on_syscall(_call("close", fd)) == Allow(observe_result=True)
    assert w.on_result(_call("close", fd), 0) is None
    assert [channel.decode(m)[b"op"] for m in told] == [OP_UNLISTEN] and not w.watched
    answer = {b"op": OP_NETREFUSED, b"errno": b"98"}
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen(1)
        assert w.on_result(_call("listen", s.fileno()), 0) == Complete(-errno.EADDRINUSE)


def test_only_instance_tracers_intercept_listen_and_close() -> None:
    table = table_for("x86_64")
    embedded = EmbeddedCoordinator(table, PathMap({}))
    assert not NET_CALLS & embedded.interception()  # plain dcptrace pays nothing
    instance = InstanceCoordinator(EmbeddedCoordinator(table, PathMap({})), lambda _m: None)
    assert NET_CALLS <= instance.interception()


def _bind_call(fd: int, port: int) -> tuple[SyscallCall, ctypes.Array[ctypes.c_char]]:
    """A bind(fd, {AF_INET, port}, 16) entry whose sockaddr lives in this process."""
    raw = socket.AF_INET.to_bytes(2, "little") + port.to_bytes(2, "big") + bytes(12)
    buf = ctypes.create_string_buffer(raw, len(raw))
    args = (fd, ctypes.addressof(buf), len(raw), 0, 0, 0)
    return SyscallCall(os.getpid(), os.getpid(), 0, "bind", args), buf


def test_a_udp_bind_to_a_named_port_is_reported_and_its_close_unlistens() -> None:
    asked: list[bytes] = []
    told: list[bytes] = []

    def ask(message: bytes, req: bytes) -> dict[bytes, bytes]:
        asked.append(message)
        return {b"op": b"netack", b"address": b"10.214.0.2", b"req": req}

    w = Listeners(ask, told.append)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert datagram(os.getpid(), fd_inode(os.getpid(), s.fileno())) == ("127.0.0.1", port)
        call, _buf = _bind_call(s.fileno(), port)
        assert bind_port(os.getpid(), call.args[1], call.args[2]) == port
        assert w.on_syscall(call) == Allow(observe_result=True)
        assert w.on_result(call, 0) is None
        record = channel.decode(asked[0])
        assert (record[b"op"], record[b"proto"], record[b"local"]) == (
            OP_LISTEN, b"udp", b"127.0.0.1")  # fmt: skip
        assert record[b"port"] == str(port).encode()
        fd = s.fileno()
        assert w.on_syscall(_call("close", fd)) == Allow(observe_result=True)
    assert w.on_result(_call("close", fd), 0) is None
    (gone,) = [channel.decode(m) for m in told]
    assert (gone[b"op"], gone[b"proto"]) == (OP_UNLISTEN, b"udp") and not w.watched


def test_binds_that_steer_nothing_are_not_reported() -> None:
    asked: list[bytes] = []
    w = Listeners(lambda m, r: asked.append(m) or None, lambda _m: None)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        call, _buf = _bind_call(s.fileno(), 0)  # port 0: an ephemeral port, routed already
        assert w.on_result(call, 0) is None
    with socket.socket() as t:  # TCP: steered at listen, not at bind
        t.bind(("127.0.0.1", 0))
        call, _buf = _bind_call(t.fileno(), t.getsockname()[1])
        assert w.on_result(call, 0) is None
        assert w.on_result(call, -errno.EADDRINUSE) is None
    assert asked == [] and not w.watched


def _connect6(port: int) -> tuple[SyscallCall, ctypes.Array[ctypes.c_char]]:
    raw = socket.AF_INET6.to_bytes(2, "little") + port.to_bytes(2, "big") + bytes(4)
    raw += IN6_LOOPBACK + (7).to_bytes(4, "little")  # a scope id, dropped when mapped
    buf = ctypes.create_string_buffer(raw, len(raw))
    args = (3, ctypes.addressof(buf), len(raw), 0, 0, 0)
    return SyscallCall(os.getpid(), os.getpid(), 0, "connect", args), buf


def test_a_connect_to_ipv6_loopback_with_nothing_here_goes_through_ipv4() -> None:
    w = Listeners(lambda _m, _r: None, lambda _m: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: nothing is on the port here
        call, _buf = _connect6(port)
        decision = w.on_syscall(call)
        assert isinstance(decision, Rewrite) and not decision.observe_result
        mapped = decision.args[1]
        assert isinstance(mapped, bytes) and decision.args[2] == len(mapped) == 28
        assert mapped[2:4] == port.to_bytes(2, "big")
        assert socket.inet_ntop(socket.AF_INET6, mapped[8:24]) == "::ffff:127.0.0.1"
        assert mapped[24:] == bytes(4)
        s.listen(1)  # something listens on the port here: left as it is
        assert w.on_syscall(call) == Allow()
        assert w.on_result(call, 0) is None
    raw = socket.AF_INET.to_bytes(2, "little") + (80).to_bytes(2, "big") + bytes(12)
    buf = ctypes.create_string_buffer(raw, len(raw))
    v4 = SyscallCall(
        os.getpid(), os.getpid(), 0, "connect", (3, ctypes.addressof(buf), 16, 0, 0, 0)
    )
    assert w.on_syscall(v4) == Allow()
