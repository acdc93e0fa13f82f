"""AF_UNIX path sockets between kernels (issue 13): the tracer's side on real sockets,
the OSS's registry and tickets, and the agents' relay spliced over real TCP and unix
sockets (the OSS's answer is the one fake: the tickets in it are minted for real)."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import socket
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from oss.embedded import EmbeddedCoordinator
from oss.errors import Conflict
from oss.network.unixpaths import Bound, UnixPaths, mint_relay_ticket
from oss.storage.pathmap import PathMap
from tracer.arch import table_for
from tracer.coordinator import Allow, Complete, Rewrite, SyscallCall
from vmagent.network.unixrelay import (
    RelayRefused,
    RelayTickets,
    UnixRelay,
    add_routes,
    boot_id,
)
from vmagent.trace import channel
from vmagent.trace import unixsock as U
from vmagent.trace.listeners import (
    OP_NETACK,
    OP_NETREFUSED,
    ChannelRequest,
    Listeners,
    trap_relayed,
)
from vmagent.trace.placing import InstanceCoordinator

KEY, INSTANCE, PROGRAM = "k" * 64, "vm1", "p1"


def _sockaddr(name: bytes) -> tuple[int, ctypes.Array[ctypes.c_char]]:
    raw = socket.AF_UNIX.to_bytes(2, "little") + name + b"\0"
    buf = ctypes.create_string_buffer(raw, len(raw))
    return len(raw), buf


def _call(
    name: str, fd: int, buf: ctypes.Array[ctypes.c_char] | None = None, size: int = 0
) -> SyscallCall:
    addr = ctypes.addressof(buf) if buf is not None else 0
    return SyscallCall(os.getpid(), os.getpid(), 0, name, (fd, addr, size, 0, 0, 0))


def test_a_ticket_reaches_one_socket_of_one_program_once() -> None:
    now = 1_000_000.0
    tickets = RelayTickets(KEY, INSTANCE, clock=lambda: now)
    ticket = mint_relay_ticket(KEY, INSTANCE, PROGRAM, "/srv/a.sock", now=now)
    for program, path in ((PROGRAM, "/srv/b.sock"), ("p2", "/srv/a.sock")):
        with pytest.raises(RelayRefused, match="another socket"):
            tickets.check(ticket, program, path)
    with pytest.raises(RelayRefused, match="not valid for vm2"):
        RelayTickets(KEY, "vm2", clock=lambda: now).check(ticket, PROGRAM, "/srv/a.sock")
    with pytest.raises(RelayRefused, match="not valid"):
        RelayTickets("x" * 64, INSTANCE, clock=lambda: now).check(ticket, PROGRAM, "/srv/a.sock")
    with pytest.raises(RelayRefused, match="expired"):
        RelayTickets(KEY, INSTANCE, clock=lambda: now + 60).check(ticket, PROGRAM, "/srv/a.sock")
    tickets.check(ticket, PROGRAM, "/srv/a.sock")
    with pytest.raises(RelayRefused, match="already used"):
        tickets.check(ticket, PROGRAM, "/srv/a.sock")
    with pytest.raises(RelayRefused, match="malformed"):
        RelayTickets(None, INSTANCE).check(ticket, PROGRAM, "/srv/a.sock")  # no exec key


def test_the_oss_keeps_one_instance_per_path_until_it_is_gone() -> None:
    paths = UnixPaths()
    paths.bind(PROGRAM, "/srv/a.sock", Bound("vm1", 10, "stream"))
    with pytest.raises(Conflict):
        paths.bind(PROGRAM, "/srv/a.sock", Bound("vm2", 11, "stream"))
    paths.bind("p2", "/srv/a.sock", Bound("vm2", 11, "stream"))  # another program's
    # Two instances of one kernel share the file: the last bind has it, as natively.
    paths.bind("p3", "/srv/a.sock", Bound("vm1", 10, "stream", "b1"))
    paths.bind("p3", "/srv/a.sock", Bound("vm2", 12, "stream", "b1"))
    assert paths.find("p3", "/srv/a.sock") == Bound("vm2", 12, "stream", "b1")
    paths.unbind(PROGRAM, "/srv/a.sock", "vm2")  # not vm2's: kept
    assert paths.find(PROGRAM, "/srv/a.sock") == Bound("vm1", 10, "stream")
    paths.lost("vm2")
    assert paths.find("p2", "/srv/a.sock") is None
    paths.release(PROGRAM)
    assert paths.find(PROGRAM, "/srv/a.sock") is None


def test_a_bind_is_told_and_a_connect_elsewhere_asks_for_a_relay(tmp_path: Path) -> None:
    asked: list[dict[bytes, bytes]] = []
    told: list[bytes] = []
    answers: dict[bytes, dict[bytes, bytes]] = {
        U.OP_UNIXBIND: {b"op": b"netack"},
        U.OP_UNIXCONNECT: {b"op": U.OP_UNIXRELAY, b"name": b"ab12"},
    }

    def ask(message: bytes, req: bytes) -> dict[bytes, bytes]:
        record = channel.decode(message)
        asked.append(record)
        return {**answers[record[b"op"]], b"req": req}

    w = Listeners(ask, told.append)
    here = tmp_path / "here.sock"
    with socket.socket(socket.AF_UNIX) as s:
        size, buf = _sockaddr(str(here).encode())
        s.bind(str(here))
        assert w.on_result(_call("bind", s.fileno(), buf, size), 0) is None
        assert asked[-1][b"op"] == U.OP_UNIXBIND and asked[-1][b"path"] == str(here).encode()
        assert asked[-1][b"kind"] == b"stream"
        assert int(asked[-1][b"ino"]) == os.stat(here).st_ino
        s.listen(1)
        # A connect to a path bound on this kernel runs as it is, without asking.
        with socket.socket(socket.AF_UNIX) as c:
            assert w.on_syscall(_call("connect", c.fileno(), buf, size)) == Allow()
            assert len(asked) == 1
            # One bound nowhere here is asked about and run against the agent's relay.
            size2, buf2 = _sockaddr(str(tmp_path / "there.sock").encode())
            decided = w.on_syscall(_call("connect", c.fileno(), buf2, size2))
            assert asked[-1][b"op"] == U.OP_UNIXCONNECT
            address = U.relay_address(b"ab12")
            assert decided == Rewrite({1: address, 2: len(address)})
            answers[U.OP_UNIXCONNECT] = {b"op": OP_NETREFUSED, b"errno": b"95"}
            decided = w.on_syscall(_call("connect", c.fileno(), buf2, size2))
            assert decided == Complete(-errno.EOPNOTSUPP)
            # Abstract names belong to the namespace: never asked about.
            size3, buf3 = _sockaddr(b"\0abstract")
            assert w.on_syscall(_call("connect", c.fileno(), buf3, size3)) == Allow()
            assert len(asked) == 3
        fd = s.fileno()
        assert w.on_syscall(_call("close", fd)) == Allow(observe_result=True)
    assert w.on_result(_call("close", fd), 0) is None
    gone = channel.decode(told[-1])
    assert gone[b"op"] == U.OP_UNIXGONE and gone[b"path"] == str(here).encode()
    assert not w.watched


class _Oss:
    """The OSS's answer to a connect: the binder's agent and a real ticket."""

    def __init__(self, address: str, kind: str = "stream", boot: str = "another") -> None:
        self.address, self.kind, self.boot = address, kind, boot

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        ticket = mint_relay_ticket(KEY, INSTANCE, PROGRAM, body["path"])
        return 200, {"instance": INSTANCE, "address": self.address, "kind": self.kind,
                     "boot": self.boot, "ticket": ticket}  # fmt: skip


def _echo_upper(server: socket.socket) -> None:
    conn, _ = server.accept()
    with conn:
        got = b""
        while data := conn.recv(65536):
            got += data
        conn.sendall(got.upper() + b"bye\n")


def test_the_relay_carries_bytes_and_eofs_both_ways(tmp_path: Path) -> None:
    path = str(tmp_path / "srv.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    echo = threading.Thread(target=_echo_upper, args=(server,), daemon=True)
    echo.start()
    payload = b"ping\n" + b"x" * 300_000

    def client(name: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(30)
            c.connect(b"\0" + U.RELAY_PREFIX + name)
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            got = b""
            while data := c.recv(65536):
                got += data
            return got

    async def main() -> None:
        binder = UnixRelay(INSTANCE, KEY, None)
        st = os.stat(path)
        binder.bound[(PROGRAM, path)] = (os.getpid(), st.st_dev, st.st_ino)
        # A path the program replaced after its bind (here: by a link to another
        # socket) is not followed by the binder's agent, which connects as root.
        other = str(tmp_path / "other.sock")
        decoy = socket.socket(socket.AF_UNIX)
        decoy.bind(other)
        decoy.listen(1)
        with socket.socket(socket.AF_UNIX) as was:
            was.bind(path + ".link")
            st = os.stat(path + ".link")
            binder.bound[(PROGRAM, path + ".link")] = (os.getpid(), st.st_dev, st.st_ino)
        os.unlink(path + ".link")
        os.symlink(other, path + ".link")
        app = web.Application()
        add_routes(app, binder)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        asker = UnixRelay("vm2", "y" * 64, _Oss(f"127.0.0.1:{port}"))
        try:
            answer = channel.decode(
                await asker._connect(PROGRAM, b"u1", os.getpid(), path, "stream")
            )
            assert answer[b"op"] == U.OP_UNIXRELAY, answer
            got = await asyncio.to_thread(client, answer[b"name"])
            assert got == payload.upper() + b"bye\n"
            # A path the binder's tracer did not report is not reached: ECONNREFUSED.
            answer = channel.decode(
                await asker._connect(PROGRAM, b"u2", os.getpid(), path + "x", "stream")
            )
            assert answer[b"op"] == OP_NETREFUSED and answer[b"errno"] == b"111", answer
            answer = channel.decode(
                await asker._connect(PROGRAM, b"u5", os.getpid(), path + ".link", "stream")
            )
            assert answer[b"op"] == OP_NETREFUSED and answer[b"errno"] == b"111", answer
            decoy.setblocking(False)
            with pytest.raises(BlockingIOError):
                decoy.accept()  # nobody came
            # A socket bound on this kernel (local instances): connected as it is.
            same = UnixRelay("vm2", None, _Oss(f"127.0.0.1:{port}", "dgram", boot_id()))
            answer = channel.decode(await same._connect(PROGRAM, b"u6", 1, path, "dgram"))
            assert answer[b"op"] == b"netack", answer
            # Datagram sockets do not cross kernels.
            dgram = UnixRelay("vm2", None, _Oss(f"127.0.0.1:{port}", "dgram"))
            answer = channel.decode(await dgram._connect(PROGRAM, b"u3", 1, path, "dgram"))
            assert answer[b"errno"] == str(errno.EOPNOTSUPP).encode()
            answer = channel.decode(await dgram._connect(PROGRAM, b"u4", 1, path, "stream"))
            assert answer[b"errno"] == str(errno.EPROTOTYPE).encode()
        finally:
            await asker.close()
            await binder.close()
            await runner.cleanup()
            decoy.close()

    try:
        asyncio.run(main())
    finally:
        server.close()
        echo.join(timeout=30)


def _msghdr(with_fd: bool) -> tuple[int, list[Any]]:
    """A msghdr in this process's memory (SCM_RIGHTS of fd 0, or SCM_CREDENTIALS)."""
    kind = 1 if with_fd else 2
    body = (0).to_bytes(4, "little") if with_fd else bytes(12)
    cmsg = (16 + len(body)).to_bytes(8, "little") + (1).to_bytes(4, "little")
    cmsg += kind.to_bytes(4, "little") + body
    control = ctypes.create_string_buffer(cmsg, len(cmsg))
    data = ctypes.create_string_buffer(b"x", 1)
    iov = ctypes.create_string_buffer(
        ctypes.addressof(data).to_bytes(8, "little") + (1).to_bytes(8, "little"), 16
    )
    head = bytes(16) + ctypes.addressof(iov).to_bytes(8, "little") + (1).to_bytes(8, "little")
    head += ctypes.addressof(control).to_bytes(8, "little") + len(cmsg).to_bytes(8, "little")
    head += bytes(8)
    msg = ctypes.create_string_buffer(head, len(head))
    return ctypes.addressof(msg), [msg, control, data, iov]


