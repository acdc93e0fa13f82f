"""The exec side of the agent's port: deputy connections and the sessions they open.

One TCP port serves two protocols: `Sniffer` reads a connection's first bytes and
hands it to `ExecProtocol` if they are `protocol.MAGIC`, to aiohttp otherwise.
Until it authenticates, a connection is bounded by a `Gate` (a deadline and a
count shared by every such connection).  `ExecProtocol` runs the exec handshake
(AUTH, CHALLENGE, PROOF: deputy and agent prove to each other that they hold the
ticket's secret), then passes frames to its `Session`.  `ExecService` holds every
session of the agent: it opens one on HELLO (or attaches a resume to it), reaps
the children (the agent is a subreaper) and kills a program whose deputy never
returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import logging
import os
import secrets
import signal
import socket
import weakref
from collections.abc import Callable

from oss.compute import exectickets
from vmagent.config import AgentConfig
from vmagent.errors import AgentError, AuthError, BadRequest
from vmagent.exec import protocol as P
from vmagent.exec import tickets
from vmagent.exec.hooks import HookList
from vmagent.exec.readers import ReaderProbe
from vmagent.exec.session import Session
from vmagent.exec.spawn import GateClosed, become_subreaper, bind, parse_hello
from vmagent.exec.tickets import Grant, TicketCheck
from vmagent.trace.zygote import TracerUnavailable, Tracing

log = logging.getLogger(__name__)

WRITE_HIGH = 4 << 20  # transport buffer before the agent stops reading program output
HANDSHAKE_TIMEOUT = 5.0  # s an unauthenticated exec connection may take to authenticate
HTTP_LIFETIME = 30.0  # s any HTTP connection may stay open (the API's calls are short)
MAX_UNAUTHENTICATED = 128  # concurrent connections that have not authenticated yet


class ExecProtocol(asyncio.Protocol):
    """One deputy connection (after the MAGIC bytes).

    Before anything else the deputy and the agent prove to each other that they
    hold the ticket's secret T (AUTH, CHALLENGE, PROOF); until then only small
    frames are accepted and the connection lives at most HANDSHAKE_TIMEOUT.
    """

    def __init__(self, service: ExecService, gate: Gate | None = None) -> None:
        self.service = service
        self.gate = gate
        self.parser = P.FrameParser(P.PRE_AUTH_MAX)
        self.session: Session | None = None
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self._skip = len(P.MAGIC)
        self.grant: Grant | None = None  # the ticket shown in AUTH
        self._secret = ""
        self._challenge = b""
        self.authenticated = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, P.KEEPALIVE_IDLE)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, P.KEEPALIVE_INTVL)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, P.KEEPALIVE_CNT)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._skip:
            cut = min(self._skip, len(data))
            data = data[cut:]
            self._skip -= cut
        parser = self.parser
        parser.push(data)
        try:
            while (got := parser.next()) is not None:
                kind, fd, seq, payload = got
                if self.session is not None:
                    self.session.on_frame(kind, fd, seq, payload)
                elif not self.authenticated:
                    self._handshake(kind, payload)
                else:
                    assert self.grant is not None
                    self.session = self.service.open(self, kind, fd, seq, payload, self.grant)
                if self.transport is None or self.transport.is_closing():
                    return
            if not self.authenticated and parser.pending() > P.PRE_AUTH_MAX + P.HEADER_SIZE:
                raise P.FrameError("too much data before authentication")
        except AgentError as exc:
            self.refuse(str(exc))
        except P.FrameError as exc:
            self.refuse(f"protocol error: {exc}")

    def _handshake(self, kind: int, payload: bytes) -> None:
        """AUTH -> answer with our proof and a challenge; PROOF -> authenticated."""
        if kind == P.AUTH and self.grant is None:
            items = P.unrecord(payload)
            if len(items) != 2 or len(items[1]) != P.NONCE_SIZE:
                raise BadRequest("malformed AUTH frame")
            self.grant, self._secret = self.service.tickets.secret(
                items[0].decode("ascii", errors="replace")
            )
            moved = self.service.moved.get(self.grant.nonce)
            if moved is not None:  # a session that moved here (vmagent.checkpoint)
                self._secret = moved
            self._challenge = secrets.token_bytes(P.NONCE_SIZE)
            mine = tickets.proof(self._secret, b"agent", items[1])
            self.write(P.frame(P.CHALLENGE, 0, P.record([mine, self._challenge])))
        elif kind == P.PROOF and self.grant is not None:
            items = P.unrecord(payload)
            want = tickets.proof(self._secret, b"deputy", self._challenge)
            if len(items) != 1 or not hmac.compare_digest(items[0], want):
                raise AuthError("exec ticket not valid for this instance")
            self.authenticated = True
            self.parser.limit = P.MAX_PAYLOAD
            if self.gate is not None:
                self.gate.settle()
        else:
            raise BadRequest(f"expected the exec handshake, got frame kind {kind}")

    def refuse(self, message: str) -> None:
        """Send ERROR and hang up (bad ticket, malformed request)."""
        log.warning("refused exec connection: %s", message)
        self.write(P.frame(P.ERROR, 0, message.encode()))
        self.close()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.session is not None:
            self.session._flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.session is not None:
            self.session._flow()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.gate is not None:
            self.gate.settle()
        if self.session is not None:
            self.session.detach(self)


def program_of(grant: Grant) -> str | None:
    """The OSS program an exec ticket vouches for (None: a ticket of no program)."""
    return grant.program if grant.program not in ("", exectickets.NO_PROGRAM) else None


class ExecService:
    """All sessions of this agent; reaps children (the agent is a subreaper)."""

    def __init__(self, config: AgentConfig, tickets: TicketCheck, tracing: Tracing | None) -> None:
        self.config = config
        self.tickets = tickets
        # Every program runs under an instance tracer; None only for a benchmark's
        # untraced baseline (never reachable from the command line).
        self.tracing = tracing
        self.hooks = HookList()  # other agent services observe sessions through this
        self.sessions: dict[bytes, Session] = {}
        self.by_pid: dict[int, Session] = {}
        self.by_nonce: dict[str, Session] = {}  # ticket nonce -> the session it started
        self.probe = ReaderProbe(os.uname().machine)
        self.counts = {"started": 0, "exited": 0, "signaled": 0, "failed": 0, "abandoned": 0}
        # Helpers the agent runs as its own children (criu): their wait status goes
        # to these futures, since the reaper below collects every child.
        self.children: dict[int, asyncio.Future[int]] = {}
        # Sessions that moved here from another instance: ticket nonce -> the key
        # their deputy now proves (derived from its ticket's secret on each move).
        self.moved: dict[str, str] = {}

    def install(self) -> None:
        """Reap children on SIGCHLD (call from the running loop)."""
        with contextlib.suppress(OSError):
            become_subreaper()
        asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, self.reap)

    def reap(self) -> None:
        """Collect every exited child; orphans re-parented to us are just reaped."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.tracing is not None and pid == self.tracing.pid:
                if not self.tracing.closed:
                    log.warning("the instance tracer's zygote (pid %d) died", pid)
                continue  # replaced at the next session (which is refused meanwhile)
            waiter = self.children.pop(pid, None)
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(status)
                continue
            session = self.by_pid.pop(pid, None)
            if session is not None:
                session.exited(status)

    def open(
        self,
        proto: ExecProtocol,
        kind: int,
        fd: int,
        seq: int,
        payload: bytes,
        grant: Grant,
    ) -> Session:
        """Handle the first frame after the handshake: HELLO or RESUME.

        A session resumes only over a connection authenticated with the ticket
        that started it: its id alone is not a credential.  A HELLO marked
        AGAIN whose ticket already started a live session is the same deputy
        again (only it holds the ticket's secret), whose first connection was
        cut before our WELCOME reached it (a handshake deadline under load): it
        is attached to that session, with `seq` the last frame it received.
        The program is never started twice; an unmarked HELLO of a used ticket
        is refused as before.
        """
        if kind == P.RESUME:
            session = self.sessions.get(payload)
            if session is None or session.forgotten or session.nonce != grant.nonce:
                raise AuthError("no such session (it ended or was abandoned)")
            session.attach(proto, seq)
            return session
        if kind != P.HELLO:
            raise BadRequest(f"expected HELLO or RESUME, got frame kind {kind}")
        again = self.by_nonce.get(grant.nonce) if fd == P.AGAIN else None
        if again is not None and not again.forgotten:
            log.info("deputy of session=%s said HELLO again: attached", again.sid.hex()[:8])
            again.attach(proto, seq)
            return again
        request = bind(parse_hello(payload), grant)
        self.tickets.burn(grant)
        program = os.fsdecode(request.argv[0])
        session = Session(self, secrets.token_bytes(16), request, program)
        session.nonce = grant.nonce
        session.program_id = program_of(grant)
        if request.view is not None:  # the ticket vouched for it: the tracer applies it
            session.view = request.view.encode()
        session.key = proto._secret
        self.sessions[session.sid] = session
        self.by_nonce[grant.nonce] = session
        session.attach(proto, 0)
        try:
            session.start()
        except GateClosed as exc:  # refused before the hand-off (Yama gate)
            self.counts["failed"] += 1
            log.warning("%s not started: %s", program, exc)
            session.fail(exc.errno, str(exc), exc.status)
            return session
        except TracerUnavailable:
            self.counts["failed"] += 1
            self.forget(session)
            raise
        except OSError as exc:
            self.counts["failed"] += 1
            session.fail(exc.errno or errno.EIO, f"cannot set up descriptors: {exc.strerror}")
            return session
        except Exception as exc:  # never leave a half-started session registered
            self.counts["failed"] += 1
            self.forget(session)
            raise BadRequest(f"cannot start the program: {exc}") from exc
        # Forked: the session sends STARTED (or EXIT kind=error) once the exec settles.
        self.by_pid[session.pid] = session
        return session

    def finished(self, session: Session, kind: str, value: int) -> None:
        self.counts["signaled" if kind == "signal" else "exited"] += 1
        log.info("%s pid=%d ended: %s %d", session.program, session.pid, kind, value)

    def forget(self, session: Session) -> None:
        """The deputy has the exit status: drop the session."""
        session.forgotten = True
        session.close_fds()
        self.sessions.pop(session.sid, None)
        if self.by_nonce.get(session.nonce) is session:
            del self.by_nonce[session.nonce]

    def abandon(self, session: Session) -> None:
        """The deputy never came back: kill the program, drop the session."""
        if session.forgotten:
            return
        if session.moved:  # its deputy follows the program elsewhere (or never returns)
            self.forget(session)
            return
        log.warning(
            "deputy of %s pid=%d did not reconnect within %.1fs: killing it",
            session.program,
            session.pid,
            self.config.reconnect_window,
        )
        self.counts["abandoned"] += 1
        session.kill()
        self.forget(session)

    def shutdown(self) -> None:
        """Kill every program this agent started (agent stopping)."""
        for session in list(self.sessions.values()):
            session.kill()
            self.forget(session)


