"""The load generator of bench/bench_oss.py: one process, raw HTTP/1.1 on keep-alive connections.

It is meant to run pinned to a core of its own (bench_oss does that) so the
server under test keeps the other: requests are bytes prepared once, a reply is
parsed only as far as needed (status line, Content-Length, and the JSON of the
few replies whose ids are used), every simulated agent and client keeps one
connection, and the loop is uvloop's when it is installed.  An aiohttp client
spent ~0.25 ms of CPU per request; this one ~0.05 ms.

    python bench/oss_load.py < spec.json > results.json

The spec (JSON on stdin, so tokens never appear on a command line) names the
server, the tokens and the load; the results (JSON on stdout) hold every
latency in seconds.  Phases, on wall-clock times the bench chose:

1. register every simulated instance (before `start`);
2. `start`..`stop`: instances heartbeat at 1 Hz each (open loop, phases spread
   over the second; a beat's latency counts from when it was due, so a late
   send or a reply still pending from the last beat is charged to it), and
   `clients` API clients loop over the request mix with exponential think
   times (closed loop; latency from send to reply);
3. closed loops of `storm_callers` callers, no think time: place one process
   then release it; place one process per request, a program's placements
   released together by cancelling it every `per_program` places; place
   `batch` processes per request then release them.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any
from urllib.parse import urlsplit

try:
    import orjson

    loads: Any = orjson.loads
except ImportError:  # the stdlib parser: slower, same result
    loads = json.loads

# Every time here is perf_counter's: uvloop's loop.time() counts whole milliseconds.
now = time.perf_counter


BEAT = b'%s%d,"load":{"cpu_percent":%.1f,"memory_used_mb":100,"runqueue":%.2f,"processes":3}}'


class ProtocolError(Exception):
    """The server's reply could not be parsed."""


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: Any = None  # asyncio's or uvloop's (not an asyncio.Transport)
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        w = self.waiter
        if w is None or w.done():
            return
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        i = head.find(b"\r\ncontent-length:")
        if i < 0:
            w.set_exception(ProtocolError("reply without Content-Length"))
            return
        j = head.find(b"\r\n", i + 2)
        n = int(head[i + 17 : j if j >= 0 else len(head)])
        if len(buf) < end + 4 + n:
            return
        body = bytes(buf[end + 4 : end + 4 + n])
        del buf[: end + 4 + n]
        w.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))


