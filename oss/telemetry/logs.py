"""Log chunks: encoding (zstandard) and query filtering (pure).

A program's consolidated log is the ordered union of its chunks (stdout,
stderr and log lines from all its processes and instances); the OSS log is
the chunks with no program.  Each appended batch becomes one chunk per
instance, at most `CHUNK_LINES` lines, sorted by time, compressed, with its time
range so queries skip chunks outside it.  Order: (chunk id, position in chunk),
i.e. arrival order, time order within one appended batch of one instance.

Reading costs what it returns: a page decodes chunks in order from its cursor
and stops at the chunk holding its last line.  The cursor names the next line:
`chunk id << CURSOR_BITS | position`, so paging with any limit returns every
line exactly once, in order.
"""

from __future__ import annotations

import datetime
import json
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import zstandard

STREAMS = ("stdout", "stderr", "log", "event")  # event: lifecycle of placed processes


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line of a log."""

    ts: float
    stream: str
    text: str
    instance: str | None = None
    pid: int | None = None


@dataclass(frozen=True, slots=True)
class LogQuery:
    """Filters for reading a log; None means any."""

    instance: str | None = None
    since: float | None = None
    until: float | None = None
    streams: frozenset[str] | None = None
    cursor: int = 0  # the next line (see `cursor`); 0: from the start
    limit: int = 10_000


CHUNK_LINES = 1024  # lines per stored chunk: the most one read decodes beyond its page
CURSOR_BITS = 16  # position within a chunk (CHUNK_LINES < 2**CURSOR_BITS)


def cursor(chunk: int, position: int) -> int:
    """The cursor naming line `position` of chunk `chunk`."""
    return chunk << CURSOR_BITS | position


def split_cursor(c: int) -> tuple[int, int]:
    """(chunk id, position) of a cursor."""
    return c >> CURSOR_BITS, c & ((1 << CURSOR_BITS) - 1)


def chunks_of(lines: Sequence[LogLine]) -> list[list[LogLine]]:
    """Split one instance's appended lines into stored chunks, each in time order."""
    ordered = sorted(lines, key=lambda ln: ln.ts)  # stable: equal times keep arrival order
    return [ordered[i : i + CHUNK_LINES] for i in range(0, len(ordered), CHUNK_LINES)]


# zstd contexts are costly to create and not thread-safe: one pair per thread.
_ctx = threading.local()


def _zc() -> zstandard.ZstdCompressor:
    c: zstandard.ZstdCompressor | None = getattr(_ctx, "c", None)
    if c is None:
        c = _ctx.c = zstandard.ZstdCompressor(level=3)
    return c


def _zd() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_ctx, "d", None)
    if d is None:
        d = _ctx.d = zstandard.ZstdDecompressor()
    return d


def encode(lines: Sequence[LogLine]) -> bytes:
    """Compress a chunk of lines."""
    raw = json.dumps(
        [[ln.ts, ln.stream, ln.text, ln.instance, ln.pid] for ln in lines], separators=(",", ":")
    ).encode()
    return _zc().compress(raw)


def decode(blob: bytes) -> list[LogLine]:
    """Decompress a chunk of lines."""
    rows = json.loads(_zd().decompress(blob))
    return [LogLine(float(r[0]), r[1], r[2], r[3], r[4]) for r in rows]


def matches(ln: LogLine, q: LogQuery) -> bool:
    """Whether a line passes the query's filters."""
    return (
        (q.instance is None or ln.instance == q.instance)
        and (q.since is None or ln.ts >= q.since)
        and (q.until is None or ln.ts <= q.until)
        and (q.streams is None or ln.stream in q.streams)
    )


def page(
    chunks: Iterable[tuple[int, bytes]], q: LogQuery
) -> tuple[list[tuple[int, LogLine]], int | None, int]:
    """Matching lines from `q.cursor` on, decoding chunks (id order) lazily.

    Returns (lines with chunk ids, cursor after the last line or None when the
    chunks ran out before `q.limit`, chunks decoded).  `chunks` is consumed only
    as far as needed, so a lazy iterator over the database reads no further.
    """
    start_chunk, start_pos = split_cursor(q.cursor)
    out: list[tuple[int, LogLine]] = []
    decoded = 0
    for cid, blob in chunks:
        if cid < start_chunk:
            continue
        decoded += 1
        lines = decode(blob)
        for i in range(start_pos if cid == start_chunk else 0, len(lines)):
            if matches(lines[i], q):
                out.append((cid, lines[i]))
                if len(out) >= q.limit:
                    return out, cursor(cid, i + 1), decoded
    return out, None, decoded


