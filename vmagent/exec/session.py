"""One program the agent runs for a deputy, and the streams that mirror it there.

A `Session` opens the descriptors the deputy described in HELLO (files and this
host's own terminal by path, pipes for what is streamed), forks the program,
then carries frames both ways: the deputy's input into the program's pipes
(acknowledged once delivered, which bounds what the agent buffers), the
program's output back as sequenced frames kept until acknowledged, signals to
the program, and its exit status with the file offsets once its output is
drained.  It outlives its connection for the reconnect window, replaying what
the deputy did not acknowledge when it resumes (`vmagent.exec.server` owns the
connections and the set of sessions).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
from typing import TYPE_CHECKING

from vmagent.exec import filelocks
from vmagent.exec import protocol as P
from vmagent.exec.spawn import (
    GATE_HUNG,
    ExecRequest,
    GateClosed,
    SpawnFailed,
    fork_program,
    parse_report,
)
from vmagent.trace import channel
from vmagent.trace.pidspace import PID_MAX_LIMIT

if TYPE_CHECKING:
    from vmagent.exec.server import ExecProtocol, ExecService

log = logging.getLogger(__name__)

WATCH_FIRST = 0.001  # first look for a reader of a streamed input (s)
WATCH_MAX = 0.1  # slowest look, for a program that does not read its input
JOB_CONTROL = frozenset({int(signal.SIGSTOP), int(signal.SIGCONT)})  # sent to the whole job


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
        # Input fds with a WANT out: the deputy answers each with one DATA (or EOF),
        # which re-arms the watch once it is in the program's pipe.
        self.asked: dict[int, int] = {}  # input fd -> its pipe inode
        self._watch: asyncio.TimerHandle | None = None
        self.reading = False
        self.finished = False
        self.forgotten = False
        self.nonce = ""  # of the ticket that started the session (a resume must show it)
        self.program_id: str | None = None  # the OSS program, as its exec ticket says
        self._abandon: asyncio.TimerHandle | None = None
        self._drain: asyncio.TimerHandle | None = None
        self.view = b""  # what the program sees (path maps...), applied by its tracer
        self.trace_sock: socket.socket | None = None  # channel from the instance tracer
        self.tracer_pid = 0  # the instance tracer T (killing it kills the whole tree)
        # The base its forked processes' program pids are numbered with
        # (`vmagent.trace.pidspace`): 0, this instance's; a migrated tree keeps its origin's.
        self.pid_base = 0
        self._trace_failure = ""  # the tracer's op=failed message
        self._errors = -1  # the child's exec-report pipe, until it exec'd or failed
        self._report = b""
        self._gate_timer: asyncio.TimerHandle | None = None
        # A checkpoint waits here for its tracer's `op=detached` (vmagent.checkpoint).
        self.detached: asyncio.Future[tuple[int, ...]] | None = None
        self.key = ""  # what the deputy proves (its ticket's secret, or a moved key)
        # Migration (vmagent.checkpoint.migrate): while `migrating`, sequenced frames
        # from the deputy are left unacknowledged (it replays them where the program
        # lands); once `moved`, the program is no longer here: nothing is killed.
        self.migrating = False
        self.moved = False
        self._lock_fds: dict[bytes, int] = {}  # LOCK requests at the deputy
        self._lock_sock: socket.socket | None = None  # T's lock requests (vmagent.exec.filelocks)

    # -- start ---------------------------------------------------------------
    def start(self) -> None:
        """Create the descriptors and fork the program; its exec is settled on the loop.

        Raises when nothing was forked (descriptors, a dead instance tracer).
        The exec's outcome arrives later: STARTED, or EXIT kind=error.
        """
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
            # The program's pipes keep the kernel's default size: a larger one
            # would let a writer run further ahead of its reader than natively.
            tracing = self.service.tracing
            if tracing is None:  # benchmarks' untraced baseline only
                forked = fork_program(self.request, sources, None)
            else:
                gate = tracing.gate(self.view)

                def hand_off(pid: int, go_w: int) -> None:
                    self.trace_sock = tracing.hand_off(
                        self.sid.hex(), pid, go_w, self.view, (self.request.pid, self.request.ppid)
                    )

                timeout = self.service.config.trace_timeout
                spread_pids()
                forked = fork_program(self.request, sources, gate, hand_off, timeout)
        except GateClosed as exc:
            self.close_fds()
            raise GateClosed(self._refusal(str(exc))) from exc
        except Exception:
            self.close_fds()
            self._close_trace()
            raise
        finally:
            for fd in ours:
                os.close(fd)
            # The child holds its own blocking ends; ours for the program side are closed.
        self.pid = forked.pid
        self._errors = forked.errors
        os.set_blocking(self._errors, False)
        self.loop.add_reader(self._errors, self._exec_readable)
        self._gate_timer = self.loop.call_later(self.service.config.trace_timeout, self._gate_hung)
        self.service.hooks.started(self)
        if self.trace_sock is not None:
            self.loop.add_reader(self.trace_sock, self._trace_readable)
        for fd, r in self.outs.items():
            self.loop.add_reader(r, self._readable, fd, r)
        self.reading = True
        if self.unwanted:
            self._watch = self.loop.call_later(WATCH_FIRST, self._watch_inputs, WATCH_FIRST)

    # -- the exec ---------------------------------------------------------------------
    def _exec_readable(self) -> None:
        """The child's report pipe: a failure report, or EOF once it exec'd."""
        try:
            data = os.read(self._errors, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data and len(self._report) < 4096:
            self._report += data
            return
        self._exec_settled(self._report)

    def _settle_now(self) -> None:
        """Settle the exec before anything that implies it ended (output, the exit)."""
        while self._errors >= 0:
            try:
                data = os.read(self._errors, 4096)
            except BlockingIOError:
                return  # still between fork and exec: the reader settles it
            except OSError:
                data = b""
            if not data:
                self._exec_settled(self._report)
            else:
                self._report += data

    def _gate_hung(self) -> None:
        self._gate_timer = None
        if self._errors >= 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # the reaper takes it
            self._exec_settled(None)

    def _stop_watching_exec(self) -> None:
        if self._gate_timer is not None:
            self._gate_timer.cancel()
            self._gate_timer = None
        if self._errors >= 0:
            self.loop.remove_reader(self._errors)
            os.close(self._errors)
            self._errors = -1

    def _exec_settled(self, report: bytes | None) -> None:
        """The program exec'd (STARTED) or never will (EXIT kind=error)."""
        self._stop_watching_exec()
        failed: SpawnFailed | None = GateClosed(GATE_HUNG) if report is None else None
        if report is not None:
            failed = parse_report(report)
        counts = self.service.counts
        if failed is None:
            counts["started"] += 1
            self.send(P.STARTED, 0, P.unpairs({b"pid": str(self.pid).encode()}))
            log.info("started %s pid=%d session=%s", self.program, self.pid, self.sid.hex()[:8])
            return
        counts["failed"] += 1
        self.close_fds()
        if isinstance(failed, GateClosed):
            message = self._refusal(str(failed))
            log.warning("%s not started: %s", self.program, message)
            self.fail(failed.errno, message, failed.status)
        else:
            self.fail(failed.errno, str(failed))

    # -- the instance tracer ------------------------------------------------------
    def _refusal(self, message: str) -> str:
        """Why the tracer never released the program (its `op=failed`, else `message`)."""
        if self._trace_failure:
            return self._cannot_trace(self._trace_failure)
        if self.trace_sock is not None:
            with contextlib.suppress(OSError, channel.ChannelError):
                while True:
                    data, _fds = channel.receive(self.trace_sock)
                    if not data:
                        break
                    record = channel.decode(data)
                    if record[b"op"] == channel.OP_FAILED:
                        message = self._cannot_trace(record.get(b"message", b""))
                        break
        self._close_trace()
        return message

    def _cannot_trace(self, reason: bytes | str) -> str:
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        return f"cannot trace {self.program} on {self.service.config.instance}: {reason}"

    def _trace_readable(self) -> None:
        """Records from the instance tracer: hand each to the session hooks."""
        sock = self.trace_sock
        if sock is None:
            return
        while True:
            try:
                data, fds = channel.receive(sock)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if fds and self._lock_sock is None:
                with contextlib.suppress(channel.ChannelError):
                    if channel.decode(data)[b"op"] == filelocks.OP_LOCKCHAN:
                        self._open_locks(fds.pop(0))
            for fd in fds:
                os.close(fd)
            if not data:
                self._close_trace()  # the tracer is gone (op=done, or killed)
                self._maybe_finish()
                return
            try:
                record = channel.decode(data)
            except channel.ChannelError as exc:
                log.warning("session %s: %s", self.sid.hex()[:8], exc)
                continue
            if record[b"op"] == channel.OP_SEIZED:
                with contextlib.suppress(channel.ChannelError):
                    self.tracer_pid = channel.number(record, b"tracer")
            elif record[b"op"] == channel.OP_FAILED:
                self._trace_failure = record.get(b"message", b"").decode(errors="replace")
            elif record[b"op"] == channel.OP_KILL and self._kill_at_home(record):
                continue  # asked of the deputy, not an event
            elif record[b"op"] == channel.OP_PROC:
                self._proc_at_home(record)
                continue
            elif record[b"op"] == channel.OP_DETACHED:
                if self.detached is not None and not self.detached.done():
                    try:
                        self.detached.set_result(channel.pids_of(record))
                    except channel.ChannelError as exc:
                        self.detached.set_exception(exc)
            self.service.hooks.trace_message(self, record)

    def _kill_at_home(self, record: channel.Record) -> bool:
        """`op=kill` from the tracer: the deputy sends it at home (P.KILL), or ESRCH now.

        False: a pid forked on an instance (above every home pid), which the
        session hooks send through the OSS (`vmagent.trace.signals`).
        """
        try:
            req = record[b"req"]
            pid, sig = channel.number(record, b"pid"), channel.number(record, b"sig")
        except (KeyError, channel.ChannelError) as exc:
            log.warning("session %s: %s", self.sid.hex()[:8], exc)
            return True
        if pid >= PID_MAX_LIMIT:
            return False
        if self.proto is None or self.moved or len(req) > 24 or pid <= -PID_MAX_LIMIT:
            self.killed(req, errno.ESRCH)  # nowhere to send it: as for a pid that is gone
            return True
        fields = {b"req": req, b"pid": b"%d" % pid, b"sig": b"%d" % sig}
        if record.get(b"thread") == b"1":
            fields[b"thread"] = b"1"  # tgkill/tkill: `pid` is a thread's id
        sender = record.get(b"from", b"")
        if sender.isdigit() and int(sender) >= PID_MAX_LIMIT:
            fields[b"from"] = sender  # forked here: the deputy names it as the sender
        self.proto.write(P.frame(P.KILL, 0, P.unpairs(fields)))
        return True

    def _proc_at_home(self, record: channel.Record) -> None:
        """`op=proc` from the tracer: the deputy reads /proc/PID at home (P.PROC)."""
        req = record.get(b"req", b"")
        try:
            pid = channel.number(record, b"pid")
        except channel.ChannelError:
            pid = -1
        if self.proto is None or self.moved or len(req) > 24 or not 0 <= pid < PID_MAX_LIMIT:
            self._procd({b"req": req, b"errno": b"%d" % errno.ESRCH})
            return
        self.proto.write(P.frame(P.PROC, 0, P.unpairs({b"req": req, b"pid": b"%d" % pid})))

    def _procd(self, fields: dict[bytes, bytes]) -> None:
        """Answer the tracer's `op=proc` with the deputy's fields (`P.PROCD`)."""
        if self.trace_sock is not None:
            with contextlib.suppress(OSError):
                channel.send(self.trace_sock, channel.encode(channel.OP_PROCD, **{
                    k.decode(): v for k, v in fields.items() if k != b"op"
                }))  # fmt: skip

    def _sender(self, sig: int, payload: bytes) -> None:
        """Tell the tracer who sent the signal about to be killed with (`op=sigfrom`)."""
        if not payload or self.trace_sock is None:
            return
        try:
            fields = P.pairs(payload)
            sender, uid = int(fields[b"from"]), int(fields[b"uid"])
        except (P.FrameError, KeyError, ValueError):
            return  # delivered with the agent as its sender
        self.tell_sender(self.pid, sig, sender, uid)

    def tell_sender(self, pid: int, sig: int, sender: int, uid: int) -> None:
        """Before the agent kills `pid` (a process of this session) with `sig` for the
        program's `sender` of user `uid`: the tracer makes that the siginfo's sender."""
        if self.trace_sock is None:
            return
        record = channel.encode(
            channel.OP_SIGFROM, pid=pid, sig=sig, agent=os.getpid(), uid=uid,
            **{"from": sender},
        )  # fmt: skip
        with contextlib.suppress(OSError):
            channel.send(self.trace_sock, record)

    def killed(self, req: bytes, err: int) -> None:
        """Answer the tracer's `op=kill` `req` with `err`."""
        if self.trace_sock is not None:
            with contextlib.suppress(OSError):
                channel.send(self.trace_sock, channel.encode(channel.OP_KILLED, req=req, errno=err))

    def _open_locks(self, fd: int) -> None:
        """T's lock socket (`op=lockchan`): its requests are served from now on."""
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        self._lock_sock = sock
        self.loop.add_reader(sock, self._locks_readable)

    def _locks_readable(self) -> None:
        sock = self._lock_sock
        if sock is None:
            return
        while True:
            try:
                data, fds = channel.receive(sock)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            for fd in fds:
                os.close(fd)
            if not data:
                self._close_locks()
                return
            try:
                record = channel.decode(data)
            except channel.ChannelError as exc:
                log.warning("session %s: %s", self.sid.hex()[:8], exc)
                continue
            if record[b"op"] == filelocks.OP_LOCK:
                self._lock(record)

    def _close_locks(self) -> None:
        sock, self._lock_sock = self._lock_sock, None
        if sock is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(sock)
            sock.close()

    def _lock(self, record: channel.Record) -> None:
        """T's `op=lock`: the deputy locks its descriptor, or the kernel here does."""
        req = record.get(b"req", b"")
        if record.get(b"call") == filelocks.CANCEL:
            held = self._lock_fds.pop(req, None)
            if held is not None:
                self.send(P.LOCK, held, filelocks.deputy_request(record))
            return
        try:
            pid, fd = channel.number(record, b"pid"), channel.number(record, b"fd")
        except channel.ChannelError:
            pid = fd = -1
        pipes = {**self.outs, **self.ins}
        found = filelocks.inherited(pid, fd, self.paths, pipes) if pid > 0 else None
        if found is None or self.finished:
            self._to_tracer(filelocks.native_record(req))
            return
        self._lock_fds[req] = found
        target = found
        self.send(P.LOCK, target, filelocks.deputy_request(record))

    def _locked(self, payload: bytes) -> None:
        """The deputy's LOCKED: pass its answer on to T."""
        try:
            fields = P.pairs(payload)
        except P.FrameError:
            return
        req = fields.get(b"req", b"")
        if self._lock_fds.pop(req, None) is not None:
            self._to_tracer(
                filelocks.locked_record(req, fields.get(b"result", b"-5"), fields.get(b"data", b""))
            )

    def _to_tracer(self, message: bytes) -> None:
        sock = self._lock_sock
        if sock is not None:
            with contextlib.suppress(OSError):
                channel.send(sock, message)

    def _close_trace(self) -> None:
        self._close_locks()
        sock, self.trace_sock = self.trace_sock, None
        if sock is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(sock)
            sock.close()

    def _watch_inputs(self, interval: float) -> None:
        """Tell the deputy to start forwarding an input once the program reads it.

        Polls /proc (a few small reads, on the loop: cheaper than a thread hop),
        quickly at first, then backing off to WATCH_MAX while nobody reads.
        """
        self._watch = None
        if self.status is not None or not self.unwanted or self.forgotten:
            return
        for ino, count in self.service.probe.waiting(self.pid, self.unwanted).items():
            fd = self.unwanted.pop(ino)
            self.asked[fd] = ino
            self.send(P.WANT, fd, str(count).encode() if count else b"")
        if self.unwanted:
            nxt = min(interval * 2, WATCH_MAX)
            self._watch = self.loop.call_later(nxt, self._watch_inputs, nxt)

    # -- frames from the deputy -----------------------------------------------
    def on_frame(self, kind: int, fd: int, seq: int, payload: bytes) -> None:
        """Apply one frame received from the deputy."""
        if (self.migrating or self.moved) and kind != P.ACK:
            return  # unacknowledged: replayed to wherever the program runs next
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
                    if fd in JOB_CONTROL or payload == P.GROUP:
                        os.killpg(self.pid, fd)  # the whole remote job (a terminal's signal)
                    else:
                        self._sender(fd, payload)
                        os.kill(self.pid, fd)
        elif kind == P.PROCD:
            with contextlib.suppress(P.FrameError):  # malformed: the tracer's deadline answers
                self._procd(P.pairs(payload))
        elif kind == P.KILLED:
            try:
                fields = P.pairs(payload)
            except P.FrameError:
                fields = {}  # the tracer's deadline answers it
            err = fields.get(b"errno", b"")
            self.killed(fields.get(b"req", b""), int(err) if err.isdigit() else errno.EINVAL)
        elif kind == P.LOCKED:
            self._locked(payload)
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
            self.asked.pop(fd, None)
            self._close_in(fd)
        elif fd in self.asked:
            # Delivered: the next read of the program asks again (one WANT, one DATA:
            # a remote read takes what a native read of that size would, no more).
            self.unwanted[self.asked.pop(fd)] = fd
            if self._watch is not None:
                self._watch.cancel()
            self._watch = self.loop.call_later(WATCH_FIRST, self._watch_inputs, WATCH_FIRST)
        self._delivered(0)

    def _close_in(self, fd: int) -> None:
        w = self.ins.pop(fd, None)
        if w is not None:
            self.loop.remove_writer(w)
            os.close(w)

    # -- program output ----------------------------------------------------------
    def _readable(self, fd: int, r: int) -> None:
        if self._errors >= 0:
            self._settle_now()  # output (or EOF) first settles the exec: STARTED goes first
            if fd not in self.outs:
                return  # it failed: its descriptors are closed and EXIT sent
        try:
            data = os.read(r, P.CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.send(P.DATA, fd, data)
            self.service.hooks.output(self, fd, data)
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
        if self._errors >= 0:
            self._settle_now()  # its report is complete now that it is gone
            if self._errors >= 0:  # the pipe outlived it (cannot happen: CLOEXEC)
                self._exec_settled(self._report)
        self.status = status
        self.service.hooks.ended(self, status)
        if self.outs or self.trace_sock is not None:
            # Output still in the pipes, or an orphan of the program holds them open;
            # or the instance tracer has not ended yet (it removes what it kept of
            # other processes, /proc snapshots, before it does): both bounded.
            grace = self.service.config.drain_grace
            if self.trace_sock is not None:
                grace = max(grace, self.service.config.tracer_grace)
            self._drain = self.loop.call_later(grace, self._finish)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.status is not None and not self.outs and self.trace_sock is None:
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
                    self.service.hooks.output(self, fd, data)
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

    def fail(self, err: int, message: str, value: int | None = None) -> None:
        """The program could not start: report like an exec failure (or with `value`)."""
        self.finished = True
        if value is None:
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
        """SIGKILL the program's tracer (EXITKILL: its whole tree) and its process group."""
        if self.moved:
            return  # the program runs on another instance now
        if self.tracer_pid and self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.tracer_pid, signal.SIGKILL)
        if self.pid and self.status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def close_fds(self) -> None:
        """Release every descriptor the session holds."""
        self._stop_watching_exec()
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


PID_LOW = 10_000  # programs' pids are drawn above this (below: the agent's own helpers)
PID_SPAN = 1 << 16  # room kept above a program's pid for its descendants (at most)


def spread_pids() -> None:
    """Let the next program's pids start at a random place of this PID namespace.

    A program migrates with its pids (vmagent.checkpoint.migrate), which must be
    free on the target.  Agents of fresh instances all count up from 1 alike,
    so sequential pids would collide; random regions rarely do.  Only for an
    agent that is PID 1 of its own namespace (local instances), or that its
    guest's init says owns the namespace (`DCP_SPREAD_PIDS=1`: in a VM the
    whole guest is the instance, its init PID 1): a host namespace's
    allocation is not ours to move.
    """
    if os.getpid() != 1 and os.environ.get("DCP_SPREAD_PIDS") != "1":
        return
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/sys/kernel/pid_max") as f:
            most = int(f.read())
        top = most - min(PID_SPAN, most // 8)
        if top > PID_LOW:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(PID_LOW + int.from_bytes(os.urandom(4), "big") % (top - PID_LOW)))
