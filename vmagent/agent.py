"""The agent: exec sessions for deputies plus a small HTTP API, on one listen address.

One TCP port serves two protocols: a connection whose first four bytes are
`protocol.MAGIC` is a deputy's exec session (raw frames, fastest path for stdio);
anything else is handed to aiohttp (health, load, sessions).  A session outlives
its connection for `reconnect_window` seconds so a deputy can resume with
nothing lost; a session whose deputy never returns has its program killed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hmac
import logging
import os
import secrets
import signal
import socket
import stat
from collections.abc import Callable

from aiohttp import web

from vmagent.config import AgentConfig
from vmagent.errors import AgentError, AuthError, BadRequest
from vmagent.exec import protocol as P
from vmagent.exec import tickets
from vmagent.exec.readers import ReaderProbe
from vmagent.exec.remote import tracer_prefix
from vmagent.exec.spawn import ExecRequest, SpawnFailed, become_subreaper, bind, parse_hello, spawn
from vmagent.exec.tickets import Grant, TicketCheck
from vmagent.load import LoadSampler

log = logging.getLogger(__name__)

WRITE_HIGH = 4 << 20
WATCH_FIRST = 0.001  # first look for a reader of a streamed input (s)
WATCH_MAX = 0.1  # slowest look, for a program that does not read its input
JOB_CONTROL = frozenset(
    {int(signal.SIGSTOP), int(signal.SIGCONT)}
)  # transport buffer before the agent stops reading program output


class Session:
    """One remote program and the streams that mirror it to its deputy."""

    def __init__(
        self, service: ExecService, sid: bytes, request: ExecRequest, program: str
    ) -> None:
        self.service = service
        self.sid = sid
        self.request = request
        self.program = program
        self.loop = asyncio.get_running_loop()
        self.outbox = P.Outbox()
        self.inbox = P.Inbox()
        self.proto: ExecProtocol | None = None
        self.pid = 0
        self.status: int | None = None  # raw wait status once reaped
        self.outs: dict[int, int] = {}  # target fd -> our read end
        self.ins: dict[int, int] = {}  # target fd -> our write end
        self.in_buf: dict[int, collections.deque[tuple[int, bytes]]] = {}  # fd -> (seq, data)
        self.in_eof: set[int] = set()
        self._acked_upto = 0  # highest seq acknowledged to the deputy
        self._unacked_bytes = 0  # delivered since that ack
        self.paths: dict[int, int] = {}  # target fd -> our copy (same file description)
        self.unwanted: dict[int, int] = {}  # pipe inode -> input fd not yet read remotely
        self._watch: asyncio.TimerHandle | None = None
        self.reading = False
        self.finished = False
        self.forgotten = False
        self.nonce = ""  # of the ticket that started the session (a resume must show it)
        self._abandon: asyncio.TimerHandle | None = None
        self._drain: asyncio.TimerHandle | None = None

    # -- start ---------------------------------------------------------------
    def start(self) -> None:
        """Create the descriptors and fork+exec the program (raises SpawnFailed)."""
        sources: dict[int, int] = {}
        ours: list[int] = []
        try:
            for spec in self.request.fds:
                if spec.kind == P.FD_PATH:
                    fd = os.open(spec.path, spec.flags & ~os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY)
                    if spec.pos and (spec.flags & os.O_APPEND) == 0:
                        with contextlib.suppress(OSError):
                            os.lseek(fd, spec.pos, os.SEEK_SET)
                    self.paths[spec.fd] = fd
                    sources[spec.fd] = fd
                elif spec.rdev and (tty := _same_terminal(spec.path, spec.flags, spec.rdev)):
                    self.paths[spec.fd] = tty  # this host sees the deputy's terminal
                    sources[spec.fd] = tty
                elif spec.kind == P.FD_OUT:
                    r, w = os.pipe2(os.O_CLOEXEC)
                    os.set_blocking(r, False)  # only our end: the program's stays blocking
                    ours.append(w)
                    self.outs[spec.fd] = r
                    sources[spec.fd] = w
                else:
                    r, w = os.pipe2(os.O_CLOEXEC)
                    os.set_blocking(w, False)
                    ours.append(r)
                    self.ins[spec.fd] = w
                    self.in_buf[spec.fd] = collections.deque()
                    sources[spec.fd] = r
                    self.unwanted[os.fstat(r).st_ino] = spec.fd
            for fd in (*self.outs.values(), *self.ins.values()):
                with contextlib.suppress(OSError):
                    fcntl_setpipe(fd)
            self.pid = spawn(self.request, sources, self.service.wrap)
        except Exception:
            self.close_fds()
            raise
        finally:
            for fd in ours:
                os.close(fd)
            # The child holds its own blocking ends; ours for the program side are closed.
        for fd, r in self.outs.items():
            self.loop.add_reader(r, self._readable, fd, r)
        self.reading = True
        if self.unwanted:
            self._watch = self.loop.call_later(WATCH_FIRST, self._watch_inputs, WATCH_FIRST)

    def _watch_inputs(self, interval: float) -> None:
        """Tell the deputy to start forwarding an input once the program reads it.

        Polls /proc (a few small reads, on the loop: cheaper than a thread hop),
        quickly at first, then backing off to WATCH_MAX while nobody reads.
        """
        self._watch = None
        if self.status is not None or not self.unwanted or self.forgotten:
            return
        for ino in self.service.probe.waiting(self.pid, self.unwanted):
            self.send(P.WANT, self.unwanted.pop(ino), b"")
        if self.unwanted:
            nxt = min(interval * 2, WATCH_MAX)
            self._watch = self.loop.call_later(nxt, self._watch_inputs, nxt)

    # -- frames from the deputy -----------------------------------------------
    def on_frame(self, kind: int, fd: int, seq: int, payload: bytes) -> None:
        """Apply one frame received from the deputy."""
        if kind in P.SEQUENCED and not self.inbox.accept(seq, len(payload)):
            return
        if kind == P.DATA:
            if fd in self.ins:
                self.in_buf[fd].append((seq, payload))
                self._pump(fd)
        elif kind == P.EOF:
            if fd in self.ins:
                self.in_eof.add(fd)
                self._pump(fd)
            elif fd in self.outs:
                # The deputy's reader went away: close our read end so the remote
                # writer gets SIGPIPE/EPIPE, as it would have locally.
                self._close_out(fd)
                self._maybe_finish()
        elif kind == P.SIGNAL:
            if self.status is None and self.pid and 0 < fd < signal.NSIG:
                with contextlib.suppress(ProcessLookupError):
                    if fd in JOB_CONTROL:
                        os.killpg(self.pid, fd)  # stop/continue the whole remote job
                    else:
                        os.kill(self.pid, fd)
        elif kind == P.ACK:
            self.outbox.ack(seq)
            self._flow()
        elif kind == P.BYE:
            self.service.forget(self)
        if kind in P.SEQUENCED:
            self._delivered(len(payload) + P.HEADER_SIZE)

    def _delivered(self, nbytes: int) -> None:
        """Acknowledge input once it is in the program's pipes, not merely received.

        This is the input flow control: the deputy stops sending when its outbox
        holds OUTBOX_LIMIT unacknowledged bytes, so what the agent buffers for a
        program that does not read is bounded, and the agent never has to stop
        reading the connection (which would also stop ACKs and signals).
        """
        self._unacked_bytes += nbytes
        if self._unacked_bytes < P.ACK_EVERY or self.proto is None:
            return
        pending = [chunks[0][0] for chunks in self.in_buf.values() if chunks]
        upto = min(pending) - 1 if pending else self.inbox.last
        if upto > self._acked_upto:
            self._acked_upto = upto
            self._unacked_bytes = 0
            self.proto.write(P.frame(P.ACK, 0, b"", upto))

    def _pump(self, fd: int) -> None:
        w = self.ins.get(fd)
        chunks = self.in_buf.get(fd)
        if chunks is None:
            return
        if w is None:
            chunks.clear()  # the program closed its stdin: what it did not read is gone
            return
        try:
            while chunks:
                seq, data = chunks[0]
                n = os.write(w, data[: P.CHUNK])
                if n < len(data):
                    chunks[0] = (seq, data[n:])
                else:
                    chunks.popleft()
        except BlockingIOError:
            self.loop.add_writer(w, self._pump, fd)
            return
        except OSError:
            chunks.clear()
            self._close_in(fd)
            self._delivered(0)
            return
        self.loop.remove_writer(w)
        if fd in self.in_eof:
            self._close_in(fd)
        self._delivered(0)

    def _close_in(self, fd: int) -> None:
        w = self.ins.pop(fd, None)
        if w is not None:
            self.loop.remove_writer(w)
            os.close(w)

    # -- program output ----------------------------------------------------------
    def _readable(self, fd: int, r: int) -> None:
        try:
            data = os.read(r, P.CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.send(P.DATA, fd, data)
            return
        self._close_out(fd)
        self.send(P.EOF, fd, b"")
        self._maybe_finish()

    def _close_out(self, fd: int) -> None:
        r = self.outs.pop(fd, None)
        if r is not None:
            self.loop.remove_reader(r)
            os.close(r)

    def send(self, kind: int, fd: int, payload: bytes) -> None:
        """Queue a sequenced frame for the deputy (kept until acknowledged)."""
        data = self.outbox.add(kind, fd, payload)
        if self.proto is not None:
            self.proto.write(data)
        self._flow()

    def _flow(self) -> None:
        """Stop reading program output while the deputy cannot keep up."""
        blocked = self.outbox.full() or self.proto is None or self.proto.write_paused
        if blocked and self.reading:
            for r in self.outs.values():
                self.loop.remove_reader(r)
            self.reading = False
        elif not blocked and not self.reading:
            for fd, r in self.outs.items():
                self.loop.add_reader(r, self._readable, fd, r)
            self.reading = True

    # -- the end ----------------------------------------------------------------
    def exited(self, status: int) -> None:
        """The program was reaped; send EXIT once its output is drained."""
        self.status = status
        if self.outs:
            # Output still in the pipes, or an orphan of the program holds them open.
            self._drain = self.loop.call_later(self.service.config.drain_grace, self._finish)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.status is not None and not self.outs:
            self._finish()

    def _finish(self) -> None:
        if self.finished or self.status is None:
            return
        self.finished = True
        if self._drain is not None:
            self._drain.cancel()
        # Read what is left without waiting for EOF (an orphan may keep a pipe open).
        for fd, r in list(self.outs.items()):
            with contextlib.suppress(OSError):
                while data := os.read(r, P.CHUNK):
                    self.send(P.DATA, fd, data)
        offsets = []
        for fd, ours in self.paths.items():
            with contextlib.suppress(OSError):
                offsets.append(
                    P.record([str(fd).encode(), str(os.lseek(ours, 0, os.SEEK_CUR)).encode()])
                )
        status = self.status
        if os.WIFSIGNALED(status):
            kind, value = b"signal", os.WTERMSIG(status)
        else:
            kind, value = b"status", os.WEXITSTATUS(status)
        self.send(
            P.EXIT,
            0,
            P.unpairs(
                {b"kind": kind, b"value": str(value).encode(), b"offsets": P.record(offsets)}
            ),
        )
        self.service.finished(self, kind.decode(), value)

    def fail(self, err: int, message: str) -> None:
        """The program could not start: report like an exec failure."""
        self.finished = True
        value = 126 if err in (errno.EACCES, errno.ENOEXEC, errno.EISDIR) else 127
        self.send(
            P.EXIT,
            0,
            P.unpairs(
                {b"kind": b"error", b"value": str(value).encode(), b"message": message.encode()}
            ),
        )

    # -- connection --------------------------------------------------------------
    def attach(self, proto: ExecProtocol, peer_last: int) -> None:
        """A (re)connected deputy: welcome it and replay what it has not acknowledged."""
        if self.proto is not None and self.proto is not proto:
            self.proto.close()
        self.proto = proto
        if self._abandon is not None:
            self._abandon.cancel()
            self._abandon = None
        self.outbox.ack(peer_last)
        proto.write(P.frame(P.WELCOME, 0, P.unpairs({b"session": self.sid}), self.inbox.last))
        for data in self.outbox.after(peer_last):
            proto.write(data)
        self._flow()

    def detach(self, proto: ExecProtocol) -> None:
        """The deputy's connection is gone: wait for a resume, then give up."""
        if self.proto is not proto:
            return
        self.proto = None
        self._flow()
        if not self.forgotten:
            self._abandon = self.loop.call_later(
                self.service.config.reconnect_window, self.service.abandon, self
            )

    def kill(self) -> None:
        """SIGKILL the program and its process group (its session leader is the program)."""
        if self.pid and self.status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def close_fds(self) -> None:
        """Release every descriptor the session holds."""
        for fd in list(self.outs):
            self._close_out(fd)
        for fd in list(self.ins):
            self._close_in(fd)
        for ours in self.paths.values():
            with contextlib.suppress(OSError):
                os.close(ours)
        self.paths.clear()
        for handle in (self._abandon, self._drain, self._watch):
            if handle is not None:
                handle.cancel()