def test_descriptors_sent_on_a_relayed_socket_fail_with_eopnotsupp() -> None:
    w = Listeners(lambda _m, _r: None, lambda _m: None)
    relay = socket.socket(socket.AF_UNIX)
    relay.bind(b"\0" + U.RELAY_PREFIX + os.urandom(8).hex().encode())
    relay.listen(1)
    with relay, socket.socket(socket.AF_UNIX) as c:
        c.connect(relay.getsockname())
        with_fd, kept = _msghdr(True)
        plain, kept2 = _msghdr(False)
        call = _call("sendmsg", c.fileno())._replace(args=(c.fileno(), with_fd, 0, 0, 0, 0))
        assert w.on_syscall(call) == Complete(-errno.EOPNOTSUPP)
        call = _call("sendmsg", c.fileno())._replace(args=(c.fileno(), plain, 0, 0, 0, 0))
        assert w.on_syscall(call) == Allow()  # credentials only: nothing to refuse
        # sendmmsg: the second message carries a descriptor (struct mmsghdr: 64 bytes).
        head = ctypes.string_at(plain, 56) + bytes(8) + ctypes.string_at(with_fd, 56) + bytes(8)
        vec = ctypes.create_string_buffer(head, len(head))
        call = _call("sendmmsg", c.fileno())._replace(
            args=(c.fileno(), ctypes.addressof(vec), 2, 0, 0, 0)
        )
        assert w.on_syscall(call) == Complete(-errno.EOPNOTSUPP)
        call = call._replace(args=(c.fileno(), ctypes.addressof(vec), 1, 0, 0, 0))
        assert w.on_syscall(call) == Allow()
    a, b = socket.socketpair()
    with a, b:  # not a relay: descriptors pass as natively
        call = _call("sendmsg", a.fileno())._replace(args=(a.fileno(), with_fd, 0, 0, 0, 0))
        assert w.on_syscall(call) == Allow()
    del kept, kept2


