"""The exec wire protocol between a deputy and an agent (pure; stdlib C modules only).

A deputy connects to the agent's listen address, sends `MAGIC`, then frames.
Every frame is a 17-byte header `(kind u8, fd u32, length u32, seq u64)` and
`length` payload bytes.  Payloads of control frames are *records*: lists of byte
strings, each prefixed by its u32 length (no json: the deputy must start fast,
and importing json costs ~6 ms).

Reliability: DATA, EOF, SIGNAL, STARTED and EXIT frames carry a per-direction
sequence number from 1.  The sender keeps them in an `Outbox` until the peer
acknowledges them (ACK frame, seq = highest contiguous seq received); after a
reconnect (RESUME / WELCOME carry the last seq each side received) the sender
replays what is unacknowledged and the receiver's `Inbox` drops duplicates.
The outbox is bounded: a sender that reaches `OUTBOX_LIMIT` unacknowledged
bytes stops reading its source (the pipe fills, the writer blocks) until acks
free room, so nothing is ever dropped; it only slows the producer.

This module is imported by the deputy as it starts inside a traced program's
process, so it imports nothing beyond `_struct` (no enum, no dataclasses; not even
`__future__`, a pure-Python module: the annotations here are valid at run time).
"""

import _struct

MAGIC = b"DCPX"
HEADER = _struct.Struct("!BIIQ")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 24  # a peer announcing more is broken or hostile
PRE_AUTH_MAX = 4096  # largest frame accepted before the peer proved it holds the ticket
CHUNK = 1 << 18  # how much a forwarder reads from a pipe at once
# A relayed stream holds little more than a pipe would: a writer on one instance
# blocks, and gets EPIPE/SIGPIPE when its reader goes, as `seq 100000 | head -1`
# does natively (a 64 MiB window let seq finish unseen).  The receiver acks
# often enough that a full window is always acknowledged in part.
ACK_EVERY = 32 << 10  # receiver acknowledges after this many payload bytes
OUTBOX_LIMIT = 128 << 10  # unacknowledged stream bytes a sender keeps before it pauses

# Frame kinds.  Unsequenced control frames carry seq 0 (or a seq they report).
HELLO = 1  # deputy -> agent: start a program (record of key/value pairs)
RESUME = 2  # deputy -> agent: reattach to a session; seq = last seq received
WELCOME = 3  # agent -> deputy: session id, instance; seq = last seq received
DATA = 4  # either way: bytes for the stream `fd`
EOF = 5  # either way: the stream `fd` ended
SIGNAL = 6  # deputy -> agent: deliver signal number `fd` to the remote process
STARTED = 7  # agent -> deputy: the remote process runs (record: pid)
EXIT = 8  # agent -> deputy: record (kind, value, message, fd offsets...)
ACK = 9  # either way: seq = highest contiguous seq received
ERROR = 10  # agent -> deputy: refused (record: message); the agent then closes
BYE = 11  # deputy -> agent: EXIT received; the session may be forgotten
WANT = 12  # agent -> deputy: the remote program reads stream `fd`: start forwarding it
# The handshake, before HELLO or RESUME (see vmagent.exec.tickets): T never crosses the wire.
AUTH = 13  # deputy -> agent: record (ticket public part B, challenge c1)
CHALLENGE = 14  # agent -> deputy: record (HMAC(T, "agent" + c1), challenge c2)
PROOF = 15  # deputy -> agent: record (HMAC(T, "deputy" + c2,)); then HELLO or RESUME
# agent -> deputy: the program moved (vmagent.checkpoint): pairs addr, instance, salt;
# the deputy resumes the session there, with the key `moved_key(T, instance, salt)`.
MOVED = 16
# File locks on inherited descriptors (issue 14, `vmagent.exec.filelocks`): the remote
# program locks a descriptor whose open file description is the deputy's, so the
# deputy takes the lock at home.  LOCK: agent -> deputy, pairs req, call, cmd, arg
# (call `flock` or `fcntl`; arg the flock operation or the 32-byte struct flock;
# call `cancel`: give request `req` up).  LOCKED: deputy -> agent, pairs req, result
# (0 or a negative errno), data (F_GETLK's struct flock).
LOCK = 17
LOCKED = 18
# Issue 11: a signal from the remote program to one of its pids that its instance
# does not hold (a process at home, a sibling placed elsewhere) is sent from home,
# by the deputy, as the program would send it there: the home holds every pid.
KILL = 19  # agent -> deputy: pairs req, pid (negative: a process group), sig
KILLED = 20  # deputy -> agent: pairs req, errno (0: sent)
# Issue 11: /proc/PID of a program pid its instance does not hold is read at home.
# PROC: agent -> deputy, pairs req, pid (0: the program's pids at home).  PROCD:
# deputy -> agent, pairs req, errno, and the files (`stat`, `status`, `cmdline`,
# `comm`) or `pids` (comma-separated).
PROC = 21
PROCD = 22
LAST_KIND = PROCD
NONCE_SIZE = 16  # bytes of each challenge
# HELLO's fd field: AGAIN marks a deputy's retry of a HELLO whose answer never
# reached it (its connection was cut first).  The agent attaches it to the
# session that ticket started, if any, instead of refusing a used ticket.
AGAIN = 1
# Not on the wire: a deputy that lost data leaves a note at its ticket file's
# path + LOSS_SUFFIX, which the home coordinator reads when the deputy exits.
LOSS_SUFFIX = ".lost"
# Failover (issue 12): path + MOVED_SUFFIX, written by the home coordinator when the
# program was restored from a checkpoint elsewhere (a MOVED frame's payload), or
# `gone` when its instance was lost without one (`gone:` and the OSS's reason when
# the OSS gave its restore up); the deputy reads it while it tries to reconnect.
MOVED_SUFFIX = ".moved"
GONE = b"gone"
# The deputy's private signal is SIGRTMIN + WAKE_RT: home sends it after writing the
# note, so a deputy whose old connection still looks alive (a frozen or partitioned
# instance) hangs up and follows the note.
WAKE_RT = 3

