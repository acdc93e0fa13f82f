"""Log chunks: encoding (zstandard) and query filtering (pure).

A program's consolidated log is the ordered union of its chunks (stdout,
stderr and log lines from all its processes and instances); the OSS log is
the chunks with no program.  Each appended batch becomes one chunk per
instance, compressed, with its time range so queries skip chunks outside it.
Order: (timestamp, chunk id, position in chunk), i.e. arrival order breaks ties.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import zstandard

STREAMS = ("stdout", "stderr", "log")


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
    after_chunk: int = 0  # for following: only chunks with a larger id
    limit: int = 10_000


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


def select(chunks: Iterable[tuple[int, bytes]], q: LogQuery) -> list[tuple[int, LogLine]]:
    """Decode chunks (id, blob) and return matching lines in log order, with chunk ids."""
    out: list[tuple[float, int, int, LogLine]] = []
    for cid, blob in chunks:
        for i, ln in enumerate(decode(blob)):
            if q.instance is not None and ln.instance != q.instance:
                continue
            if q.since is not None and ln.ts < q.since:
                continue
            if q.until is not None and ln.ts > q.until:
                continue
            if q.streams is not None and ln.stream not in q.streams:
                continue
            out.append((ln.ts, cid, i, ln))
    out.sort(key=lambda t: (t[0], t[1], t[2]))
    return [(cid, ln) for _, cid, _, ln in out[: q.limit]]