# Open HTTP connections' gates (weak: aiohttp owns the connection once it speaks HTTP).
_HTTP_GATES: weakref.WeakKeyDictionary[asyncio.BaseTransport, Gate] = weakref.WeakKeyDictionary()


def extend_http(transport: asyncio.BaseTransport | None, seconds: float) -> None:
    """Let an authenticated HTTP request's connection live `seconds` from now.

    For the few routes that legitimately outlast HTTP_LIFETIME (a migration
    under TCG); called only once the caller proved who it is.
    """
    gate = _HTTP_GATES.get(transport) if transport is not None else None
    if gate is not None and isinstance(transport, asyncio.Transport):
        gate.extend(transport, seconds)


class Gate:
    """Bounds one connection until it authenticates: a deadline and a shared count."""

    def __init__(self, counter: list[int], transport: asyncio.Transport) -> None:
        self._counter = counter
        self._counter[0] += 1
        self._open = True
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT, transport.close
        )

    def extend(self, transport: asyncio.Transport, seconds: float) -> None:
        """Stop counting the connection; close it after `seconds` all the same (HTTP)."""
        self.settle()
        self._timer = asyncio.get_running_loop().call_later(seconds, transport.close)

    def settle(self) -> None:
        """Authenticated: no deadline, no longer counted."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._open:
            self._open = False
            self._counter[0] -= 1


class Sniffer(asyncio.Protocol):
    """Chooses, from the first bytes, between the exec protocol and HTTP."""

    def __init__(
        self,
        exec_factory: Callable[[Gate], asyncio.Protocol],
        http_factory: Callable[[], asyncio.Protocol],
        counter: list[int],
    ) -> None:
        self._exec = exec_factory
        self._http = http_factory
        self._counter = counter
        self._transport: asyncio.Transport | None = None
        self._gate: Gate | None = None
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._counter[0] >= MAX_UNAUTHENTICATED:
            transport.abort()  # too many strangers at once: this one waits its turn
            return
        self._gate = Gate(self._counter, transport)

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._gate is None:
            return  # refused in connection_made
        self._buf += data
        if len(self._buf) < len(P.MAGIC) and P.MAGIC.startswith(self._buf):
            return
        proto: asyncio.Protocol
        if self._buf.startswith(P.MAGIC):
            proto = self._exec(self._gate)
        else:
            proto = self._http()
            self._gate.extend(self._transport, HTTP_LIFETIME)
            _HTTP_GATES[self._transport] = self._gate
        self._transport.set_protocol(proto)
        proto.connection_made(self._transport)
        proto.data_received(self._buf)
        self._buf = b""

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gate is not None:
            self._gate.settle()
