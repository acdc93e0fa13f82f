"""The agent's telemetry uplink: usage rows, output lines and events of every program,
batched to the OSS (`POST /v1/agents/report`).

- A batch goes when `interval` seconds passed since the last, when `batch_items`
  items wait, or at once for a final usage row (the record waits for those).
- One batch is in flight at a time; a failed one is sent again with the same `seq`
  (the OSS drops a seq it already applied, so a lost reply costs nothing twice).
  `seq` starts at the agent's start time in microseconds: a restarted agent's
  batches are never taken for replays of the previous process's.
- Memory is bounded: usage rows are totals, so only the newest row per process
  waits (as many as live processes); lines and events wait up to `max_held`
  bytes, past which new ones are dropped and counted (`dropped`), with one
  warning per outage.
- A batch the OSS refuses as malformed (4xx other than 401/408/429) is dropped
  and counted, never retried forever.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Row = dict[str, Any]
ProcessKey = tuple[str, int, float]  # (program, pid, started)


class ReportRejected(Exception):
    """The OSS refused the batch itself (not a transient failure)."""


# Sends one report body, returns the decoded reply; raises ReportRejected for a refusal
# that retrying cannot fix, anything else (OSError, TimeoutError, ...) for a retry.
Post = Callable[[bytes], Awaitable[dict[str, Any]]]

BATCH_BYTES = 512 << 10  # a batch stays well under the OSS's 1 MiB body cap
ROW_OVERHEAD = 120  # bytes a row costs on the wire besides its text
ENDED_KEPT = 65536  # processes remembered as ended (their late samples are ignored)


class Uplink:
    """Batches telemetry for the OSS; `run()` sends until cancelled."""

    def __init__(
        self,
        instance: str,
        post: Post,
        *,
        interval: float = 1.0,
        batch_items: int = 512,
        max_held: int = 16 << 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.instance = instance
        self.post = post
        self.interval = interval
        self.batch_items = batch_items
        self.max_held = max_held
        self.seq = time.time_ns() // 1000
        self._usage: dict[ProcessKey, Row] = {}
        self._storage: dict[str, int] = {}  # program -> kB (the newest walk)
        self._ended: collections.OrderedDict[ProcessKey, None] = collections.OrderedDict()
        self._items: collections.deque[tuple[str, Row, int]] = collections.deque()
        self._held = 0  # bytes of lines and events waiting
        self._wake = asyncio.Event()
        self._urgent = False
        self.clock = clock
        self.sent_batches = 0
        self.dropped = 0  # lines and events dropped (memory bound or refused batches)
        self.refused = 0  # rows the OSS refused (programs this instance never ran)
        self._outage = False
        self.flushed = asyncio.Event()  # set whenever nothing waits

    # -- producers (on the agent's loop) -----------------------------------------------
    def usage(self, row: Row) -> None:
        """A process's totals so far (`final` with its last figures)."""
        key = (row["program_id"], row["pid"], row["started"])
        if key in self._ended:
            return  # a late sample after the final row adds nothing
        self._usage[key] = row
        if row.get("final"):
            self._ended[key] = None
            if len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)
            self._urgent = True
        self._poke()

    def storage(self, program_id: str, kb: int) -> None:
        """The storage a program's view holds (kB), as this instance walked it."""
        self._storage[program_id] = kb
        self._poke()

    def line(self, program_id: str, pid: int, stream: str, text: str, ts: float) -> None:
        """A line the program wrote on stdout or stderr."""
        self._add(
            "logs",
            {"program_id": program_id, "pid": pid, "ts": ts, "stream": stream, "text": text},
            len(text) + ROW_OVERHEAD,
        )

    def event(self, row: Row) -> None:
        """A lifecycle event (placed, exec, exit, signal, lost, ...)."""
        self._add("events", row, ROW_OVERHEAD + sum(len(a) for a in row.get("argv", ())))

    def urgent(self) -> None:
        """Send what waits now (a session started or ended: the record may be waiting)."""
        self._urgent = True
        self._poke()

    def _add(self, kind: str, row: Row, size: int) -> None:
        if self._held + size > self.max_held:
            self.dropped += 1
            if not self._outage:
                self._outage = True
                log.warning("telemetry: OSS unreachable for long; dropping lines and events")
            return
        self._items.append((kind, row, size))
        self._held += size
        self._poke()

    def _poke(self) -> None:
        self.flushed.clear()
        if self._urgent or len(self._items) + len(self._usage) >= self.batch_items:
            self._wake.set()

    @property
    def waiting(self) -> int:
        """Items not sent yet."""
        return len(self._items) + len(self._usage) + len(self._storage)

    # -- sender ----------------------------------------------------------------------
    def _take(self) -> dict[str, Any]:
        """The next batch, taken off the queues."""
        usage: list[Row] = []
        room = BATCH_BYTES
        while self._usage and len(usage) < 4096 and room > 0:
            key = next(iter(self._usage))
            usage.append(self._usage.pop(key))
            room -= ROW_OVERHEAD * 2
        out: dict[str, list[Row]] = {"logs": [], "events": []}
        while self._items and room > 0:
            kind, row, size = self._items[0]
            if len(out[kind]) >= (10_000 if kind == "logs" else 4096):
                break
            self._items.popleft()
            self._held -= size
            room -= size
            out[kind].append(row)
        self.seq += 1
        body: dict[str, Any] = {"instance": self.instance, "seq": self.seq, "usage": usage}
        body.update(out)
        if self._storage:
            body["storage"] = [{"program_id": p, "kb": kb} for p, kb in self._storage.items()]
            self._storage = {}
        return body

    async def run(self) -> None:
        """Send batches until cancelled."""
        backoff = 0.5
        while True:
            if not (self._urgent or self.waiting >= self.batch_items):
                try:
                    async with asyncio.timeout(self.interval):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            self._urgent = False
            if not self.waiting:
                self.flushed.set()
                continue
            body = self._take()
            raw = json.dumps(body, separators=(",", ":")).encode()
            while True:
                try:
                    reply = await self.post(raw)
                except ReportRejected as exc:
                    self.dropped += len(body["logs"]) + len(body["events"])
                    log.warning("telemetry: OSS refused a batch (dropped): %s", exc)
                    break
                except asyncio.CancelledError:
                    self._giveback(body)
                    raise
                except Exception as exc:  # OSS down, timeout, 5xx: same batch, same seq
                    log.info("telemetry: report failed (%s); retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.5
                self.sent_batches += 1
                self.refused += int(reply.get("refused", 0))
                if self._outage:
                    self._outage = False
                    log.warning("telemetry: OSS reachable again (%d dropped)", self.dropped)
                break
            if not self.waiting:
                self.flushed.set()

    def _giveback(self, body: dict[str, Any]) -> None:
        """Put an unsent batch back (cancelled mid-send: a later `run` sends it)."""
        for row in body["usage"]:
            self._usage.setdefault((row["program_id"], row["pid"], row["started"]), row)
        for row in body.get("storage", ()):
            self._storage.setdefault(row["program_id"], row["kb"])
        for kind in ("events", "logs"):
            for row in reversed(body[kind]):
                self._items.appendleft((kind, row, ROW_OVERHEAD))
                self._held += ROW_OVERHEAD

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing waits (or `timeout`); whether everything went."""
        self.urgent()
        try:
            async with asyncio.timeout(timeout):
                while self.waiting:
                    self.flushed.clear()
                    self._wake.set()
                    await self.flushed.wait()
        except TimeoutError:
            return False
        return True


class HttpPost:
    """Posts report bodies to `POST /v1/agents/report` with the instance token."""

    PATH = "/v1/agents/report"

    def __init__(self, url: str, token: str, timeout: float, path: str | None = None) -> None:
        self.socket_path = url[len("unix:") :] if url.startswith("unix:") else None
        base = "http://oss" if self.socket_path is not None else url.rstrip("/")
        self.url = base + (path or self.PATH)
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._http: Any = None

    async def __call__(self, raw: bytes) -> dict[str, Any]:
        """Send one body; ReportRejected for a refusal a retry cannot fix."""
        import aiohttp

        if self._http is None:
            connector = (
                aiohttp.UnixConnector(path=self.socket_path)
                if self.socket_path is not None
                else None
            )
            self._http = aiohttp.ClientSession(connector=connector)
        async with asyncio.timeout(self.timeout):
            async with self._http.post(self.url, data=raw, headers=self._headers) as resp:
                body = await resp.read()
                if resp.status >= 500 or resp.status in (401, 408, 429):
                    raise OSError(f"OSS answered {resp.status}")
                if resp.status >= 400:
                    raise ReportRejected(f"{resp.status}: {body[:200].decode(errors='replace')}")
                data = json.loads(body)
        if not isinstance(data, dict):
            raise ReportRejected("the OSS answered the report with a non-object")
        return data

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._http is not None:
            await self._http.close()
            self._http = None
