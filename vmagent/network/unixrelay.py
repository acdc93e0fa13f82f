"""AF_UNIX stream sockets between instances' kernels, relayed agent to agent (issue 13).

Binder's side: T tells `op=unixbind` of every path socket a process binds;
the agent keeps (program, path) -> pid and posts it to the OSS
(`oss.network.unix`); `op=unixgone` undoes both.

Connecting side: T asks `op=unixconnect` for a path no socket of its network
namespace is bound to.  The agent asks the OSS, which answers the binder's
agent address, the socket's type, the binder's kernel (boot id) and a
one-use relay ticket minted with the binder's exec key.  The same kernel
(local instances, each its own network namespace) needs no relay: the
connect runs as it is.  Only stream sockets are relayed: a datagram or
seqpacket socket on either end is refused with EOPNOTSUPP (EPROTOTYPE when
the two types differ, as natively).  The agent then `POST /v1/unixrelay`
(`Authorization: DCP-Unix TICKET`, body `{"program", "path"}`, at most
`MAX_BODY` bytes) to the binder's agent, which checks the ticket (its MAC,
expiry, nonce unused, the program and the path's digest) and that one of
its own tracers reported that path for that program, connects to the real
socket (through the binder's root, `/proc/PID/root/PATH`; ECONNREFUSED and
the like go back as `{"errno": E}` with 409), and answers a TCP port and a
one-use 16-byte secret, as migration's page server does.  The connecting
agent connects, sends the secret first (`SECRET_WAIT` to do it, one
connection within `ACCEPT_WAIT`), reads READY, and opens an abstract socket
`\\0dcp-relay-HEX` that only the asking process may connect to (its
SO_PEERCRED pid is checked; anyone else is closed); T runs the program's
connect to it.  From then on both agents copy bytes both ways; an EOF on one
side is a `shutdown(SHUT_WR)` on the other, so EOF crosses too.

The binder's agent connects as root: only to the socket file the binder's
tracer saw at bind (its st_dev/st_ino, the path's last link not followed), so
a program cannot swap its path for a link to another socket.

Not relayed: SCM_RIGHTS (the tracers fail such a `sendmsg` on a relayed
socket with EOPNOTSUPP: both ends' peers are named `\\0dcp-relay-...`),
SCM_CREDENTIALS (the agents read bytes only), SO_PEERCRED (the relaying
agent's), `getpeername` (the relay's abstract name).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import os
import secrets
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from oss.network.unixpaths import path_digest, relay_mac
from vmagent.errors import AgentError
from vmagent.network.reporter import Poster, _program
from vmagent.trace import channel
from vmagent.trace.listeners import OP_NETACK, OP_NETREFUSED
from vmagent.trace.unixsock import (
    MAX_PATH,
    OP_UNIXBIND,
    OP_UNIXCONNECT,
    OP_UNIXGONE,
    OP_UNIXRELAY,
    RELAY_PREFIX,
)

if TYPE_CHECKING:
    from vmagent.exec.session import Session

log = logging.getLogger(__name__)

MAX_BODY = 4096  # bytes of a relay request
CALL_TIMEOUT = 10.0  # s for the binder's agent to answer
ACCEPT_WAIT = 10.0  # s a relay end waits for its one connection
SECRET_WAIT = 2.0  # s a connection to the relay port may take to send the secret
READY = b"\x01"
CHUNK = 1 << 16
MAX_TICKET_LIFE = 30_000  # ms: a ticket living longer was not minted by our OSS
NONCES = 4096  # tickets remembered as used (expired ones are dropped first)


class RelayRefused(AgentError):
    """the relay was refused"""


class RelayTickets:
    """The binder's side: relay tickets checked with this agent's exec key, each used once."""

    def __init__(
        self, exec_key: str | None, instance: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._key = exec_key
        self._instance = instance
        self._clock = clock
        self._used: dict[str, int] = {}

    def check(self, ticket: str, program: str, path: str) -> None:
        """RelayRefused unless `ticket` lets its bearer reach `path` of `program` now."""
        parts = ticket.split(".")
        if self._key is None or len(parts) != 6 or parts[0] != "u1":
            raise RelayRefused("malformed relay ticket")
        if not parts[2].isdigit() or len(parts[2]) > 15:
            raise RelayRefused("malformed relay ticket")
        public = ".".join(parts[:5])
        if not hmac.compare_digest(parts[5], relay_mac(self._key, self._instance, public)):
            raise RelayRefused(f"relay ticket not valid for {self._instance}")
        if parts[3] != program or parts[4] != path_digest(path):
            raise RelayRefused("the relay ticket is for another socket")
        now, expiry = int(self._clock() * 1000), int(parts[2])
        if expiry < now:
            raise RelayRefused("relay ticket expired")
        if expiry - now > MAX_TICKET_LIFE:
            raise RelayRefused("relay ticket lives too long")
        self._used = {n: e for n, e in self._used.items() if e >= now}
        if parts[1] in self._used or len(self._used) >= NONCES:
            raise RelayRefused("relay ticket already used")
        self._used[parts[1]] = expiry


class UnixRelay:
    """Session hooks for `op=unixbind/unixgone/unixconnect`; the relay's both ends."""

    def __init__(self, instance: str, exec_key: str | None, oss: Poster | None) -> None:
        self.oss = oss
        self.tickets = RelayTickets(exec_key, instance)
        # (program, path) -> (binder pid, st_dev, st_ino of the socket file it bound)
        self.bound: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._by_session: dict[bytes, set[tuple[str, str]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._socks: set[socket.socket] = set()
        self._http: aiohttp.ClientSession | None = None
        self.boot = boot_id()

    # -- session hooks ------------------------------------------------------------------

    def started(self, session: Session) -> None:
        """Nothing."""

    def output(self, session: Session, fd: int, data: bytes) -> None:
        """Nothing."""

    def ended(self, session: Session, status: int) -> None:
        """Forget the session's sockets (the OSS forgets them with the program)."""
        for key in self._by_session.pop(session.sid, set()):
            self.bound.pop(key, None)
            self._spawn(self._post_bind(key[0], key[1], 0, "stream", False))

    def trace_message(self, session: Session, record: dict[bytes, bytes]) -> None:
        """A bind, an end or a connect of a path socket, from the session's tracer."""
        op = record.get(b"op")
        if op in (OP_UNIXBIND, OP_UNIXGONE, OP_UNIXCONNECT):
            self._spawn(self._on_record(session, record))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_record(self, session: Session, record: dict[bytes, bytes]) -> None:
        op, req = record[b"op"], record.get(b"req", b"")
        answer = channel.encode(OP_NETACK, req=req)
        program = _program(session)
        try:
            pid = channel.number(record, b"pid")
            path = record.get(b"path", b"").decode()
            kind = record.get(b"kind", b"stream").decode()
            if not path.startswith("/") or len(path) > MAX_PATH or "\0" in path:
                raise channel.ChannelError(f"bad socket path {path!r}")
        except (channel.ChannelError, UnicodeDecodeError) as exc:
            log.warning("session %s: %s", session.sid.hex()[:8], exc)
            self._answer(session, op, answer)
            return
        try:
            if op == OP_UNIXBIND:
                file = (channel.number(record, b"dev"), channel.number(record, b"ino"))
                answer = await self._bind(session, program, req, (pid, *file), path, kind)
            elif op == OP_UNIXGONE:
                self.bound.pop((program, path), None)
                self._by_session.get(session.sid, set()).discard((program, path))
                if program:
                    await self._post_bind(program, path, pid, kind, False)
            else:
                answer = await self._connect(program, req, pid, path, kind)
        except channel.ChannelError as exc:
            log.warning("session %s: %s", session.sid.hex()[:8], exc)
        self._answer(session, op, answer)

    @staticmethod
    def _answer(session: Session, op: bytes, answer: bytes) -> None:
        if op != OP_UNIXGONE:
            sock = getattr(session, "trace_sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.send(answer)

    async def _bind(
        self,
        session: Session,
        program: str,
        req: bytes,
        held: tuple[int, int, int],
        path: str,
        kind: str,
    ) -> bytes:
        if not program:
            return channel.encode(OP_NETACK, req=req)
        status = await self._post_bind(program, path, held[0], kind, True)
        if status == 409:
            return channel.encode(OP_NETREFUSED, req=req, errno=errno.EADDRINUSE)
        self.bound[(program, path)] = held
        self._by_session.setdefault(session.sid, set()).add((program, path))
        return channel.encode(OP_NETACK, req=req)

    async def _post_bind(self, program: str, path: str, pid: int, kind: str, opened: bool) -> int:
        if self.oss is None:
            return 0
        body = dict(path=path, pid=pid, kind=kind or "stream", boot=self.boot, open=opened)
        try:
            status, _data = await self.oss.post(
                f"/v1/agents/programs/{program}/network/unix", body
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info("the OSS did not take a unix socket report: %s", exc or "timeout")
            return 0
        return status

    # -- the connecting side ------------------------------------------------------------

    async def _connect(self, program: str, req: bytes, pid: int, path: str, kind: str) -> bytes:
        """The relay for a connect of `pid` to `path`, or why not."""
        if not program or self.oss is None:
            return channel.encode(OP_NETACK, req=req)
        try:
            status, offer = await self.oss.post(
                f"/v1/agents/programs/{program}/network/unix/connect", {"path": path}
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info("the OSS did not answer a unix connect: %s", exc or "timeout")
            return channel.encode(OP_NETACK, req=req)
        if status != 200 or not isinstance(offer, dict) or (
            self.boot and offer.get("boot") == self.boot
        ):
            # Bound nowhere else, or on this kernel (local instances: the connect reaches
            # it natively from any network namespace, SCM_RIGHTS included).
            return channel.encode(OP_NETACK, req=req)
        theirs = str(offer.get("kind", ""))
        if kind != "stream" or theirs != "stream":
            refused = errno.EPROTOTYPE if kind != theirs else errno.EOPNOTSUPP
            return channel.encode(OP_NETREFUSED, req=req, errno=refused)
        try:
            link = await self._reach(str(offer["address"]), str(offer["ticket"]), program, path)
        except RelayRefused as exc:
            err = exc.args[1] if len(exc.args) > 1 else errno.ECONNREFUSED
            log.info("unix relay to %s refused: %s", path, exc.args[0])
            return channel.encode(OP_NETREFUSED, req=req, errno=err)
        except KeyError:
            return channel.encode(OP_NETACK, req=req)
        name = secrets.token_hex(16)
        end = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            end.bind(b"\0" + RELAY_PREFIX + name.encode())
            end.listen(4)
            end.setblocking(False)
        except OSError as exc:
            end.close()
            link.close()
            log.warning("no relay socket: %s", exc)
            return channel.encode(OP_NETREFUSED, req=req, errno=errno.ECONNREFUSED)
        self._spawn(self._take(end, link, pid))
        return channel.encode(OP_UNIXRELAY, req=req, name=name)

    async def _reach(self, address: str, ticket: str, program: str, path: str) -> socket.socket:
        """A TCP connection to the binder's agent, spliced there to the real socket."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                async with self._http.post(
                    f"http://{address}/v1/unixrelay",
                    json={"program": program, "path": path},
                    headers={"Authorization": f"DCP-Unix {ticket}"},
                ) as resp:
                    offer = await resp.json(content_type=None)
                    if resp.status == 409 and isinstance(offer, dict) and "errno" in offer:
                        raise RelayRefused(str(offer.get("error", "")), int(offer["errno"]))
                    if resp.status != 200 or not isinstance(offer, dict):
                        raise RelayRefused(f"{address} answered {resp.status}")
                port, secret = int(offer["port"]), bytes.fromhex(str(offer["secret"]))
                host = address.rsplit(":", 1)[0].strip("[]")
                family, kind, proto, _n, where = (
                    await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                )[0]
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                await loop.sock_connect(sock, where)
                await loop.sock_sendall(sock, secret)
                if await loop.sock_recv(sock, 1) != READY:
                    raise RelayRefused(f"{address} did not take the relay")
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, TypeError) as exc:
            if sock is not None:
                sock.close()
            raise RelayRefused(f"{address}: {exc or 'timeout'}") from None
        except RelayRefused:
            if sock is not None:
                sock.close()
            raise
        _keepalive(sock)
        return sock

    async def _take(self, end: socket.socket, link: socket.socket, pid: int) -> None:
        """Accept the program's connection (process `pid` only) and splice it to `link`."""
        loop = asyncio.get_running_loop()
        conn: socket.socket | None = None
        try:
            async with asyncio.timeout(ACCEPT_WAIT):
                while conn is None:
                    conn, _peer = await loop.sock_accept(end)
                    if _peer_tgid(conn) != pid:
                        conn.close()
                        conn = None
        except (TimeoutError, OSError) as exc:
            log.info("the program did not take its relay: %s", exc or "timeout")
            link.close()
            return
        finally:
            end.close()
        await self.splice(conn, link)

    # -- the binder's side --------------------------------------------------------------

    async def serve(self, ticket: str, program: str, path: str, host: str) -> dict[str, Any]:
        """Connect to `path` for a relay ticket's bearer; a port and a secret to reach it."""
        self.tickets.check(ticket, program, path)
        held = self.bound.get((program, path))
        if held is None:
            raise RelayRefused(f"{path} is not bound here", errno.ECONNREFUSED)
        real = await self._open(held, path)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind((host, 0))
            listener.listen(1)
            listener.setblocking(False)
        except OSError:
            listener.close()
            real.close()
            raise
        secret = secrets.token_bytes(16)
        self._spawn(self._relay_end(listener, secret, real))
        return {"port": listener.getsockname()[1], "secret": secret.hex()}

    async def _open(self, held: tuple[int, int, int], path: str) -> socket.socket:
        """A connection to the socket at `path` as the binder's root sees it, if it is
        still the socket file the binder's tracer saw (not a link or another file the
        program put there: this agent connects as root)."""
        pid, dev, ino = held
        root = f"/proc/{pid}/root" if os.path.exists(f"/proc/{pid}/root") else ""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            # Named so that the binder's tracer knows the server's end as relayed.
            sock.bind(b"\0" + RELAY_PREFIX + b"peer-" + secrets.token_hex(8).encode())
            fd = os.open(root + path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (dev, ino) or not stat.S_ISSOCK(st.st_mode):
                    raise ConnectionRefusedError(errno.ECONNREFUSED, "not the socket bound")
                async with asyncio.timeout(CALL_TIMEOUT):
                    await asyncio.get_running_loop().sock_connect(sock, f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        except TimeoutError:
            sock.close()
            raise RelayRefused(f"{path}: its backlog stays full", errno.ECONNREFUSED) from None
        except OSError as exc:
            sock.close()
            raise RelayRefused(f"{path}: {exc.strerror}", exc.errno or errno.ECONNREFUSED) from None
        return sock

    async def _relay_end(self, listener: socket.socket, secret: bytes, real: socket.socket) -> None:
        """Take the connecting agent's connection (the secret first), splice it to `real`."""
        loop = asyncio.get_running_loop()
        conn: socket.socket | None = None
        try:
            async with asyncio.timeout(ACCEPT_WAIT):
                while conn is None:
                    conn, _peer = await loop.sock_accept(listener)
                    got = b""
                    with contextlib.suppress(OSError, TimeoutError):
                        async with asyncio.timeout(SECRET_WAIT):
                            while len(got) < len(secret):
                                piece = await loop.sock_recv(conn, len(secret) - len(got))
                                if not piece:
                                    break
                                got += piece
                    if not hmac.compare_digest(got, secret):
                        conn.close()
                        conn = None
            await loop.sock_sendall(conn, READY)
        except (TimeoutError, OSError) as exc:
            log.info("the relay's other end did not come: %s", exc or "timeout")
            real.close()
            if conn is not None:
                conn.close()
            return
        finally:
            listener.close()
        _keepalive(conn)
        await self.splice(real, conn)

    # -- both -----------------------------------------------------------------------------

    async def splice(self, a: socket.socket, b: socket.socket) -> None:
        """Copy both ways until both have ended; an EOF is passed on as SHUT_WR."""
        a.setblocking(False)
        b.setblocking(False)
        self._socks.update((a, b))
        try:
            await asyncio.gather(_copy(a, b), _copy(b, a))
        finally:
            for s in (a, b):
                self._socks.discard(s)
                s.close()

    async def close(self) -> None:
        """Cancel what is in flight; close every relay."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for s in list(self._socks):
            s.close()
        if self._http is not None:
            await self._http.close()


async def _copy(src: socket.socket, dst: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    try:
        while data := await loop.sock_recv(src, CHUNK):
            await loop.sock_sendall(dst, data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        # One side reset: the other gets a reset too (both directions end).
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def boot_id() -> str:
    """This kernel's boot id ("" if unreadable)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:64]
    except OSError:
        return ""


def _keepalive(sock: socket.socket) -> None:
    """A peer instance gone silently ends the relay within minutes, not never."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)


def _peer_tgid(conn: socket.socket) -> int:
    """The process (thread group) at the other end of a unix connection (0: unknown)."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return 0
    pid = struct.unpack("3i", raw)[0]
    return pid


def add_routes(app: web.Application, relay: UnixRelay) -> None:
    """`POST /v1/unixrelay` (a relay ticket in `Authorization: DCP-Unix TICKET`)."""

    async def handler(request: web.Request) -> web.Response:
        scheme, _, ticket = request.headers.get("Authorization", "").partition(" ")
        if scheme != "DCP-Unix" or not ticket or len(ticket) > 256:
            raise web.HTTPUnauthorized(text="missing relay ticket\n")
        if request.content_length is None or request.content_length > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(MAX_BODY, request.content_length or 0)
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                body = json.loads(await request.content.read(MAX_BODY))
            program, path = str(body["program"]), str(body["path"])
        except (TimeoutError, ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text="expected {\"program\": ID, \"path\": PATH}\n") from None
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not isinstance(sockname, tuple):
            raise web.HTTPConflict(text="no relay over a unix socket\n")
        try:
            offer = await relay.serve(ticket, program, path, str(sockname[0]))
        except RelayRefused as exc:
            code = exc.args[1] if len(exc.args) > 1 else errno.EACCES
            return web.json_response({"error": exc.args[0], "errno": code}, status=409)
        except OSError as exc:
            return web.json_response({"error": str(exc), "errno": errno.ECONNREFUSED}, status=409)
        return web.json_response(offer)

    app.router.add_post("/v1/unixrelay", handler)
