"""The home deputy: stands in for a program that runs on another instance.

The coordinator rewrites a traced process's execve into
`python3 -I -S .../vmagent/exec/deputy.py --agent HOST:PORT --instance NAME
--ticket-file F -- PATH ARGV...`, leaving envp alone, so this module runs *in
the original process*: same pid, parent, file descriptors, cwd, environment,
umask, rlimits.  F is a 0600 file of the process's own uid holding its exec
ticket (argv is world-readable: the ticket never goes there); the deputy reads
and deletes it, proves to the agent that it holds the ticket's secret and
checks the agent's proof before it sends anything (vmagent.exec.tickets), then
sends all of that to the agent, which starts PATH there; it then

- streams its readable pipes/ttys to the remote program and the remote
  program's writes back into its own descriptors (so pipes, `$(...)`, files
  opened for writing keep their shared offsets and readers see EOF as usual);
- forwards the signals it receives (TERM, INT, HUP, QUIT, USR1/2, ALRM, CONT,
  WINCH) to the remote process;
- exits with the remote exit status, or re-raises the remote death signal on
  itself, so the parent's wait() sees exactly what a local run gives.

It must start fast (it is on the path of every remote exec), so it imports only
C modules (`_socket`, `_signal`, `_thread`, `_struct`), parses its own argv and
keeps the standard library's pure-Python modules out.  Read-only regular files
and character devices are not streamed: the agent reopens them by path (the
file system is shared), and read offsets are copied back at exit.
"""

import os
import sys

if not __package__:  # run as a file by path (-I drops the script dir from sys.path)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import _hashlib  # noqa: E402
import _signal  # noqa: E402
import _socket  # noqa: E402
import _thread  # noqa: E402
import time  # noqa: E402  (a builtin module: no import cost)

from vmagent.exec import protocol as P  # noqa: E402

# Exit status of a deputy whose instance was lost (the program "fails cleanly").
LOST_STATUS = 255
USAGE_STATUS = 2
EPIPE = 32
FORWARDED = (
    _signal.SIGHUP,
    _signal.SIGINT,
    _signal.SIGQUIT,
    _signal.SIGTERM,
    _signal.SIGUSR1,
    _signal.SIGUSR2,
    _signal.SIGALRM,
    _signal.SIGCONT,
    _signal.SIGWINCH,
)
# Job control: forwarded, then the deputy stops itself so that the parent's
# waitpid(WUNTRACED) and the shell's job table see the job stopped.
STOPPERS = (_signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU)
WAKE = _signal.SIGRTMIN + 3  # internal: the receiver thread wakes the main thread
ACCMODE = 3  # O_ACCMODE
HANDSHAKE_TIMEOUT = 5.0  # s to connect and authenticate the agent
# Never forwarded to an instance: the account's OSS token.
PRIVATE_ENV = (b"DCP_TOKEN=",)
MAX_TICKET = 4096


def _say(message: str) -> None:
    try:
        os.write(2, b"dcp: " + message.encode(errors="replace") + b"\n")
    except OSError:
        pass


