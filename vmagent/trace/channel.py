"""The channel between an agent, its zygote and the instance tracers (codec + socket adapters).

One `SOCK_SEQPACKET` message is one record of key/value pairs
(`vmagent.exec.protocol.pairs`, the deputy's encoding: no json), all values
bytes, numbers in decimal.  Records by direction:

agent -> zygote  `op=trace session pid instance view`, with descriptors
                 `[chan, go_w, pidfd]` (SCM_RIGHTS): trace `pid` (the process
                 `pidfd` refers to), release it through `go_w`, report on `chan`.
tracer -> agent  `op=seized pid tracer` (the tracer's own pid)
                 `op=failed pid message` (the program never runs)
                 `op=event kind=spawn pid ppid ts` (ppid 0: the session's program)
                 `op=event kind=exec pid argv ts` (argv: a `protocol.record`)
                 `op=event kind=exit pid status|signal ts`
                 `op=usage pid final=1 cpu_us maxrss_kb rchar wchar rbytes wbytes
                 [net_rx net_tx ...] sys=<service=n,...>` (one per process)
                 `op=done` (no tracee left: the tracer exits)
agent -> tracer  `op=detach` (checkpoint): the tracer stops every process of the
                 tree (SIGSTOP, pending while each thread is held at a ptrace
                 stop outside any intercepted call), detaches every thread and
                 answers `op=detached pids` (the tree's processes, root first,
                 comma-separated), then exits; the tree stays stopped, untraced.
agent -> zygote  `op=adopt session pids instance view vpid vppid base`, with `[chan]`:
                 a tracer seizes every thread of those stopped processes (a restored
                 or checkpointed tree), answers `op=seized pid tracer`, continues them
                 (SIGCONT) and serves them as if it had traced them from the start,
                 in the same program pids: the root (first of `pids`) is `vpid`,
                 child of `vppid`, and the others `base` + their pid, `base` the one
                 the tree was numbered with where it started
                 (`vmagent.trace.pidspace`; 0s: the instance's own pids).
tracer -> agent  `op=kill req pid sig`: the program signals its pid `pid` (negative: a
                 process group) that this instance does not hold: the agent asks
                 the session's deputy to send it at home (`P.KILL`), then answers
                 `op=killed req errno` (0: sent; ESRCH when no deputy is there).
agent -> tracer  `op=sigfrom pid sig agent from uid`: the agent is about to kill(`pid`,
                 `sig`) for the program's process `from` of user `uid` (a signal its
                 deputy caught at home): at that signal's delivery stop, the tracer
                 makes si_pid/si_uid `from`/`uid` where the kernel wrote the agent's
                 pid `agent` (issue 11: the sender in the program's pids).
tracer -> agent  `op=proc req pid`: the program reads /proc/`pid` of a program pid this
                 instance does not hold (pid 0: lists /proc): the agent asks the
                 session's deputy (`P.PROC`), which reads it at home, then answers
                 `op=procd req errno` with `stat status cmdline comm` (or `pids`,
                 comma-separated); ESRCH: no such process of the program there.
tracer -> agent  `op=lockchan` with `[sock]`: T's lock socket (issue 14); lock
                 requests and answers travel on it (`vmagent.exec.filelocks`).
agent hooks      `op=migrated pid from to freeze_ms` (not from a tracer: the source
                 agent's migration, `vmagent.checkpoint.migrate`, told to the
                 session hooks as a record, for the OSS link and telemetry).

`ts` is the tracer's wall clock (seconds, microsecond decimals).  Records
after `op=seized` are fire-and-forget: the tracer never waits for the agent.
"""

from __future__ import annotations

import array
import os
import select
import socket
import time
from collections.abc import Callable, Mapping

from vmagent.errors import AgentError
from vmagent.exec import protocol as P

MAX_MESSAGE = 1 << 20  # a record larger than this is broken (argv is bounded by the kernel)
MAX_FDS = 3