def _same_terminal(path: bytes, flags: int, rdev: int) -> int | None:
    """Open `path` if it is the terminal device `rdev` (same host), else None."""
    try:
        fd = os.open(path, (flags & os.O_ACCMODE) | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev:
        return fd
    os.close(fd)
    return None


def fcntl_setpipe(fd: int, size: int = 1 << 20) -> None:
    """Grow a pipe to 1 MiB so each read moves more data (fewer loop turns)."""
    import fcntl

    fcntl.fcntl(fd, 1031, size)  # F_SETPIPE_SZ


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


class ExecService:
    """All sessions of this agent; reaps children (the agent is a subreaper)."""

    def __init__(self, config: AgentConfig, tickets: TicketCheck) -> None:
        self.config = config
        self.tickets = tickets
        self.wrap = tracer_prefix() if config.trace else ()
        self.sessions: dict[bytes, Session] = {}
        self.by_pid: dict[int, Session] = {}
        self.by_nonce: dict[str, Session] = {}  # ticket nonce -> the session it started
        self.probe = ReaderProbe(os.uname().machine)
        self.counts = {"started": 0, "exited": 0, "signaled": 0, "failed": 0, "abandoned": 0}

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
        self.sessions[session.sid] = session
        self.by_nonce[grant.nonce] = session
        session.attach(proto, 0)
        try:
            session.start()
        except SpawnFailed as exc:
            self.counts["failed"] += 1
            session.fail(exc.errno, str(exc))
            return session
        except OSError as exc:
            self.counts["failed"] += 1
            session.fail(exc.errno or errno.EIO, f"cannot set up descriptors: {exc.strerror}")
            return session
        except Exception as exc:  # never leave a half-started session registered
            self.counts["failed"] += 1
            self.forget(session)
            raise BadRequest(f"cannot start the program: {exc}") from exc
        self.by_pid[session.pid] = session
        self.counts["started"] += 1
        session.send(P.STARTED, 0, P.unpairs({b"pid": str(session.pid).encode()}))
        log.info("started %s pid=%d session=%s", program, session.pid, session.sid.hex()[:8])
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


HANDSHAKE_TIMEOUT = 5.0  # s an unauthenticated exec connection may take to authenticate
HTTP_LIFETIME = 30.0  # s any HTTP connection may stay open (the API's calls are short)
MAX_UNAUTHENTICATED = 128  # concurrent connections that have not authenticated yet


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
        self._transport.set_protocol(proto)
        proto.connection_made(self._transport)
        proto.data_received(self._buf)
        self._buf = b""

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gate is not None:
            self._gate.settle()


SERVICE: web.AppKey[ExecService] = web.AppKey("service", ExecService)
SAMPLER: web.AppKey[LoadSampler] = web.AppKey("sampler", LoadSampler)
CONFIG: web.AppKey[AgentConfig] = web.AppKey("config", AgentConfig)


def _is_authorized(request: web.Request) -> bool:
    token = request.app[CONFIG].token
    given = request.headers.get("Authorization", "").encode()
    return hmac.compare_digest(given, f"Bearer {token}".encode())


def _authorized(request: web.Request) -> None:
    if not _is_authorized(request):
        raise web.HTTPUnauthorized(text="missing or wrong bearer token\n")


async def _health(request: web.Request) -> web.Response:
    """Liveness for anyone; details (instance, pid, sessions) for the token's holder."""
    config = request.app[CONFIG]
    if not _is_authorized(request):
        return web.json_response({"ok": True})
    return web.json_response(
        {
            "ok": True,
            "instance": config.instance,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "cpus": os.cpu_count() or 1,
            "sessions": len(request.app[SERVICE].sessions),
        }
    )


async def _load(request: web.Request) -> web.Response:
    _authorized(request)
    return web.json_response(request.app[SAMPLER].sample().as_json())


async def _sessions(request: web.Request) -> web.Response:
    _authorized(request)
    service = request.app[SERVICE]
    return web.json_response(
        {
            "counts": service.counts,
            "sessions": [
                {
                    "session": s.sid.hex(),
                    "program": s.program,
                    "pid": s.pid,
                    "connected": s.proto is not None,
                    "running": s.status is None,
                    "unacked_bytes": s.outbox.held,
                }
                for s in service.sessions.values()
            ],
        }
    )


def make_app(config: AgentConfig, service: ExecService, sampler: LoadSampler) -> web.Application:
    """The HTTP side of the agent."""
    app = web.Application()
    app[CONFIG] = config
    app[SERVICE] = service
    app[SAMPLER] = sampler
    app.router.add_get("/v1/health", _health)
    app.router.add_get("/v1/load", _load)
    app.router.add_get("/v1/sessions", _sessions)
    return app


class Agent:
    """The running agent: listener, sessions, optional OSS link."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.sampler = LoadSampler()
        self.service = ExecService(
            config, TicketCheck(config.token, config.instance, exec_key=config.exec_key)
        )
        self._unauthenticated = [0]  # connections counted by their Gate
        self.runner: web.AppRunner | None = None
        self.server: asyncio.Server | None = None
        self.address = ""

    async def start(self) -> str:
        """Listen; return the bound HOST:PORT."""
        self.service.install()
        self.runner = web.AppRunner(
            make_app(self.config, self.service, self.sampler),
            access_log=None,
            keepalive_timeout=HTTP_LIFETIME / 2,
        )
        await self.runner.setup()
        http = self.runner.server
        assert http is not None
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Sniffer(
                lambda gate: ExecProtocol(self.service, gate), http, self._unauthenticated
            ),
            self.config.listen_host,
            self.config.listen_port,
            reuse_address=True,
        )
        host, port = self.server.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        return self.address

    async def close(self) -> None:
        """Stop listening and kill every program still running."""
        self.service.shutdown()
        if self.server is not None:
            self.server.close()
        if self.runner is not None:
            await self.runner.cleanup()