def test_sendmsg_is_trapped_only_where_a_relay_can_exist() -> None:
    table = table_for("x86_64")
    coordinator = InstanceCoordinator(EmbeddedCoordinator(table, PathMap({})), print)
    assert "sendmsg" in coordinator.interception()
    trap_relayed(False)  # an agent of a dcptrace run's own OSS: one kernel
    try:
        coordinator = InstanceCoordinator(EmbeddedCoordinator(table, PathMap({})), print)
        assert not {"sendmsg", "sendmmsg"} & coordinator.interception()
        assert "connect" in coordinator.interception()
    finally:
        trap_relayed(True)


def test_a_command_arriving_while_t_waits_for_a_relay_is_kept() -> None:
    ours, agent = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kept: list[bytes] = []
    with ours, agent:
        ask = ChannelRequest(lambda: ours, 5.0, keep=kept.append)
        detach = channel.encode(b"detach", session="s")
        channel.send(agent, detach)
        channel.send(agent, channel.encode(OP_NETACK, req="u0"))  # a late answer: dropped
        channel.send(agent, channel.encode(U.OP_UNIXRELAY, req="u1", name="ab"))
        answer = ask(U.connect_record(1, 1, "/x", "stream"), b"u1")
        assert answer is not None and answer[b"name"] == b"ab"
        assert kept == [detach]
        assert channel.decode(agent.recv(4096))[b"op"] == U.OP_UNIXCONNECT