# TCP keepalive on exec connections: a peer whose host vanished without a
# FIN/RST (a VM killed, a cable cut) is noticed after IDLE + INTVL * CNT seconds.
KEEPALIVE_IDLE = 5
KEEPALIVE_INTVL = 2
KEEPALIVE_CNT = 3

SEQUENCED = frozenset({DATA, EOF, SIGNAL, STARTED, EXIT, WANT, MOVED, LOCK, LOCKED})

# SIGNAL's payload GROUP: deliver to the remote program's process group (a signal
# the home deputy got from its terminal), not to its pid alone.
GROUP = b"g"
# Otherwise, for a kill(): `from=PID uid=UID`, the sender at home (issue 11: the
# instance tracer gives the delivered signal that si_pid/si_uid; empty: not known).

# Kinds of forwarded descriptors in a HELLO.
FD_IN = b"in"  # the deputy reads its fd and streams it to the remote program
FD_OUT = b"out"  # the remote program writes; the agent streams it to the deputy
FD_PATH = b"path"  # the agent reopens the same file (shared file system)


class FrameError(ValueError):
    """The byte stream is not a valid sequence of frames."""


def frame(kind: int, fd: int = 0, payload: bytes = b"", seq: int = 0) -> bytes:
    """Encode one frame."""
    return HEADER.pack(kind, fd, len(payload), seq) + payload


def record(items: list[bytes]) -> bytes:
    """Encode a list of byte strings."""
    out = bytearray()
    for item in items:
        out += _struct.pack("!I", len(item))
        out += item
    return bytes(out)


def unrecord(data: bytes | bytearray) -> list[bytes]:
    """Decode `record()` output; raises FrameError on truncation."""
    items: list[bytes] = []
    pos = 0
    end = len(data)
    while pos < end:
        if pos + 4 > end:
            raise FrameError("truncated record length")
        (n,) = _struct.unpack_from("!I", data, pos)
        pos += 4
        if pos + n > end:
            raise FrameError("truncated record item")
        items.append(bytes(data[pos : pos + n]))
        pos += n
    return items


def pairs(data: bytes | bytearray) -> dict[bytes, bytes]:
    """Decode a record of alternating keys and values."""
    items = unrecord(data)
    if len(items) % 2:
        raise FrameError("odd number of items in a key/value record")
    return {items[i]: items[i + 1] for i in range(0, len(items), 2)}