class Client:
    """A connection that reconnects when the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.conn: Conn | None = None

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send a prepared request; (status, body).  599 when the connection failed."""
        loop = asyncio.get_running_loop()
        try:
            if self.conn is None or self.conn.transport is None:
                _, self.conn = await loop.create_connection(Conn, self.host, self.port)
            c = self.conn
            assert c.transport is not None
            c.waiter = loop.create_future()
            c.transport.write(data)
            return await c.waiter
        except (OSError, ConnectionError, ProtocolError):
            if self.conn is not None and self.conn.transport is not None:
                self.conn.transport.abort()
            self.conn = None
            return 599, b""

    def close(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.close()


def http(method: str, path: str, host: str, token: str, body: bytes | None = None) -> bytes:
    """A prepared request (headers and body in one write, as a real client sends them)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


class Load:
    """The phases of one run against one server."""

    def __init__(self, spec: dict[str, Any]) -> None:
        u = urlsplit(spec["url"])
        assert u.hostname is not None and u.port is not None
        self.host, self.port = u.hostname, u.port
        self.hostport = f"{self.host}:{self.port}"
        self.spec = spec
        self.admin: str = spec["admin"]

    def client(self) -> Client:
        return Client(self.host, self.port)

    def req(self, method: str, path: str, body: Any = None, token: str | None = None) -> bytes:
        raw = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        return http(method, path, self.hostport, token or self.admin, raw)

    # -- instances ----------------------------------------------------------------

    async def instances(self) -> dict[str, Any]:
        toks: dict[str, str] = self.spec["tokens"]
        start, stop = self.spec["start"], self.spec["stop"]
        conns = {name: self.client() for name in toks}
        sem = asyncio.Semaphore(100)
        refused = 0

        async def register(name: str, tok: str) -> None:
            nonlocal refused
            body = {
                "instance": name,
                "address": "127.0.0.1:1",
                "hostname": name,
                "cpus": 2,
                "memory_mb": 2048,
            }
            async with sem:
                for attempt in range(6):
                    status, text = await conns[name].request(
                        self.req("POST", "/v1/agents/register", body, tok)
                    )
                    if status == 200:
                        return
                    await asyncio.sleep(0.2 * (attempt + 1))
                refused += 1
                print(f"register {name}: {status} {text[:200]!r}", file=sys.stderr)

        await asyncio.gather(*(register(n, t) for n, t in toks.items()))
        lat: list[float] = []
        lag: list[float] = []
        ok = err = 0
        # Wall clock -> perf_counter, once.
        off = now() - time.time()

        async def beat(name: str, tok: str, phase: float) -> None:
            nonlocal ok, err
            c = conns[name]
            head = (  # the Content-Length follows, per beat
                f"POST /v1/agents/heartbeat HTTP/1.1\r\nHost: {self.hostport}\r\n"
                f"Authorization: Bearer {tok}\r\nContent-Type: application/json\r\n"
            ).encode()
            prefix = f'{{"instance":"{name}","seq":'.encode()
            rnd = random.Random(name)
            due = start + phase + off
            seq = 0
            while True:
                await asyncio.sleep(max(0.0, due - now()))
                if due - off >= stop:
                    return
                seq += 1
                body = BEAT % (prefix, seq, rnd.uniform(0, 100), rnd.uniform(0, 3))
                sent = now()
                status, _ = await c.request(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                if status == 200:
                    ok += 1
                else:
                    err += 1
                if due - off >= start:
                    lat.append(now() - due)
                    lag.append(sent - due)
                due += 1.0

        n = len(toks)
        await asyncio.gather(*(beat(nm, t, i / n) for i, (nm, t) in enumerate(toks.items())))
        for c in conns.values():
            c.close()
        return {"ok": ok, "err": err, "lat": lat, "lag": lag, "refused_registrations": refused}

    # -- API clients --------------------------------------------------------------------

    async def clients(self) -> dict[str, Any]:
        n, think = self.spec["clients"], self.spec["think"]
        start, stop = self.spec["start"], self.spec["stop"]
        lat: dict[str, list[float]] = {}
        errs: dict[str, int] = {}
        placements = 0
        off = now() - time.time()
        t_start, t_stop = start + off, stop + off

        async def call(c: Client, op: str, data: bytes) -> bytes | None:
            t0 = now()
            status, body = await c.request(data)
            if t0 >= t_start:
                lat.setdefault(op, []).append(now() - t0)
                if status >= 400:
                    errs[op] = errs.get(op, 0) + 1
            return body if status < 400 else None

        async def client(k: int) -> None:
            nonlocal placements
            c = self.client()
            rnd = random.Random(k)
            await asyncio.sleep(max(0.0, t_start - 1.0 - now()) + rnd.uniform(0, 1))
            got = await call(
                c, "submit", self.req("POST", "/v1/programs", {"argv": ["bench", str(k)]})
            )
            if got is None:
                c.close()
                return
            pid = loads(got)["id"]
            place = self.req("POST", f"/v1/programs/{pid}/placements", {"processes": 1})
            inspect = self.req("GET", f"/v1/programs/{pid}")
            listing = self.req("GET", "/v1/programs?limit=10")
            logline = self.req(
                "POST",
                f"/v1/programs/{pid}/logs",
                {"lines": [{"stream": "stdout", "text": f"line from {k}"}]},
            )
            billing = self.req("GET", f"/v1/programs/{pid}/billing")
            submit2 = self.req("POST", "/v1/programs", {"argv": ["bench2", str(k)]})
            releases: dict[str, bytes] = {}
            while now() < t_stop:
                op = rnd.random()
                if op < 0.5:
                    got = await call(c, "place", place)
                    if got:
                        if now() >= t_start:
                            placements += 1
                        inst = loads(got)["assignments"][0]["instance"]
                        rel = releases.get(inst)
                        if rel is None:
                            rel = releases[inst] = self.req(
                                "POST",
                                f"/v1/programs/{pid}/release",
                                {"instance": inst, "processes": 1},
                            )
                        await call(c, "release", rel)
                elif op < 0.7:
                    await call(c, "inspect", inspect)
                elif op < 0.8:
                    await call(c, "list", listing)
                elif op < 0.9:
                    await call(c, "log", logline)
                elif op < 0.95:
                    await call(c, "billing", billing)
                else:
                    got = await call(c, "submit", submit2)
                    if got:
                        p2 = loads(got)["id"]
                        await call(c, "cancel", self.req("POST", f"/v1/programs/{p2}/cancel"))
                if think > 0:
                    await asyncio.sleep(rnd.expovariate(1 / think))
            c.close()

        await asyncio.gather(*(client(k) for k in range(n)))
        return {"lat": lat, "errs": errs, "placements": placements}

    # -- closed-loop placement ------------------------------------------------------------

    async def storm(self, mode: str) -> dict[str, Any]:
        """Closed loop, no think time: `mode` pair (place 1, release it), cancel (place 1 per
        request, release a program's placements by cancelling it), or batch."""
        conc, seconds = self.spec["storm_callers"], self.spec["storm"]
        per_program, batch = self.spec["per_program"], self.spec["batch"]
        lat: list[float] = []
        n = 0
        errors = 0
        stop = now() + seconds

        async def submit(c: Client, k: int) -> str | None:
            _, body = await c.request(self.req("POST", "/v1/programs", {"argv": ["storm", str(k)]}))
            try:
                return str(loads(body)["id"])
            except (ValueError, KeyError, TypeError):
                return None

        async def worker(k: int) -> None:
            nonlocal n, errors
            c = self.client()
            pid = await submit(c, k)
            placed_here = 0
            want = batch if mode == "batch" else 1
            while pid is not None and now() < stop:
                t0 = now()
                status, body = await c.request(
                    self.req("POST", f"/v1/programs/{pid}/placements", {"processes": want})
                )
                lat.append(now() - t0)
                if status != 200:
                    errors += 1
                    continue
                n += want
                if mode == "cancel":
                    placed_here += 1
                    if placed_here >= per_program:
                        await c.request(self.req("POST", f"/v1/programs/{pid}/cancel"))
                        pid = await submit(c, k)
                        placed_here = 0
                    continue
                for a in loads(body)["assignments"]:
                    rel = {"instance": a["instance"], "processes": a["processes"]}
                    await c.request(self.req("POST", f"/v1/programs/{pid}/release", rel))
            if pid is not None and mode == "cancel":
                await c.request(self.req("POST", f"/v1/programs/{pid}/cancel"))
            c.close()

        t0 = now()
        await asyncio.gather(*(worker(k) for k in range(conc)))
        return {"rate": n / (now() - t0), "lat": lat, "errors": errors}


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    load = Load(spec)
    out: dict[str, Any] = {}
    cpu0 = time.process_time()
    got = await asyncio.gather(load.instances(), load.clients())
    out["instances"], out["clients"] = got
    out["cpu_mixed"] = time.process_time() - cpu0
    out["storm"] = {}
    for mode in spec["storms"]:
        out["storm"][mode] = await load.storm(mode)
    out["cpu"] = time.process_time()
    return out


def main() -> None:
    spec = json.load(sys.stdin)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    res = runner(run(spec))
    json.dump(res, sys.stdout)


if __name__ == "__main__":
    main()
