"""The home deputy: stands in for a program that runs on another instance.

The coordinator rewrites a traced process's execve into
`python3 -I -S .../vmagent/exec/deputy.py --agent HOST:PORT --instance NAME
--ticket-file F -- PATH ARGV...`, leaving envp alone, so this module runs *in
the original process*: same pid, parent, file descriptors, cwd, environment,
umask, rlimits.  F is a 0600 file of the process's own uid holding its exec
ticket (argv is world-readable: the ticket never goes there); the deputy reads
and deletes it, proves to the agent that it holds the ticket's secret and
checks the agent's proof before it sends anything (vmagent.exec.tickets,
vmagent.exec.link), then sends all of that (vmagent.exec.hello) to the agent,
which starts PATH there; it then

- streams its readable pipes/ttys to the remote program and the remote
  program's writes back into its own descriptors (so pipes, `$(...)`, files
  opened for writing keep their shared offsets and readers see EOF as usual);
- forwards the signals it receives (TERM, INT, HUP, QUIT, USR1/2, ALRM, CONT,
  WINCH) to the remote process;
- exits with the remote exit status, or re-raises the remote death signal on
  itself, so the parent's wait() sees exactly what a local run gives.

It must start fast (it is on the path of every remote exec), so it imports only
C modules (`_socket`, `_signal`, `_thread`, `_struct`, `_hashlib`), parses its own
argv and keeps the standard library's pure-Python modules out; so does every
module it imports (`vmagent.exec.protocol`, `.link`, `.hello`; the package's
`__init__` imports nothing).  Read-only regular files and character devices
are not streamed: the agent reopens them by path (the file system is shared),
and read offsets are copied back at exit.
"""

import os
import sys

if not __package__:  # run as a file by path (-I drops the script dir from sys.path)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import _signal  # noqa: E402
import _socket  # noqa: E402
import _thread  # noqa: E402

from vmagent.exec import protocol as P  # noqa: E402
from vmagent.exec.hello import _signal_masks, build_hello, classify_fds  # noqa: E402
from vmagent.exec.link import Link, LostError, Unreachable  # noqa: E402

# Exit status of a deputy whose instance was lost (the program "fails cleanly").
LOST_STATUS = 255
USAGE_STATUS = 2
EPIPE = 32
EINVAL = 22
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
WAKE = _signal.SIGRTMIN + P.WAKE_RT  # the receiver thread wakes the main thread (and home)
MAX_TICKET = 4096
SI_KERNEL = 0x80  # si_code of a signal the kernel sent (the terminal's keys)
SI_USER = 0  # si_code of kill()/killpg()