def test_the_relay_route_bounds_and_checks_before_connecting(tmp_path: Path) -> None:
    path = str(tmp_path / "srv.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(1)
        server.setblocking(False)

        async def main() -> dict[str, int]:
            binder = UnixRelay(INSTANCE, KEY, None)
            st = os.stat(path)
            binder.bound[(PROGRAM, path)] = (os.getpid(), st.st_dev, st.st_ino)
            app = web.Application()
            add_routes(app, binder)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/unixrelay"
            body = {"program": PROGRAM, "path": path}
            good = mint_relay_ticket(KEY, INSTANCE, PROGRAM, path)
            forged = mint_relay_ticket("z" * 64, INSTANCE, PROGRAM, path)
            out: dict[str, int] = {}
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(30)) as http:
                    async with http.post(url, json=body) as r:
                        out["no ticket"] = r.status
                    big = {**body, "pad": "x" * 8192}
                    headers = {"Authorization": f"DCP-Unix {good}"}
                    async with http.post(url, json=big, headers=headers) as r:
                        out["big"] = r.status
                    headers = {"Authorization": f"DCP-Unix {forged}"}
                    async with http.post(url, json=body, headers=headers) as r:
                        out["forged"] = (await r.json())["errno"]
            finally:
                await binder.close()
                await runner.cleanup()
            return out

        assert asyncio.run(main()) == {"no ticket": 401, "big": 413, "forged": errno.EACCES}
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing reached the socket


