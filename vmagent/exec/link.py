"""The home deputy's connection to the agent: the handshake, sequenced sends, resume.

`Link` dials the agent, proves it holds the exec ticket's secret and checks the
agent's proof before anything about the program is sent, keeps every sequenced
frame until the agent acknowledges it, and reattaches to the session within the
reconnect window after a lost connection (replaying what the agent did not get).
It is imported by the deputy on the path of every remote exec and follows the
deputy's rule: C modules of the standard library only (`_socket`, `_thread`,
`_hashlib`; `os` and `time` cost nothing), no pure-Python ones.
"""

import _hashlib
import _socket
import _thread
import os
import time  # a builtin module: no import cost

from vmagent.exec import protocol as P

HANDSHAKE_TIMEOUT = 5.0  # s to connect and authenticate the agent


class LostError(Exception):
    """The session cannot continue (agent gone or refused)."""


class Unreachable(LostError):
    """The agent could not be reached (or authenticated with) within the window."""


class Link:
    """The deputy's end of one exec session: sequenced sends, replay on reconnect."""

    def __init__(self, agent: str, instance: str, window: float, ticket: bytes = b"") -> None:
        host, _, port = agent.rpartition(":")
        self.public, _, self.secret = ticket.rpartition(b".")
        self.addr = (host.strip("[]"), int(port))
        self.agent = agent
        self.instance = instance
        self.window = window
        self.lock = _thread.allocate_lock()
        self.outbox = P.Outbox()
        self.inbox = P.Inbox()
        self.rx = bytearray()  # bytes received past the last whole frame (after a resume)
        self.sock: _socket.socket | None = None
        self.session = b""
        self.hello = b""  # sent again if no WELCOME came back (the agent starts it once)
        self.dialed = False  # a HELLO may have reached the agent: later ones say AGAIN
        self.ack_wanted = False
        # Written by the receiver thread without the lock (it must never wait for
        # a sender blocked in sendall: that sender may be waiting for the agent,
        # which may be waiting for us to read).  Senders apply them under the lock.
        self.peer_acked = 0
        self.deferred: list[tuple[int, int]] = []  # (kind, fd) frames to send later
        self.replies: list[bytes] = []  # unsequenced frames to send later (KILLED)
        # Frames that arrived together with WELCOME on a resume, for the receiver.
        self.pending: list[tuple[int, int, int, bytes | bytearray]] = []
        self.redirect = ""  # where home says the program went after a loss (issue 12)

    def dial(self) -> _socket.socket:
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_KEEPIDLE, P.KEEPALIVE_IDLE)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_KEEPINTVL, P.KEEPALIVE_INTVL)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_KEEPCNT, P.KEEPALIVE_CNT)
            sock.settimeout(HANDSHAKE_TIMEOUT)
            sock.connect(self.addr)
        except OSError:
            sock.close()
            raise
        return sock

    def _mac(self, role: bytes, challenge: bytes) -> bytes:
        return _hashlib.hmac_digest(self.secret, role + challenge, "sha256")

    def handshake(self, first: bytes) -> tuple[_socket.socket, P.FrameParser, list]:
        """Connect, authenticate the agent, then send `first` (HELLO or RESUME).

        Nothing about the program leaves this process before the agent proved
        it knows the ticket's secret.  Returns the socket, the parser holding
        what followed the agent's first answer, and the frames already decoded.
        Raises LostError if the agent refuses or fails the proof, OSError if
        it cannot be reached.
        """
        sock = self.dial()
        try:
            mine = os.urandom(P.NONCE_SIZE)
            sock.sendall(P.MAGIC + P.frame(P.AUTH, 0, P.record([self.public, mine])))
            parser = P.FrameParser(P.PRE_AUTH_MAX)
            frames: list = []
            while not frames:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("agent closed the connection")
                frames = parser.feed(data)
            kind, _fd, _seq, payload = frames.pop(0)
            if kind == P.ERROR:
                raise LostError(bytes(payload).decode(errors="replace"))
            items = P.unrecord(payload) if kind == P.CHALLENGE else []
            if len(items) != 2 or not _hashlib.compare_digest(items[0], self._mac(b"agent", mine)):
                raise LostError("the agent failed to prove it holds the instance key")
            self.dialed = True
            sock.sendall(P.frame(P.PROOF, 0, P.record([self._mac(b"deputy", items[1])])) + first)
            sock.settimeout(None)
            parser.limit = P.MAX_PAYLOAD
        except BaseException:
            sock.close()
            raise
        return sock, parser, frames

    def open(self, hello: bytes) -> None:
        """First connection: authenticate, send HELLO; retried like a reconnect.

        A connection cut during the handshake (the agent's pre-authentication
        deadline, a timeout of ours while either side is starved of CPU) is not
        the end of the program: the deputy dials again within the window.
        Until the agent's WELCOME arrives the deputy sends HELLO again, and an
        agent that already started the program for this ticket attaches the
        connection to it instead (`ExecService.open`): a program starts once.
        Raises LostError if the agent refuses or stays unreachable.
        """
        self.hello = hello
        try:
            sock, parser, frames = self.handshake(self.first_frame())
        except OSError as exc:
            self.reconnect(exc.strerror or str(exc))
            return
        self.rx = bytearray(parser.leftover())
        self.pending = list(frames)
        self.sock = sock

    def move(self, payload: bytes | bytearray) -> None:
        """MOVED: resume this session at the agent it names, with the derived key.

        The key is the hex HMAC of the current one over `moved.INSTANCE.SALT`;
        the agent the program moved to got the same from the one it left.
        """
        fields = P.pairs(bytes(payload))
        agent = fields[b"addr"].decode()
        host, _, port = agent.rpartition(":")
        salt = fields[b"salt"]
        instance = fields[b"instance"]
        key = _hashlib.hmac_digest(self.secret, b"moved." + instance + b"." + salt, "sha256")
        self.secret = key.hex().encode()
        self.addr = (host.strip("[]"), int(port))
        self.agent = agent
        self.instance = instance.decode()

    def follow(self) -> bool:
        """Home's note that the program was restored on another instance (failover,
        issue 12): move there, as on MOVED.  Unreachable if home says it is gone."""
        if not self.redirect:
            return False
        try:
            fd = os.open(self.redirect, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
            try:
                os.unlink(self.redirect)
            except OSError:
                pass
        if data == P.GONE:
            raise Unreachable("its instance was lost and it had no checkpoint")
        if data.startswith(P.GONE + b":"):  # the OSS gave its restore up: why
            why = data[len(P.GONE) + 1 :].decode(errors="replace")
            raise Unreachable(f"its instance was lost and it was not restored: {why}")
        try:
            self.move(data)
        except (KeyError, ValueError, P.FrameError):
            return False
        return True

    def hang_up(self) -> None:
        """Drop the connection (the receiver thread reconnects, following home's note)."""
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass

    def first_frame(self) -> bytes:
        """RESUME once the session is known, else HELLO (seq: the last seq received)."""
        if self.session:
            return P.frame(P.RESUME, 0, self.session, self.inbox.last)
        return P.frame(P.HELLO, P.AGAIN if self.dialed else 0, self.hello, self.inbox.last)

    def send(self, kind: int, fd: int, payload: bytes) -> None:
        """Send a sequenced frame; kept until acknowledged, replayed after reconnect."""
        while True:
            with self.lock:
                self.outbox.ack(self.peer_acked)
                if kind != P.DATA or not self.outbox.full():
                    self._write(self._extras() + self.outbox.add(kind, fd, payload))
                    return
                if self.ack_wanted or self.deferred:
                    self._write(self._extras())  # the receiver could not: never hold acks
            time.sleep(0.002)  # outbox full: wait for acks (the source pipe fills meanwhile)

    def _extras(self) -> bytes:
        """Pending ACK and deferred frames, encoded (call with the lock held)."""
        out = b""
        if self.ack_wanted:
            out += P.frame(P.ACK, 0, b"", self.inbox.acked())
            self.ack_wanted = False
        while self.deferred:
            kind, fd = self.deferred.pop(0)
            out += self.outbox.add(kind, fd, b"")
        while self.replies:
            out += self.replies.pop(0)
        return out

    def reply(self, frame: bytes) -> None:
        """From the receiver thread: send an unsequenced frame, never blocking.

        Lost with the connection, if it breaks first: its asker has a deadline.
        """
        self.replies.append(frame)
        self.ack()

    def post(self, kind: int, fd: int) -> None:
        """From the receiver thread: send an empty sequenced frame, never blocking."""
        self.deferred.append((kind, fd))
        self.ack()

    def ack(self) -> None:
        """Acknowledge what was received, unless a sender holds the lock (it will)."""
        self.ack_wanted = True
        if self.lock.acquire(False):
            try:
                self._write(self._extras())
            finally:
                self.lock.release()

    def control(self, kind: int) -> None:
        """Best effort, never blocking (BYE at exit: the agent also copes without)."""
        if self.lock.acquire(False):
            try:
                self._write(P.frame(kind, 0, b"", self.inbox.last))
            finally:
                self.lock.release()

    def _write(self, data: bytes) -> None:
        sock = self.sock
        if sock is None or not data:
            return  # disconnected: the receiver thread reconnects and replays
        try:
            sock.sendall(data)
        except OSError:
            self.sock = None
            try:
                sock.shutdown(_socket.SHUT_RDWR)  # wake the receiver thread
            except OSError:
                pass

    def read_frame(self) -> tuple[int, int, int, bytes | bytearray] | None:
        """The next frame, its payload received straight into its own buffer.

        Header then payload with recv_into: one copy per byte (kernel to
        payload), which matters at hundreds of MB/s.  None when the connection
        ended (a partly read frame is replayed by the agent after a resume).
        """
        sock = self.sock
        if sock is None:
            return None
        try:
            head = self._read_exact(sock, P.HEADER_SIZE)
            kind, fd, length, seq = P.HEADER.unpack(head)
            P.FrameParser.check(kind, length)
            payload = self._read_exact(sock, length) if length else b""
        except (OSError, EOFError):
            return None
        return kind, fd, seq, payload

    def _read_exact(self, sock: _socket.socket, n: int) -> bytearray:
        out = bytearray(n)
        view = memoryview(out)
        got = 0
        if self.rx:
            got = min(n, len(self.rx))
            view[:got] = self.rx[:got]
            del self.rx[:got]
        while got < n:
            k = sock.recv_into(view[got:])
            if not k:
                raise EOFError
            got += k
        return out

    def reconnect(self, why: str) -> None:
        """Reattach to the session within the window, or raise LostError."""
        deadline = time.monotonic() + self.window
        delay = 0.05
        last = why
        while True:
            if self.follow():  # restored from a checkpoint elsewhere: a fresh window there
                deadline = time.monotonic() + self.window
            try:
                sock, parser, frames = self.handshake(self.first_frame())
                while not frames:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionResetError("agent closed the connection")
                    frames = parser.feed(data)
                kind, _fd, seq, payload = frames[0]
                if kind == P.ERROR:
                    raise LostError(payload.decode(errors="replace"))
                if kind != P.WELCOME:
                    raise LostError(f"unexpected frame {kind} on resume")
                self.session = P.pairs(payload).get(b"session", self.session)
                with self.lock:
                    self.outbox.ack(seq)
                    self.rx = bytearray(parser.leftover())
                    replay = b"".join(self.outbox.after(seq))
                    self.sock = sock
                    if replay:
                        self._write(replay)
                self.pending = list(frames[1:])
                return
            except LostError:
                raise
            except OSError as exc:
                last = exc.strerror or str(exc)
            if self.follow():
                deadline = time.monotonic() + self.window
                delay = 0.05
                continue
            if time.monotonic() + delay > deadline:
                raise Unreachable(last)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