def event_text(
    kind: str,
    argv: Sequence[str] = (),
    status: int | None = None,
    signal: int | None = None,
    text: str = "",
) -> str:
    """The log text of a lifecycle event: `exec cc -c a.c`, `exit 0`, `signal 9`."""
    words = [kind]
    if argv:
        words.append(" ".join(argv))
    if status is not None:
        words.append(str(status))
    if signal is not None:
        words.append(str(signal))
    if text:
        words.append(text if not argv else f"({text})")
    return " ".join(words)


class Reorder:
    """Puts followed lines in time order: a line is let out once `window` seconds passed
    since it arrived (instances report each `interval`; a later batch may hold earlier
    lines), earliest first.  `rest()` lets out everything, at the end."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._held: list[tuple[float, int, float, LogLine]] = []  # (ts, order, arrival, line)
        self._n = 0

    def push(self, line: LogLine, now: float) -> None:
        """Hold a line that arrived at `now`."""
        self._n += 1
        self._held.append((line.ts, self._n, now, line))

    def ready(self, now: float) -> list[LogLine]:
        """The lines to print now, in time order: every line up to the latest one that
        has waited the window (earlier lines cannot be overtaken any more)."""
        ripe = [h for h in self._held if now - h[2] >= self.window]
        if not ripe:
            return []
        upto = max(h[0] for h in ripe)
        self._held.sort(key=lambda h: (h[0], h[1]))
        out = [h for h in self._held if h[0] <= upto]
        self._held = [h for h in self._held if h[0] > upto]
        return [h[3] for h in out]

    def rest(self) -> list[LogLine]:
        """Everything held, in time order."""
        self._held.sort(key=lambda h: (h[0], h[1]))
        out = [h[3] for h in self._held]
        self._held = []
        return out


def render(line: LogLine, tz: Any = None) -> str:
    """`HH:MM:SS.mmm INSTANCE PID STREAM text` (local time)."""
    t = datetime.datetime.fromtimestamp(line.ts, tz)
    stamp = t.strftime("%H:%M:%S.") + f"{t.microsecond // 1000:03d}"
    inst = line.instance or "-"
    pid = "-" if line.pid is None else str(line.pid)
    return f"{stamp} {inst} {pid} {line.stream} {line.text}"


# A session of a program on an instance: (instance, pid of the session's program).
SessionKey = tuple[str, int]


class RelayFilter:
    """Drops the lines a relaying session repeats from the sessions placed under it.

    A process placed from an instance (a compiler placed by a placed `make`) is logged
    by its own instance, and its output comes back through the placing session's
    pipes, which log it again.  `link(child, parent)` says `child` was placed from a
    process of `parent`.  Every line a child session writes is noted as unmatched for
    its parent (before any filtering of the child's own stream: a grandchild's line
    relayed by the child is relayed again by the parent); a parent's line equal
    (stream and text) to the oldest unmatched line of one of its children is dropped
    and matches it.  While a parent has live children its other lines wait `hold`
    seconds (the child's copy may arrive in a later batch); a child line that arrives
    meanwhile drops the oldest equal waiting line.  Identical lines may swap
    attribution, never count twice.
    """

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self._parent: dict[SessionKey, SessionKey] = {}
        self._children: dict[SessionKey, set[SessionKey]] = {}
        self._live: set[SessionKey] = set()
        self._unmatched: dict[SessionKey, list[tuple[str, str]]] = {}
        self._held: dict[SessionKey, list[tuple[float, LogLine]]] = {}

    def link(self, child: SessionKey, parent: SessionKey) -> None:
        """`child` was placed from a process of session `parent`."""
        self._parent[child] = parent
        self._children.setdefault(parent, set()).add(child)
        self._live.add(child)

    def ended(self, session: SessionKey) -> None:
        """The session's program ended: its parent stops waiting for it."""
        self._live.discard(session)

    def offer(self, session: SessionKey, line: LogLine, now: float) -> list[LogLine]:
        """A line of `session`: the lines to log now (it, or none)."""
        key = (line.stream, line.text)
        parent = self._parent.get(session)
        if parent is not None and not self._match_held(parent, key):
            self._unmatched.setdefault(session, []).append(key)
        for child in self._children.get(session, ()):
            pending = self._unmatched.get(child)
            if pending and pending[0] == key:
                pending.pop(0)
                return []  # the child logged it already
        if any(c in self._live for c in self._children.get(session, ())):
            self._held.setdefault(session, []).append((now + self.hold, line))
            return []
        return [line]

    def due(self, now: float) -> list[LogLine]:
        """Held lines whose wait is over (no child's copy came): log them."""
        out: list[LogLine] = []
        for session, held in list(self._held.items()):
            ready = [ln for t, ln in held if t <= now]
            if ready:
                self._held[session] = [(t, ln) for t, ln in held if t > now]
                out.extend(ready)
        return sorted(out, key=lambda ln: ln.ts)

    def _match_held(self, parent: SessionKey, key: tuple[str, str]) -> bool:
        held = self._held.get(parent, [])
        for i, (_t, ln) in enumerate(held):
            if (ln.stream, ln.text) == key:
                del held[i]
                return True
        return False


def relay_links(processes: Sequence[Any]) -> list[tuple[SessionKey, SessionKey]]:
    """(child session, parent session) of every process placed from an instance.

    `processes` are `ProcessRow`s: a placed process names its `parent` process
    (`INSTANCE:PID`); the parent's row names its session (the program of the agent
    session whose pipes its output goes through)."""
    by_key = {(p.instance, p.pid): p for p in processes}
    links = []
    for p in processes:
        if not p.parent:
            continue
        inst, _, pid = p.parent.rpartition(":")
        parent = by_key.get((inst, int(pid))) if pid.isdigit() else None
        if parent is None:
            continue  # placed from home (or not reported): nothing relays its output
        links.append(((p.instance, p.session or p.pid), (inst, parent.session or parent.pid)))
    return links


class RelayDropper:
    """The streaming reader's side (a followed log): relayed copies dropped as lines
    come, a relaying session's lines held `hold` seconds for a child's copy that comes
    later (the two copies are stamped on two instances: either may be first)."""

    def __init__(self, hold: float) -> None:
        self._filter = RelayFilter(hold)

    def link(self, links: Sequence[tuple[SessionKey, SessionKey]]) -> None:
        """Learn (child, parent) session links (again: idempotent)."""
        for child, parent in links:
            self._filter.link(child, parent)

    def __call__(self, lines: Sequence[LogLine], now: float) -> list[LogLine]:
        """The lines to print now: of `lines`, and held ones whose wait is over."""
        out: list[LogLine] = []
        for ln in lines:
            if ln.stream in ("stdout", "stderr") and ln.instance and ln.pid is not None:
                out.extend(self._filter.offer((ln.instance, ln.pid), ln, now))
            else:
                out.append(ln)
        out.extend(self._filter.due(now))
        return sorted(out, key=lambda ln: ln.ts)

    def rest(self) -> list[LogLine]:
        """Every held line (the end)."""
        return self._filter.due(float("inf"))


def drop_relayed(
    lines: Sequence[LogLine], links: Sequence[tuple[SessionKey, SessionKey]]
) -> list[LogLine]:
    """The whole log without the copies relaying sessions logged again, whatever the
    order the copies were stamped in: each relaying session loses as many of each
    line as its child sessions wrote (their own lines and what they relayed)."""
    written: dict[SessionKey, Counter[tuple[str, str]]] = {}
    for ln in lines:
        if ln.stream in ("stdout", "stderr") and ln.instance and ln.pid is not None:
            written.setdefault((ln.instance, ln.pid), Counter())[(ln.stream, ln.text)] += 1
    relayed: dict[SessionKey, Counter[tuple[str, str]]] = {}
    for child, parent in links:
        relayed.setdefault(parent, Counter()).update(written.get(child, Counter()))
    out: list[LogLine] = []
    for ln in lines:
        budget = relayed.get((ln.instance or "", ln.pid or 0))
        key = (ln.stream, ln.text)
        if budget and ln.stream in ("stdout", "stderr") and budget[key] > 0:
            budget[key] -= 1
            continue
        out.append(ln)
    return out