def _group_signal(code: int, sender: int) -> bool:
    """Did this signal go to our whole process group (terminal, or an agent's killpg)?

    A deputy placed from an instance runs in the group of the program an agent
    started there (the session leader, the agent's child): a signal from that
    agent is its delivery of a group signal (it signals deputies no other way).
    """
    if code == SI_KERNEL:
        return True
    if code != SI_USER:
        return False
    try:
        sid = os.getsid(0)
        if sid == os.getpid():
            return False
        fd = os.open(f"/proc/{sid}/stat", os.O_RDONLY)
        try:
            stat = os.read(fd, 4096)
        finally:
            os.close(fd)
        return sender == int(stat.rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False


GET_LOCK = (5, 36)  # F_GETLK, F_OFD_GETLK: the answer carries the struct flock
LOCK_UN = 8
F_UNLCK = 2
SET_OF = {7: 6, 38: 37}  # a blocking set's non-blocking twin (F_SETLKW, F_OFD_SETLKW)


def _undo_lock(fd: int, call: bytes, cmd: int, arg: bytes) -> None:
    """Release what a cancelled request took (an interrupted native wait took nothing)."""
    import fcntl

    try:
        if call == b"flock":
            fcntl.flock(fd, LOCK_UN)
        elif cmd in SET_OF and len(arg) >= 2:
            fcntl.fcntl(fd, SET_OF[cmd], F_UNLCK.to_bytes(2, "little") + arg[2:])
    except OSError:
        pass


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


# Issue 10: what the deputy says about its program besides the exec (HELLO fields
# `view`, `parent`), from `--view HEX` and `--parent INSTANCE:PID`.
EXTRA: dict[bytes, bytes] = {}


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
        elif arg == "--view":
            try:
                EXTRA[b"view"] = bytes.fromhex(value)
            except ValueError:
                break
        elif arg == "--parent":
            EXTRA[b"parent"] = os.fsencode(value)
        else:
            break
        i += 2
    raise SystemExit(
        "usage: deputy --agent HOST:PORT [--instance NAME] --ticket-file F "
        "[--reconnect SECONDS] [--view HEX] [--parent INSTANCE:PID] -- PATH ARGV0 [ARGS...]"
    )


# Issue 11: the deputy is the program's process at home, so /proc/PID of its pid
# (`ps -p`, `/proc/PID/cmdline`, `comm`, `stat`, `status`) read there shows the
# program, not a Python deputy: the name and argv of the exec it stands for.
PR_SET_NAME = 15
PR_SET_MM = 35
PR_SET_MM_MAP = 14
_ARGS: list[object] = []  # the new argv area: must live as long as the process


def stand_in(path: bytes, argv: list[bytes]) -> None:
    """Take the name (`comm`) and argv (`cmdline`) the exec of `path` would have given.

    The argv area is replaced with PR_SET_MM_MAP (no privilege needed: the
    kernel checks only that the layout stays within the process's limits; every
    other field is passed back as /proc/self/stat gives it).  Best effort: a
    kernel without CONFIG_CHECKPOINT_RESTORE keeps the deputy's argv.
    """
    import ctypes  # only here: loaded after the remote program was asked for

    libc = ctypes.CDLL(None, use_errno=True)
    name = path.rpartition(b"/")[2][:15]
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    fd = os.open("/proc/self/stat", os.O_RDONLY)
    try:
        fields = os.read(fd, 4096).rpartition(b")")[2].split()
    finally:
        os.close(fd)

    def field(n: int) -> int:  # proc(5)'s 1-based numbering; fields[0] is the 3rd
        return int(fields[n - 3])

    class MmMap(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_uint64)
            for n in (
                "start_code end_code start_data end_data start_brk brk start_stack "
                "arg_start arg_end env_start env_end auxv"
            ).split()
        ] + [("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]

    area = b"".join(a + b"\0" for a in argv)
    buf = ctypes.create_string_buffer(area, max(len(area), 1))
    _ARGS.append(buf)
    start = ctypes.addressof(buf)
    libc.sbrk.restype = ctypes.c_void_p
    mm = MmMap(
        field(26), field(27), field(45), field(46), field(47), libc.sbrk(0) or field(47),
        field(28), start, start + len(area), field(50), field(51), 0, 0, 0xFFFFFFFF,
    )  # fmt: skip
    libc.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0)


ESRCH = 3
SYS_TGKILL = {b"x86_64": 234, b"aarch64": 131}


def _tgkill(tid: int, sig: int) -> int:
    """tgkill(2) of thread `tid` (of whichever process it belongs to here); 0 or errno."""
    import ctypes  # only on this rare path

    try:
        fd = os.open(f"/proc/{tid}/status", os.O_RDONLY)
        try:
            status = os.read(fd, 8192)
        finally:
            os.close(fd)
        tgid = int(status.split(b"\nTgid:", 1)[1].split()[0])
    except (OSError, ValueError, IndexError):
        return ESRCH
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL.get(os.uname().machine.encode(), 234), tgid, tid, sig) != 0:
        return ctypes.get_errno() or ESRCH
    return 0


SI_QUEUE = -1  # si_code of sigqueue(): the one a process may give another's siginfo
FORKED_ELSEWHERE = 1 << 22  # program pids from here up name processes forked on instances
SYS_RT_SIGQUEUEINFO = {b"x86_64": 129, b"aarch64": 138}


def _sigqueue_from(pid: int, sig: int, sender: int) -> int:
    """`sig` to `pid` naming program pid `sender` (a process forked on an instance, which
    has no pid here) in its siginfo; 0 or errno.

    kill() would name us (its session's root).  The kernel lets a process set
    si_pid only with si_code SI_QUEUE; a deputy that receives it passes the
    sender on (`main`), and the receiving tracer delivers it as a kill's (SI_USER).
    """
    import ctypes  # only on this rare path

    info = (ctypes.c_int * 32)()  # siginfo_t: 128 bytes
    info[0], info[2], info[4], info[5] = sig, SI_QUEUE, sender, os.getuid()
    libc = ctypes.CDLL(None, use_errno=True)
    nr = SYS_RT_SIGQUEUEINFO.get(os.uname().machine.encode(), 129)
    if libc.syscall(nr, pid, sig, ctypes.byref(info)) != 0:
        return ctypes.get_errno() or ESRCH
    return 0


PROC_FILES = (b"stat", b"status", b"cmdline", b"comm")
MAX_PROC_FILE = 16384