def read_ticket(path: str) -> bytes:
    """The ticket `B.T` from its one-shot file (deleted once read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        data = os.read(fd, MAX_TICKET + 1)
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
    return data.strip()


def _parse(argv: list[str]) -> tuple[str, str, bytes, str, float, list[bytes]]:
    agent = instance = ticket_file = ""
    ticket = b""
    window = 10.0
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest = [os.fsencode(a) for a in argv[i + 1 :]]
            if not agent or not ticket or len(rest) < 1:
                break
            return agent, instance or agent, ticket, ticket_file, window, rest
        if i + 1 >= len(argv):
            break
        value = argv[i + 1]
        if arg == "--agent":
            agent = value
        elif arg == "--instance":
            instance = value
        elif arg == "--ticket-file":
            ticket_file = value
            try:
                ticket = read_ticket(value)
            except OSError as exc:
                raise SystemExit(f"cannot read the exec ticket: {exc.strerror}") from None
        elif arg == "--reconnect":
            window = float(value)
        else:
            break
        i += 2
    raise SystemExit(
        "usage: deputy --agent HOST:PORT [--instance NAME] --ticket-file F "
        "[--reconnect SECONDS] -- PATH ARGV0 [ARGS...]"
    )


def _signal_masks() -> tuple[int, int]:
    """(ignored, blocked) signal masks of this process, from /proc/self/status."""
    ignored = blocked = 0
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"SigIgn:"):
                ignored = int(line.split()[1], 16)
            elif line.startswith(b"SigBlk:"):
                blocked = int(line.split()[1], 16)
    return ignored, blocked


def _fdinfo(fd: int) -> tuple[int, int]:
    """(flags, pos) of a descriptor from /proc/self/fdinfo."""
    flags = pos = 0
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"flags:"):
                flags = int(line.split()[1], 8)
            elif line.startswith(b"pos:"):
                pos = int(line.split()[1])
    return flags, pos


def classify_fds() -> tuple[list[bytes], list[int], list[int]]:
    """Describe the inherited descriptors: (HELLO records, fds to stream in, out)."""
    records: list[bytes] = []
    ins: list[int] = []
    outs: list[int] = []
    fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
    for fd in fds:
        try:
            st = os.fstat(fd)
            flags, pos = _fdinfo(fd)
        except OSError:
            continue  # the descriptor of the listdir itself, already closed
        fmt = st.st_mode & 0o170000
        acc = flags & ACCMODE
        tty = os.isatty(fd)
        kind = b""
        path = b""
        if (fmt == 0o100000 and acc != os.O_WRONLY) or (fmt == 0o020000 and not tty):
            path = os.readlink(f"/proc/self/fd/{fd}").encode()
            if path.startswith(b"/") and not path.endswith(b" (deleted)"):
                kind = P.FD_PATH
        rdev = b""
        if not kind and fmt in (0o010000, 0o140000, 0o020000, 0o100000):
            # pipes, sockets, ttys and files open for writing are streamed
            if acc == os.O_RDONLY or (acc == os.O_RDWR and fd == 0):
                kind = P.FD_IN
            else:
                kind = P.FD_OUT
            if tty:
                # An instance that sees this very terminal device (same host)
                # reopens it, so the program gets a real tty; others stream.
                path = os.readlink(f"/proc/self/fd/{fd}").encode()
                rdev = str(st.st_rdev).encode()
        if not kind:
            continue  # directories, event fds...: the remote program goes without
        if kind == P.FD_IN:
            ins.append(fd)
        elif kind == P.FD_OUT:
            outs.append(fd)
        keep = flags & (ACCMODE | os.O_APPEND | os.O_NONBLOCK)
        items = [str(fd).encode(), kind, path, str(keep).encode(), str(pos).encode()]
        records.append(P.record([*items, rdev] if rdev else items))
    return records, ins, outs


def _rlimits() -> bytes:
    """Every rlimit, from /proc/self/limits (rows in RLIMIT_* order; -1 = unlimited).

    Reading the file avoids loading the `resource` extension module (~0.3 ms).
    """
    items: list[bytes] = []
    with open("/proc/self/limits", "rb") as f:
        rows = f.read().splitlines()[1:]
    for res, row in enumerate(rows):
        fields = row[26:].split()
        if len(fields) < 2:
            continue
        soft, hard = (b"-1" if v == b"unlimited" else v for v in fields[:2])
        items.append(P.record([str(res).encode(), soft, hard]))
    return P.record(items)


def build_hello(
    rest: list[bytes], fd_records: list[bytes], masks: tuple[int, int] | None = None
) -> bytes:
    """The HELLO payload describing this process and the program to start."""
    with open("/proc/self/environ", "rb") as f:
        # The environment as exec'd, before Python touched it (locale coercion).
        env = [e for e in f.read().split(b"\0") if e and not e.startswith(PRIVATE_ENV)]
    mask = os.umask(0)
    os.umask(mask)
    # Python ignores SIGPIPE and SIGXFSZ itself; every other ignored signal was
    # inherited across the exec and must stay ignored remotely.
    ignored, blocked = masks if masks is not None else _signal_masks()
    ignored &= ~((1 << (13 - 1)) | (1 << (25 - 1)))
    return P.unpairs(
        {
            b"path": rest[0],
            b"argv": P.record(rest[1:]),
            b"env": P.record(env),
            b"cwd": os.getcwdb(),
            b"umask": str(mask).encode(),
            b"rlimits": _rlimits(),
            b"fds": P.record(fd_records),
            b"uid": str(os.getuid()).encode(),
            b"gid": str(os.getgid()).encode(),
            b"groups": b",".join(str(g).encode() for g in os.getgroups()),
            b"sigign": str(ignored).encode(),
            b"sigblk": str(blocked).encode(),
        }
    )


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
        # Frames that arrived together with WELCOME on a resume, for the receiver.
        self.pending: list[tuple[int, int, int, bytes | bytearray]] = []

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
        return out

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
            if time.monotonic() + delay > deadline:
                raise Unreachable(last)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _wait_ready(fd: int, writable: bool) -> None:
    """Block until `fd` is readable (or writable); for descriptors left non-blocking."""
    import select  # a C module, loaded only on this rare path

    poller = select.poll()
    poller.register(fd, select.POLLOUT if writable else select.POLLIN)
    poller.poll()


class LostError(Exception):
    """The session cannot continue (agent gone or refused)."""


class Unreachable(LostError):
    """The agent could not be reached (or authenticated with) within the window."""


class Deputy:
    """Runs one remote program and mirrors it locally."""

    def __init__(self, link: Link, program: bytes) -> None:
        self.link = link
        self.program = program
        self.main = _thread.get_ident()
        self.result: tuple[str, int, bytes, bytes] | None = None  # kind, value, msg, offsets
        self.dead_outputs: set[int] = set()
        self.inputs: set[int] = set()  # streamed inputs whose thread awaits WANT
        # Streams that could not be carried whole (a read or write error other
        # than a reader hanging up): the exit status then says so (`finish`).
        self.broken: list[str] = []
        self.loss_note = ""  # where to tell the coordinator that data was lost

    def wake(self, result: tuple[str, int, bytes, bytes]) -> None:
        if self.result is None:
            self.result = result
        _signal.pthread_kill(self.main, WAKE)

    def receive(self) -> None:
        """Receiver thread: apply frames from the agent until EXIT or loss."""
        link = self.link
        try:
            while True:
                frames = link.pending
                link.pending = []
                if not frames:
                    frame = link.read_frame()
                    if frame is None:
                        old, link.sock = link.sock, None
                        if old is not None:
                            try:  # unblock a sender stuck in sendall on it
                                old.shutdown(_socket.SHUT_RDWR)
                            except OSError:
                                pass
                        link.reconnect("connection closed")
                        continue
                    frames = [frame]
                for kind, fd, seq, payload in frames:
                    if kind in P.SEQUENCED and not link.inbox.accept(seq, len(payload)):
                        continue
                    if kind == P.DATA:
                        self._output(fd, payload)
                    elif kind == P.EOF:
                        if fd not in self.dead_outputs:
                            self.dead_outputs.add(fd)
                            self._release(fd)
                    elif kind == P.ACK:
                        link.peer_acked = max(link.peer_acked, seq)
                    elif kind == P.WANT:
                        if fd in self.inputs:
                            self.inputs.discard(fd)
                            _thread.start_new_thread(self.forward_input, (fd,))
                    elif kind == P.WELCOME:
                        link.session = P.pairs(payload).get(b"session", b"")
                    elif kind == P.EXIT:
                        fields = P.pairs(payload)
                        link.control(P.BYE)
                        self.wake(
                            (
                                fields[b"kind"].decode(),
                                int(fields[b"value"]),
                                fields.get(b"message", b""),
                                fields.get(b"offsets", b""),
                            )
                        )
                        return
                    elif kind == P.ERROR:
                        self.wake(("refused", 0, bytes(payload), b""))
                        return
                if link.inbox.ack_due() or link.deferred:
                    link.ack()
        except LostError as exc:
            self.wake(("lost", 0, str(exc).encode(), b""))
        except P.FrameError as exc:
            self.wake(("lost", 0, f"protocol error: {exc}".encode(), b""))

    def _release(self, fd: int) -> None:
        """The remote program closed `fd`: drop our reference (readers see EOF).

        /dev/null takes its place instead of a plain close, so the number stays
        taken and a reconnect's socket can never land on a program descriptor.
        """
        try:
            null = os.open("/dev/null", os.O_RDWR)
            os.dup2(null, fd, inheritable=False)
            os.close(null)
        except OSError:
            pass

    def _output(self, fd: int, data: bytes | bytearray) -> None:
        if fd in self.dead_outputs:
            return
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    # Someone sharing the description made it non-blocking: wait
                    # as a blocking write would, never drop the bytes.
                    _wait_ready(fd, writable=True)
        except OSError as exc:
            # Our reader is gone (EPIPE): tell the agent, which closes the remote
            # pipe so the remote writer gets SIGPIPE/EPIPE as it would locally.
            # Any other error loses output: that is said at exit.
            if exc.errno != EPIPE:
                self.broken.append(f"writing descriptor {fd} failed: {exc.strerror}")
            self.dead_outputs.add(fd)
            self.link.post(P.EOF, fd)

    def _note_loss(self, why: str) -> None:
        """Leave a note beside the ticket file: the coordinator fails the run.

        A shell drops the status of all but a pipeline's last stage, so a lost
        middle stage would otherwise end in status 0 (vmagent.cluster.coordinator reads it).
        """
        if not self.loss_note or self.loss_note == P.LOSS_SUFFIX:
            return
        program = self.program.decode(errors="replace")
        line = f"{program} on instance {self.link.instance}: {why}"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(self.loss_note, flags, 0o600)
        except OSError:
            return
        try:
            os.write(fd, line.encode(errors="replace")[:MAX_TICKET])
        except OSError:
            pass
        finally:
            os.close(fd)

    def forward_input(self, fd: int) -> None:
        """Input thread, started on WANT: the remote program reads `fd`; stream it.

        Waiting for WANT keeps the deputy from consuming input that a later
        process sharing the descriptor would read (`... | while read l; do
        remote_cmd; done`): a remote program that never reads its stdin leaves
        every byte in place, as a local one would.
        """
        while True:
            try:
                data = os.read(fd, P.CHUNK)
            except BlockingIOError:
                _wait_ready(fd, writable=False)  # a non-blocking description: wait
                continue
            except OSError as exc:
                # Not an end of input: the remote program gets EOF (it must not
                # wait forever) and the exit status says the input was cut.
                self.broken.append(f"reading descriptor {fd} failed: {exc.strerror}")
                data = b""
            if not data:
                self.link.send(P.EOF, fd, b"")
                return
            self.link.send(P.DATA, fd, data)

    def finish(self) -> int:
        """Mirror the remote outcome on this process (never returns on a signal)."""
        assert self.result is not None
        kind, value, message, offsets = self.result
        if kind in ("lost", "refused") or self.broken:
            self._note_loss(self.broken[0] if self.broken else message.decode(errors="replace"))
        if offsets:
            for item in P.unrecord(offsets):
                fd_s, off_s = P.unrecord(item)
                try:
                    os.lseek(int(fd_s), int(off_s), os.SEEK_SET)
                except OSError:
                    pass
        if self.broken:
            # Never a success status for a run that lost some of its data.
            where = f"instance {self.link.instance}"
            _say(f"{self.program.decode(errors='replace')} on {where}: {self.broken[0]}")
            if kind == "status":
                return value or LOST_STATUS
        if kind == "status":
            return value
        if kind == "signal":
            _signal.signal(value, _signal.SIG_DFL)
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [value])
            os.kill(os.getpid(), value)
            return 128 + value  # the signal does not kill (e.g. SIGCHLD): like a shell
        program = self.program.decode(errors="replace")
        where = f"instance {self.link.instance} ({self.link.agent})"
        if kind == "error":
            _say(f"{program}: {message.decode(errors='replace')} (on {where})")
            return value
        if kind == "refused":
            _say(f"{where} refused {program}: {message.decode(errors='replace')}")
            return LOST_STATUS
        _say(f"{where} lost while running {program}: {message.decode(errors='replace')}")
        return LOST_STATUS


def main(argv: list[str]) -> int:
    """Run PATH remotely and mirror it; return the exit status."""
    try:
        agent, instance, ticket, ticket_file, window, rest = _parse(argv)
    except SystemExit as exc:
        _say(str(exc))
        return USAGE_STATUS
    fd_records, ins, _outs = classify_fds()
    masks = _signal_masks()
    hello = build_hello(rest, fd_records, masks)
    sigs = set(FORWARDED) | set(STOPPERS) | {WAKE}
    # Block before any thread starts so every thread inherits the mask and only
    # the main thread's sigwait sees them.
    _signal.pthread_sigmask(_signal.SIG_BLOCK, sigs)
    link = Link(agent, instance, window, ticket)
    deputy = Deputy(link, rest[1] if len(rest) > 1 else rest[0])
    deputy.loss_note = ticket_file + P.LOSS_SUFFIX
    try:
        link.open(hello)
    except LostError as exc:
        kind = "lost" if isinstance(exc, Unreachable) else "refused"
        deputy.result = (kind, 0, str(exc).encode(), b"")
        return deputy.finish()
    deputy.inputs.update(ins)  # before the receiver runs: it may get WANT at once
    _thread.start_new_thread(deputy.receive, ())
    while deputy.result is None:
        sig = _signal.sigwait(sigs)
        if sig != WAKE and deputy.result is None:
            if sig in STOPPERS:
                if masks[0] & (1 << (sig - 1)):
                    continue  # the program ignored it: so does the remote one
                # The remote job is a session of its own, hence an orphaned process
                # group, where the kernel discards TSTP/TTIN/TTOU: send SIGSTOP.
                link.send(P.SIGNAL, _signal.SIGSTOP, b"")
                os.kill(os.getpid(), _signal.SIGSTOP)  # SIGCONT resumes us, then is forwarded
            else:
                link.send(P.SIGNAL, sig, b"")
    return deputy.finish()


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except Exception as exc:  # never a traceback in the user's program output
        _say(f"deputy failed: {type(exc).__name__}: {exc}")
        status = LOST_STATUS
    # os._exit: input threads may sit in read(); nothing is buffered in Python.
    os._exit(status)