def unpairs(mapping: dict[bytes, bytes]) -> bytes:
    """Encode a dict of byte strings as a record of alternating keys and values."""
    items: list[bytes] = []
    for key, value in mapping.items():
        items.append(key)
        items.append(value)
    return record(items)


class FrameParser:
    """Incremental decoder: feed bytes, get (kind, fd, seq, payload) tuples."""

    def __init__(self, limit: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self.limit = limit  # largest payload accepted now (raised after authentication)

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        """Add bytes; return every frame now complete, in order."""
        self.push(data)
        frames: list[tuple[int, int, int, bytes]] = []
        while (got := self.next()) is not None:
            frames.append(got)
        return frames

    def push(self, data: bytes) -> None:
        """Add bytes without decoding (take frames one by one with `next`)."""
        self._buf += data

    def next(self) -> tuple[int, int, int, bytes] | None:
        """The next complete frame, checked against the limit in force now, or None."""
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        kind, fd, length, seq = HEADER.unpack_from(buf, 0)
        FrameParser.check(kind, length, self.limit)
        if len(buf) - HEADER_SIZE < length:
            return None
        payload = bytes(buf[HEADER_SIZE : HEADER_SIZE + length])
        del buf[: HEADER_SIZE + length]
        return kind, fd, seq, payload

    def pending(self) -> int:
        """Bytes held that do not yet form a complete frame."""
        return len(self._buf)

    def leftover(self) -> bytes:
        """Hand over (and forget) the bytes of an incomplete frame."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    @staticmethod
    def check(kind: int, length: int, limit: int = MAX_PAYLOAD) -> None:
        """Raise FrameError for a header no valid peer sends."""
        if length > limit or kind == 0 or kind > LAST_KIND:
            raise FrameError(f"bad frame header kind={kind} length={length}")


class Outbox:
    """Sequenced frames sent but not yet acknowledged (not thread-safe; callers lock)."""

    def __init__(self, limit: int = OUTBOX_LIMIT) -> None:
        self.limit = limit
        self.next_seq = 1
        self._frames: list[tuple[int, bytes]] = []  # (seq, encoded frame), ascending
        self._head = 0  # index of the oldest unacknowledged frame in _frames
        self.held = 0  # encoded bytes held

    def add(self, kind: int, fd: int, payload: bytes) -> bytes:
        """Assign the next seq to a frame, keep it, and return its encoding."""
        seq = self.next_seq
        self.next_seq += 1
        data = frame(kind, fd, payload, seq)
        self._frames.append((seq, data))
        self.held += len(data)
        return data

    def ack(self, seq: int) -> None:
        """Forget every frame up to and including `seq`."""
        frames = self._frames
        head = self._head
        while head < len(frames) and frames[head][0] <= seq:
            self.held -= len(frames[head][1])
            head += 1
        if head > 1024 and head * 2 > len(frames):
            del frames[:head]
            head = 0
        self._head = head

    def after(self, seq: int) -> list[bytes]:
        """Encoded frames with a seq greater than `seq` (to replay after a reconnect)."""
        return [data for s, data in self._frames[self._head :] if s > seq]

    def full(self) -> bool:
        """True when the sender should stop reading its sources until acks arrive."""
        return self.held >= self.limit

    def __len__(self) -> int:
        return len(self._frames) - self._head


class Inbox:
    """Receiver side of the sequencing: drops replays, decides when to ack."""

    def __init__(self) -> None:
        self.last = 0  # highest contiguous seq accepted
        self._unacked_bytes = 0

    def accept(self, seq: int, size: int) -> bool:
        """True if the frame is new (apply it); False for a replayed duplicate."""
        if seq <= self.last:
            return False
        if seq != self.last + 1:
            raise FrameError(f"sequence gap: expected {self.last + 1}, got {seq}")
        self.last = seq
        self._unacked_bytes += size + HEADER_SIZE
        return True

    def ack_due(self) -> bool:
        """True when enough was received that the sender should hear an ack."""
        return self._unacked_bytes >= ACK_EVERY

    def acked(self) -> int:
        """Note that an ack for `last` goes out now; return the seq to ack."""
        self._unacked_bytes = 0
        return self.last