OP_TRACE = b"trace"
OP_SEIZED = b"seized"
OP_FAILED = b"failed"
OP_EVENT = b"event"
OP_USAGE = b"usage"
OP_DONE = b"done"
OP_DETACH = b"detach"
OP_DETACHED = b"detached"
OP_ADOPT = b"adopt"
OP_KILL = b"kill"
OP_KILLED = b"killed"
OP_SIGFROM = b"sigfrom"
OP_PROC = b"proc"
OP_PROCD = b"procd"

Record = dict[bytes, bytes]


class ChannelError(AgentError):
    """A tracer channel message is malformed."""


class AgentGone(ChannelError):
    """The agent closed the channel while T waited for an answer."""


def encode(op: bytes, **fields: bytes | int | str) -> bytes:
    """One message: `op` first, then `fields` (ints and str become their decimal/UTF-8 bytes)."""
    out: dict[bytes, bytes] = {b"op": op}
    for key, value in fields.items():
        if isinstance(value, bool):
            raise TypeError(f"field {key}: booleans are written as 0/1 ints")
        if isinstance(value, int):
            value = str(value).encode()
        elif isinstance(value, str):
            value = value.encode()
        out[key.encode()] = value
    return P.unpairs(out)


def decode(data: bytes) -> Record:
    """The record of one message; ChannelError if it is not a record with an `op`."""
    try:
        record = P.pairs(data)
    except P.FrameError as exc:
        raise ChannelError(f"malformed tracer message: {exc}") from exc
    if not record.get(b"op"):
        raise ChannelError("tracer message without op")
    return record


def number(record: Record, key: bytes) -> int:
    """An integer field; ChannelError naming it if absent or not a number."""
    raw = record.get(key)
    if raw is None or len(raw) > 24 or not raw.removeprefix(b"-").isdigit():
        raise ChannelError(f"tracer message field {key.decode()} is not a number")
    return int(raw)


def now() -> bytes:
    """The `ts` of an event."""
    return f"{time.time():.6f}".encode()


# -- records -------------------------------------------------------------------


def trace_request(
    session: str, pid: int, instance: str, view: bytes, pids: tuple[int, int] = (0, 0)
) -> bytes:
    """agent -> zygote: trace `pid` of `session` (sent with `[chan, go_w, pidfd]`).

    `pids` (`vpid`, `vppid`): the program pid `pid` stands for and its parent's.
    """
    return encode(
        OP_TRACE, session=session, pid=pid, instance=instance, view=view,
        vpid=pids[0], vppid=pids[1],
    )  # fmt: skip


def adopt_request(
    session: str,
    pids: tuple[int, ...],
    instance: str,
    view: bytes,
    program: tuple[int, int] = (0, 0),
    base: int = 0,
) -> bytes:
    """agent -> zygote: adopt the stopped processes `pids` (root first; sent with `[chan]`).

    `program` (`vpid`, `vppid`) and `base`: the program pids the tree had (issue 11).
    """
    return encode(
        OP_ADOPT, session=session, pids=pid_list(pids), instance=instance, view=view,
        vpid=program[0], vppid=program[1], base=base,
    )  # fmt: skip


def optional_number(record: Record, key: bytes) -> int:
    """An integer field that older peers leave out (0 then); ChannelError if not a number."""
    return number(record, key) if key in record else 0


def pid_list(pids: tuple[int, ...]) -> bytes:
    """`pids` as the comma-separated field of `op=detached` / `op=adopt`."""
    return ",".join(str(p) for p in pids).encode()


def pids_of(record: Record) -> tuple[int, ...]:
    """The `pids` field; ChannelError if it is not a non-empty list of numbers."""
    items = record.get(b"pids", b"").split(b",")
    if not items or not all(i.isdigit() and len(i) < 12 for i in items):
        raise ChannelError("tracer message field pids is not a list of numbers")
    return tuple(int(i) for i in items)