def test_the_path_table_outlives_the_oss(tmp_path: Path) -> None:
    """A restarted OSS still knows where each path is bound (rows of its real store):
    binds, an unbind, a lost instance and an ended program are all as they were."""
    from oss.db.store import Store
    from oss.schema import VERSIONS

    async def before() -> None:
        store = Store(tmp_path / "data", VERSIONS)
        await store.open()
        paths = UnixPaths(store)
        paths.bind(PROGRAM, "/srv/a.sock", Bound("vm1", 10, "stream", "b1"))
        paths.bind(PROGRAM, "/srv/b.sock", Bound("vm1", 11, "dgram"))
        paths.bind(PROGRAM, "/srv/c.sock", Bound("vm2", 12, "seqpacket"))
        paths.bind("p2", "/srv/a.sock", Bound("vm3", 13, "stream"))
        paths.bind("p3", "/srv/a.sock", Bound("vm1", 14, "stream"))
        paths.unbind(PROGRAM, "/srv/b.sock", "vm1")
        paths.lost("vm2")
        paths.release("p3")
        await paths.flush()
        await store.close()

    async def after() -> UnixPaths:
        store = Store(tmp_path / "data", VERSIONS)
        await store.open()
        paths = UnixPaths(store)
        assert await paths.load() == 2
        await store.close()
        return paths

    asyncio.run(before())
    paths = asyncio.run(after())
    assert paths.find(PROGRAM, "/srv/a.sock") == Bound("vm1", 10, "stream", "b1")
    assert paths.find("p2", "/srv/a.sock") == Bound("vm3", 13, "stream")
    for program, path in (
        (PROGRAM, "/srv/b.sock"),
        (PROGRAM, "/srv/c.sock"),
        ("p3", "/srv/a.sock"),
    ):
        assert paths.find(program, path) is None
    with pytest.raises(Conflict):  # held on vm1 still, for a bind elsewhere
        paths.bind(PROGRAM, "/srv/a.sock", Bound("vm4", 20, "stream"))