def _tracer_of(pid: object) -> int:
    """The TracerPid in /proc/`pid`/status (0: untraced or gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            return int(f.read().split(b"\nTracerPid:", 1)[1].split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def proc_view(pid: int, chained: bool = False) -> dict[bytes, bytes]:
    """The PROCD fields of /proc/`pid` (0: the program's pids), of our program alone.

    At home, a process of the program is one its home tracer traces, the one
    that traces us: a process outside the program is ESRCH, as one that does
    not exist.  `chained`: we run on an instance (placed from there), where
    our instance's tracer answers /proc/N with home's, checked there, or with that
    instance's own /proc/N for a pid home does not know as the program's: an
    untraced one of those (the agent, PID 1) is ESRCH (a listing may hold that
    instance's own pids too: their /proc, read through home, is then ENOENT).
    """
    ours = _tracer_of("self")
    if pid < 0 or not (ours or chained):
        return {b"errno": b"%d" % ESRCH}
    if pid == 0:
        found = [n for n in os.listdir("/proc") if n.isdigit()]
        if not chained:
            found = [n for n in found if _tracer_of(n) == ours]
        try:
            with open("/proc/sys/kernel/pid_max", "rb") as f:
                pid_max = f.read(32)
        except OSError:
            pid_max = b""
        return {b"errno": b"0", b"pids": ",".join(found).encode(), b"pid_max": pid_max}
    if not chained and _tracer_of(pid) != ours:
        return {b"errno": b"%d" % ESRCH}
    answer = {b"errno": b"0"}
    for name in PROC_FILES:
        try:
            with open(f"/proc/{pid}/{name.decode()}", "rb") as f:
                answer[name] = f.read(MAX_PROC_FILE)
        except OSError:
            return {b"errno": b"%d" % ESRCH}  # gone meanwhile
    if not chained and _tracer_of(pid) != ours:
        return {b"errno": b"%d" % ESRCH}  # its pid was reused meanwhile
    if chained and _status_tracer(answer[b"status"]) == 0:
        # Our instance's tracer answers a pid home does not know as the program's with
        # that instance's own /proc/N: an untraced process (its agent, PID 1) is no
        # process of any program; the asker then reads its own instance's /proc/N.
        return {b"errno": b"%d" % ESRCH}
    return answer


def _status_tracer(status: bytes) -> int:
    """The TracerPid of a /proc/N/status text (0: untraced, or not found)."""
    try:
        return int(status.split(b"\nTracerPid:", 1)[1].split()[0])
    except (ValueError, IndexError):
        return 0


def _wait_ready(fd: int, writable: bool) -> None:
    """Block until `fd` is readable (or writable); for descriptors left non-blocking."""
    import select  # a C module, loaded only on this rare path

    poller = select.poll()
    poller.register(fd, select.POLLOUT if writable else select.POLLIN)
    poller.poll()


class Deputy:
    """Runs one remote program and mirrors it locally."""

    def __init__(self, link: Link, program: bytes) -> None:
        self.link = link
        self.program = program
        self.main = _thread.get_ident()
        self.result: tuple[str, int, bytes, bytes] | None = None  # kind, value, msg, offsets
        self.dead_outputs: set[int] = set()
        self.inputs: set[int] = set()  # streamed inputs not at their end (read on WANT)
        # Streams that could not be carried whole (a read or write error other
        # than a reader hanging up): the exit status then says so (`finish`).
        self.broken: list[str] = []
        self.loss_note = ""  # where to tell the coordinator that data was lost
        # File locks the remote program takes on descriptors it inherited from us
        # (issue 14): taken here, on our open file descriptions (`_lock`).
        self.lockable: set[int] = set()  # the descriptors described in HELLO
        self.cancelled: set[bytes] = set()  # LOCK requests given up (a signal came)

    def _lock(self, fd: int, payload: bytes) -> None:
        """LOCK: take or test a lock on our `fd` for the remote program, in a thread.

        flock locks belong to our open file description, which the remote
        program's copy of `fd` stands for; POSIX locks to this process, which has
        the remote program's pid.  A blocking request waits in its thread.
        """
        fields = P.pairs(payload)
        req = fields.get(b"req", b"")
        call = fields.get(b"call", b"")
        if call == b"cancel":
            self.cancelled.add(req)
            return
        if fd not in self.lockable or call not in (b"flock", b"fcntl"):
            self.link.send(P.LOCKED, fd, P.unpairs({b"req": req, b"result": b"-9"}))
            return
        cmd = int(fields.get(b"cmd", b"0") or 0)
        _thread.start_new_thread(self._lock_thread, (fd, req, call, cmd, fields.get(b"arg", b"")))

    def _lock_thread(self, fd: int, req: bytes, call: bytes, cmd: int, arg: bytes) -> None:
        import fcntl  # a C module, loaded only by programs that lock

        data = b""
        try:
            if call == b"flock":
                fcntl.flock(fd, int(arg))
            else:
                data = fcntl.fcntl(fd, cmd, arg)
            result = 0
        except OSError as exc:
            result = -(exc.errno or 5)
        except (ValueError, OverflowError):
            result = -22  # EINVAL
        if req in self.cancelled:
            # The remote call already returned EINTR: a lock taken since is undone.
            self.cancelled.discard(req)
            if result == 0:
                _undo_lock(fd, call, cmd, arg)
            return
        if cmd not in GET_LOCK:
            data = b""
        self.link.send(
            P.LOCKED, fd, P.unpairs({b"req": req, b"result": b"%d" % result, b"data": data})
        )

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
                            count = int(payload) if payload.isdigit() else 0
                            _thread.start_new_thread(self.forward_input, (fd, count))
                    elif kind == P.KILL:
                        self._kill(payload)
                    elif kind == P.PROC:
                        self._proc(payload)
                    elif kind == P.LOCK:
                        self._lock(fd, bytes(payload))
                    elif kind == P.WELCOME:
                        link.session = P.pairs(payload).get(b"session", b"")
                    elif kind == P.MOVED:
                        # The program now runs elsewhere: hang up here; the loop's
                        # reconnect resumes the session at its new agent.
                        link.move(payload)
                        old, link.sock = link.sock, None
                        link.pending = []
                        if old is not None:
                            try:
                                old.shutdown(_socket.SHUT_RDWR)
                            except OSError:
                                pass
                            old.close()
                        link.reconnect("moved")
                        break
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
                if link.inbox.ack_due() or link.deferred or link.replies:
                    link.ack()
        except LostError as exc:
            self.wake(("lost", 0, str(exc).encode(), b""))
        except P.FrameError as exc:
            self.wake(("lost", 0, f"protocol error: {exc}".encode(), b""))

    def _kill(self, payload: bytes | bytearray) -> None:
        """KILL: the remote program signals a pid of its own that its instance does not
        hold; we send it here, at home, where that pid is, and answer KILLED.

        The signal is the program's: sent as the program's user, from our pid
        (the program's, for the process that asked), with kill's own outcome.
        """
        try:
            fields = P.pairs(payload)
            req = fields[b"req"]
            pid, sig = int(fields[b"pid"]), int(fields[b"sig"])
        except (P.FrameError, KeyError, ValueError):
            return  # malformed: its asker's deadline answers it
        err = 0
        if pid in (0, -1) or not 0 <= sig < 65:
            err = EINVAL  # never our own group nor every process: the agent names a pid
        elif fields.get(b"thread") == b"1":
            err = _tgkill(pid, sig) if pid > 0 else EINVAL
        elif fields.get(b"from", b"").isdigit() and pid > 0:
            err = _sigqueue_from(pid, sig, int(fields[b"from"]))
        else:
            try:
                os.kill(pid, sig)
            except OSError as exc:
                err = exc.errno or EINVAL
        self.link.reply(P.frame(P.KILLED, 0, P.unpairs({b"req": req, b"errno": b"%d" % err})))

    def _proc(self, payload: bytes | bytearray) -> None:
        """PROC: the remote program reads /proc of one of its pids its instance does not
        hold; we read it here, where that pid is, and answer PROCD (`proc_view`)."""
        try:
            fields = P.pairs(payload)
            req, pid = fields[b"req"], int(fields[b"pid"])
        except (P.FrameError, KeyError, ValueError):
            return  # malformed: its asker's deadline answers it
        # `--parent INSTANCE:PID`: placed from an instance (home's deputies say `home`).
        chained = not EXTRA.get(b"parent", b"home:").startswith(b"home:")
        answer = proc_view(pid, chained)
        answer[b"req"] = req
        self.link.reply(P.frame(P.PROCD, 0, P.unpairs(answer)))

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

    def forward_input(self, fd: int, count: int) -> None:
        """Input thread, one per WANT: the remote program reads `fd`; one read for it.

        The agent sends WANT when the remote program blocks reading its copy of
        the pipe, with the byte count it asked for, and the next WANT only once
        this DATA is in that pipe.  So a remote read takes from `fd` what a
        native read of that size would, and a program that never reads leaves
        every byte to the next reader: processes that share a pipe
        (`... | while read l; do remote_cmd; done`, a multiprocessing queue read
        by workers on several instances) each take their own messages.
        """
        size = min(count, P.CHUNK) if count > 0 else P.CHUNK
        while True:
            try:
                data = os.read(fd, size)
            except BlockingIOError:
                _wait_ready(fd, writable=False)  # a non-blocking description: wait
                continue
            except OSError as exc:
                # Not an end of input: the remote program gets EOF (it must not
                # wait forever) and the exit status says the input was cut.
                self.broken.append(f"reading descriptor {fd} failed: {exc.strerror}")
                data = b""
            break
        if not data:
            self.inputs.discard(fd)
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
            if value not in (_signal.SIGKILL, _signal.SIGSTOP):
                # SIGKILL and SIGSTOP take no disposition (signal() gives EINVAL):
                # they are sent as they are, and SIGKILL kills this process too.
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


def _noted(path: str) -> bool:
    """Is there a note from home at `path` (failover, issue 12)?"""
    try:
        os.stat(path)
    except OSError:
        return False
    return bool(path)


def main(argv: list[str]) -> int:
    """Run PATH remotely and mirror it; return the exit status."""
    try:
        agent, instance, ticket, ticket_file, window, rest = _parse(argv)
    except SystemExit as exc:
        _say(str(exc))
        return USAGE_STATUS
    fd_records, ins, _outs = classify_fds()
    masks = _signal_masks()
    # Issue 11: the program's pids, its own and its parent's (the placed process
    # takes them over; on an instance these calls are answered in the home's pids).
    EXTRA[b"pid"] = b"%d" % os.getpid()
    EXTRA[b"ppid"] = b"%d" % os.getppid()
    hello = build_hello(rest, fd_records, masks, EXTRA)
    sigs = set(FORWARDED) | set(STOPPERS) | {WAKE}
    # Block before any thread starts so every thread inherits the mask and only
    # the main thread's sigwait sees them.
    _signal.pthread_sigmask(_signal.SIG_BLOCK, sigs)
    link = Link(agent, instance, window, ticket)
    deputy = Deputy(link, rest[1] if len(rest) > 1 else rest[0])
    deputy.loss_note = ticket_file + P.LOSS_SUFFIX
    link.redirect = ticket_file + P.MOVED_SUFFIX  # failover: home says where it went
    try:
        link.open(hello)
    except LostError as exc:
        kind = "lost" if isinstance(exc, Unreachable) else "refused"
        deputy.result = (kind, 0, str(exc).encode(), b"")
        return deputy.finish()
    try:
        # Before the receiver runs: once the remote program's output shows, so does this.
        stand_in(rest[0], rest[1:])
    except Exception:  # noqa: BLE001 - a deputy that keeps its own name still works
        pass
    deputy.inputs.update(ins)  # before the receiver runs: it may get WANT at once
    deputy.lockable.update(int(P.unrecord(r)[0]) for r in fd_records)
    _thread.start_new_thread(deputy.receive, ())
    while deputy.result is None:
        info = _signal.sigwaitinfo(sigs)
        sig = info.si_signo
        if sig == WAKE and deputy.result is None and _noted(link.redirect):
            link.hang_up()  # home says the program runs elsewhere now: the receiver follows
        if sig != WAKE and deputy.result is None:
            if sig in STOPPERS:
                if masks[0] & (1 << (sig - 1)):
                    continue  # the program ignored it: so does the remote one
                # The remote job is a session of its own, hence an orphaned process
                # group, where the kernel discards TSTP/TTIN/TTOU: send SIGSTOP.
                link.send(P.SIGNAL, _signal.SIGSTOP, b"")
                os.kill(os.getpid(), _signal.SIGSTOP)  # SIGCONT resumes us, then is forwarded
            elif _group_signal(info.si_code, info.si_pid):
                # From the terminal (Ctrl-C, Ctrl-\\, hangup), or the agent's delivery of
                # one to our group: it went to the whole group here, so it goes to the
                # remote program's group too, and on down the chain of deputies (as a
                # tty reaches make's compilers).
                link.send(P.SIGNAL, sig, P.GROUP)
            elif info.si_code == SI_USER or (
                info.si_code == SI_QUEUE and info.si_pid >= FORKED_ELSEWHERE
            ):
                # Who sent it, in the program's pids (a home pid is one): the remote
                # process gets it with this sender, as natively (issue 11).
                sender = {b"from": b"%d" % info.si_pid, b"uid": b"%d" % info.si_uid}
                link.send(P.SIGNAL, sig, P.unpairs(sender))
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