def spawned(pid: int, ppid: int) -> bytes:
    return encode(OP_EVENT, kind=b"spawn", pid=pid, ppid=ppid, ts=now())


def exec_event(pid: int, argv: tuple[str, ...]) -> bytes:
    return encode(
        OP_EVENT, kind=b"exec", pid=pid, argv=P.record([a.encode() for a in argv]), ts=now()
    )


def exited(pid: int, status: int | None, signal: int | None) -> bytes:
    how: dict[str, bytes | int | str] = {"signal": signal} if signal else {"status": status or 0}
    return encode(OP_EVENT, kind=b"exit", pid=pid, ts=now(), **how)


def usage(
    pid: int, cpu_us: int, maxrss_kb: int, io: Mapping[str, int], syscalls: Mapping[str, int]
) -> bytes:
    """`op=usage`: every counter of `io` becomes a field; `sys` is `service=n,...`."""
    sys = ",".join(f"{k}={v}" for k, v in sorted(syscalls.items()))
    fields: dict[str, bytes | int | str] = {"pid": pid, "final": 1}
    fields.update(cpu_us=cpu_us, maxrss_kb=maxrss_kb)
    fields.update({k: v for k, v in io.items() if k not in fields})
    fields["sys"] = sys
    return encode(OP_USAGE, **fields)


def services(record: Record) -> dict[str, int]:
    """The `sys` field of a usage record as a mapping."""
    out: dict[str, int] = {}
    for item in record.get(b"sys", b"").decode(errors="replace").split(","):
        name, sep, count = item.partition("=")
        if sep and count.isdigit():
            out[name] = int(count)
    return out


# -- views (until vmagent.exec.view exists: the path maps only) --------------------


def encode_maps(maps: tuple[tuple[str, str], ...]) -> bytes:
    """A minimal view carrying only path maps: `maps` = record of (virtual, real) records."""
    if not maps:
        return b""
    return P.unpairs({b"maps": P.record([P.record([v.encode(), r.encode()]) for v, r in maps])})


def view_maps(view: bytes) -> tuple[tuple[str, str], ...]:
    """The (virtual, real) path maps of an opaque view; () for an empty one.

    Reads the `maps` field, the one part of a view the instance tracer applies.
    """
    if not view:
        return ()
    try:
        fields = P.pairs(view)
        out = []
        for item in P.unrecord(fields.get(b"maps", b"")):
            virtual, real = P.unrecord(item)
            out.append((virtual.decode(), real.decode()))
    except (P.FrameError, ValueError) as exc:
        raise ChannelError(f"malformed view: {exc}") from exc
    return tuple(out)


# -- socket adapters -------------------------------------------------------------


def send(sock: socket.socket, message: bytes, fds: tuple[int, ...] = ()) -> None:
    """Send one message (with descriptors); OSError if the peer is gone."""
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        sock.sendmsg([message], ancillary)
    else:
        sock.send(message)


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the descriptors that came with it; (b"", []) at EOF."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize)
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def exchange(
    chan: socket.socket,
    message: bytes,
    req: bytes,
    timeout: float,
    keep: Callable[[bytes], None],
    answers: frozenset[bytes],
    ops: frozenset[bytes] | None = None,
) -> Record | None:
    """Send `message`, then the agent's record answering `req` with an op of `ops`
    (default: any of `answers`); None: none in `timeout`; AgentGone: the agent closed the
    channel.  Records whose op is not one of `answers` are commands that arrived
    meanwhile: they go to `keep`; a late answer to an earlier request is dropped."""
    send(chan, message)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([chan], [], [], left)[0]:
            continue
        data, fds = receive(chan)
        for fd in fds:
            os.close(fd)
        if not data:
            raise AgentGone("the agent is gone")
        record = decode(data)
        op = record.get(b"op")
        if op not in answers:
            keep(data)
        elif op in (ops or answers) and record.get(b"req") == req:
            return record
    return None
