"""Benchmark one `dcp-oss serve` (subprocess, loopback): heartbeats, placements, API latency.

Load: N simulated instances (default 1,000) heartbeating every second, and C
concurrent API clients (default 200), each looping over a request mix with a
think time between requests (submit, place, release, inspect, list, append a
log line, read billing).  The load generators run in two separate processes
so the server gets its own.  Also measures the scheduler in-process: the pure
decision alone, and the store's durable place (SQL pre-filter + decision +
limit check + reservation + group commit), without HTTP.

    PYTHONPATH=. python3 bench/bench_oss.py --duration 20

Prints a table; figures go in docs/BENCHMARKS-oss.md.  No timed assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oss import models as m  # noqa: E402
from oss.accounts.store import Accounts, Principal  # noqa: E402
from oss.billing.store import BudgetCheck  # noqa: E402
from oss.compute.instances import CANDIDATES, Instances  # noqa: E402
from oss.compute.programs import Programs  # noqa: E402
from oss.compute.scheduler import Candidate, SelectionPolicy, place  # noqa: E402
from oss.db.store import Store  # noqa: E402
from oss.schema import VERSIONS  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs, in milliseconds."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return 1000 * s[min(len(s) - 1, int(q * len(s)))]


# -- setup ---------------------------------------------------------------------


async def _setup(data: Path, n: int) -> tuple[str, dict[str, str]]:
    store = Store(data, VERSIONS)
    await store.open()
    accounts, instances = Accounts(store), Instances(store)
    try:
        _, _, admin = await accounts.create_account("bench", True, "sum", "u")
        names = [f"sim{i:05d}" for i in range(n)]
        toks = await asyncio.gather(*(instances.mint_instance_token(x) for x in names))
        return admin, dict(zip(names, toks, strict=True))
    finally:
        await store.close()


def start_server(data: Path, tick: float) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oss",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data",
            str(data),
            "--heartbeat-timeout",
            "15",
            "--tick",
            str(tick),
            # Every simulated agent and client connects from 127.0.0.1: the per-peer
            # cap (256, meant for one real peer) would refuse most of the 1,000 agents'
            # connections and count their heartbeats as errors.
            "--max-connections-per-peer",
            "2048",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"dcp-oss did not start: {line!r}")
    return proc, line.split()[-1]


# A bare aiohttp server answering the same routes with fixed JSON: the baseline the
# OSS's figures are divided by (same load generators, same machine, same run).
BARE_SERVER = r"""
import sys
from aiohttp import web
ONE = {"assignments": [{"instance": "sim00000", "processes": 1}], "grants": []}
async def ok(request):
    if request.can_read_body:
        await request.read()
    return web.json_response({"id": "prg_bare", "instance": "x", "heartbeat_interval": 1.0,
                              "commands": [], "programs": [], **ONE})
app = web.Application()
app.router.add_route("*", "/{tail:.*}", ok)
runner = web.AppRunner(app, access_log=None)
import asyncio
async def main():
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def start_bare() -> tuple[subprocess.Popen[str], str]:
    """The baseline: a bare aiohttp handler (no auth, no store, no validation)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE_SERVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"the bare aiohttp server did not start: {line!r}")
    return proc, line.split()[-1]


def run_load(
    url: str, admin: str, toks: dict[str, str], args: Any
) -> tuple[dict[str, Any], float, list[float]]:
    """The mixed load (heartbeats + API clients) for `args.duration`, then the closed-loop
    placement storm: (per-generator results, storm placements/s, storm latencies)."""
    start = time.time() + args.warmup + 5.0  # time for registrations
    stop = start + args.duration
    q: Any = mp.Queue()
    ps = [
        mp.Process(target=_run_instances, args=(url, toks, start, stop, q)),
        mp.Process(
            target=_run_clients, args=(url, admin, args.clients, args.think, start, stop, q)
        ),
    ]
    for p in ps:
        p.start()
    res = dict(q.get(timeout=args.duration + 180) for _ in ps)
    for p in ps:
        p.join(60)
    rate, lat = asyncio.run(_place_storm(url, admin, 32, args.storm))
    return res, rate, lat


def baseline_rows(
    ours: dict[str, Any], storm: tuple[float, list[float]], args: Any
) -> list[tuple[str, str]]:
    """The same load against a bare aiohttp handler; the OSS's figures over its."""
    proc, url = start_bare()
    try:
        res, rate, lat = run_load(url, "bare", {n: "t" for n in ours["names"]}, args)
    finally:
        proc.kill()
        proc.wait()
    bare_api = [x for v in res["clients"]["lat"].values() for x in v]
    bare_hb = res["instances"]["lat"]
    api = ours["api"]
    hb = ours["hb"]
    return [
        ("BASELINE: bare aiohttp handler, same load", ""),
        (
            "  heartbeat p50 / p99 ms (bare)",
            f"{pct(bare_hb, 0.5):.1f} / {pct(bare_hb, 0.99):.1f}",
        ),
        ("  API p50 / p99 ms (bare)", f"{pct(bare_api, 0.5):.1f} / {pct(bare_api, 0.99):.1f}"),
        ("  API requests/s (bare)", f"{len(bare_api) / args.duration:,.0f}"),
        (
            "  closed-loop requests/s, 32 callers (bare: place+release pairs)",
            f"{rate:,.0f} (p99 {pct(lat, 0.99):.1f} ms)",
        ),
        (
            "RATIO OSS / bare: heartbeat p99, API p99, closed-loop placements/s",
            f"{pct(hb, 0.99) / pct(bare_hb, 0.99):.2f}x, "
            f"{pct(api, 0.99) / pct(bare_api, 0.99):.2f}x, {storm[0] / rate:.2f}x",
        ),
    ]


# -- load generators (separate processes) --------------------------------------


async def _instances(url: str, toks: dict[str, str], start: float, stop: float) -> dict[str, Any]:
    conn = aiohttp.TCPConnector(limit=256)
    lat: list[float] = []
    ok = err = 0
    async with aiohttp.ClientSession(connector=conn) as s:

        async def register(name: str, tok: str) -> None:
            body = {
                "instance": name,
                "address": "127.0.0.1:1",
                "hostname": name,
                "cpus": 2,
                "memory_mb": 2048,
            }
            async with s.post(
                url + "/v1/agents/register", json=body, headers={"Authorization": f"Bearer {tok}"}
            ) as r:
                assert r.status == 200, await r.text()

        sem = asyncio.Semaphore(100)

        async def reg(name: str, tok: str) -> None:
            async with sem:
                for attempt in range(5):  # a loaded machine drops some connections
                    try:
                        await register(name, tok)
                        return
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.5 * (attempt + 1))
                await register(name, tok)

        await asyncio.gather(*(reg(n, t) for n, t in toks.items()))

        async def beat(name: str, tok: str, phase: float) -> None:
            nonlocal ok, err
            seq = 0
            nxt = start + phase
            h = {"Authorization": f"Bearer {tok}"}
            while True:
                await asyncio.sleep(max(0.0, nxt - time.time()))
                if time.time() >= stop:
                    return
                seq += 1
                body = {
                    "instance": name,
                    "seq": seq,
                    "load": {
                        "cpu_percent": random.uniform(0, 100),
                        "memory_used_mb": 100,
                        "runqueue": random.uniform(0, 3),
                        "processes": 3,
                    },
                }
                t0 = time.perf_counter()
                try:
                    async with s.post(url + "/v1/agents/heartbeat", json=body, headers=h) as r:
                        await r.read()
                        if r.status == 200:
                            ok += 1
                        else:
                            err += 1
                except aiohttp.ClientError:
                    err += 1
                if time.time() >= start:
                    lat.append(time.perf_counter() - t0)
                nxt += 1.0

        await asyncio.gather(*(beat(n, t, i / len(toks)) for i, (n, t) in enumerate(toks.items())))
    return {"ok": ok, "err": err, "lat": lat}


async def _clients(
    url: str, token: str, n: int, think: float, start: float, stop: float
) -> dict[str, Any]:
    lat: dict[str, list[float]] = {}
    errs: dict[str, int] = {}
    placements = 0
    h = {"Authorization": f"Bearer {token}"}
    conn = aiohttp.TCPConnector(limit=n)
    async with aiohttp.ClientSession(connector=conn, headers=h) as s:

        async def call(op: str, method: str, path: str, body: Any = None) -> Any:
            t0 = time.perf_counter()
            try:
                async with s.request(method, url + path, json=body) as r:
                    data = await r.json(content_type=None)
                    status = r.status
            except aiohttp.ClientError:
                data, status = None, 599
            if time.time() >= start:
                lat.setdefault(op, []).append(time.perf_counter() - t0)
                if status >= 400:
                    errs[op] = errs.get(op, 0) + 1
            return data if status < 400 else None

        async def client(k: int) -> None:
            nonlocal placements
            await asyncio.sleep(random.uniform(0, 1))
            prog = await call("submit", "POST", "/v1/programs", {"argv": ["bench", str(k)]})
            if prog is None:
                return
            pid = prog["id"]
            while time.time() < stop:
                op = random.random()
                if op < 0.5:
                    got = await call(
                        "place", "POST", f"/v1/programs/{pid}/placements", {"processes": 1}
                    )
                    if got:
                        if time.time() >= start:
                            placements += 1
                        inst = got["assignments"][0]["instance"]
                        await call(
                            "release",
                            "POST",
                            f"/v1/programs/{pid}/release",
                            {"instance": inst, "processes": 1},
                        )
                elif op < 0.7:
                    await call("inspect", "GET", f"/v1/programs/{pid}")
                elif op < 0.8:
                    await call("list", "GET", "/v1/programs?limit=10")
                elif op < 0.9:
                    await call(
                        "log",
                        "POST",
                        f"/v1/programs/{pid}/logs",
                        {"lines": [{"stream": "stdout", "text": f"line from {k}"}]},
                    )
                elif op < 0.95:
                    await call("billing", "GET", f"/v1/programs/{pid}/billing")
                else:
                    p2 = await call("submit", "POST", "/v1/programs", {"argv": ["bench2", str(k)]})
                    if p2:
                        await call("cancel", "POST", f"/v1/programs/{p2['id']}/cancel")
                await asyncio.sleep(random.expovariate(1 / think) if think > 0 else 0)

        await asyncio.gather(*(client(k) for k in range(n)))
    return {"lat": lat, "errs": errs, "placements": placements}


async def _place_storm(
    url: str, token: str, conc: int, seconds: float, batch: int = 1
) -> tuple[float, list[float]]:
    """Closed loop, no think time: `conc` callers place `batch` processes per request, then
    release them; process placements/s and request latencies."""
    h = {"Authorization": f"Bearer {token}"}
    lat: list[float] = []
    n = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc), headers=h) as s:
        progs = []
        for k in range(conc):
            async with s.post(url + "/v1/programs", json={"argv": ["storm", str(k)]}) as r:
                progs.append((await r.json())["id"])
        stop = time.perf_counter() + seconds

        async def worker(pid: str) -> None:
            nonlocal n
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                async with s.post(
                    url + f"/v1/programs/{pid}/placements", json={"processes": batch}
                ) as r:
                    got = await r.json()
                lat.append(time.perf_counter() - t0)
                if r.status != 200:
                    continue
                n += batch
                for a in got["assignments"]:
                    rel = {"instance": a["instance"], "processes": a["processes"]}
                    async with s.post(url + f"/v1/programs/{pid}/release", json=rel) as r:
                        await r.read()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(p) for p in progs))
        return n / (time.perf_counter() - t0), lat


def _run_instances(url: str, toks: dict[str, str], start: float, stop: float, q: Any) -> None:
    res = asyncio.run(_instances(url, toks, start, stop))
    res["cpu"] = time.process_time()  # the generator's own CPU (it shares the cores)
    q.put(("instances", res))


def _run_clients(
    url: str, token: str, n: int, think: float, start: float, stop: float, q: Any
) -> None:
    res = asyncio.run(_clients(url, token, n, think, start, stop))
    res["cpu"] = time.process_time()
    q.put(("clients", res))


# -- in-process placement ---------------------------------------------------------


def bench_scheduler(n_instances: int, seconds: float) -> float:
    """Pure placement decisions per second over the whole candidate set."""
    rnd = random.Random(1)
    cands = [
        Candidate(f"i{i}", "t", 2, rnd.randint(1, 100), None, 8, rnd.randint(0, 7), None, 0.0)
        for i in range(n_instances)
    ]
    pol = SelectionPolicy()
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            place("p", 1, pol, cands, {}, 1)
        n += 100
    return n / (time.perf_counter() - t0)


async def bench_store_place(data: Path, n_instances: int, seconds: float) -> float:
    """Durable placements per second through the store (no HTTP), 64 concurrent callers."""
    store = Store(data, VERSIONS)
    await store.open()
    accounts, instances = Accounts(store), Instances(store)
    programs = Programs(store, BudgetCheck())
    try:
        acct, user, _ = await accounts.create_account("s", False, "sum", "u")
        who = Principal(acct["id"], user["id"], False, "t")
        await asyncio.gather(*(instances.mint_instance_token(f"i{i}") for i in range(n_instances)))
        await asyncio.gather(
            *(instances.register_instance(f"i{i}", "a", "h", 2, 1, 4) for i in range(n_instances))
        )
        spec = m.ProgramSubmit(argv=["x"]).model_dump(mode="json")
        spec["resource_policy"] = m.ResourcePolicy().model_dump(mode="json")
        spec["scaling_policy"] = m.ScalingPolicy().model_dump(mode="json")
        progs = [await programs.submit(who, spec, None) for _ in range(64)]
        n = 0
        stop = time.perf_counter() + seconds

        async def worker(pid: str) -> None:
            nonlocal n
            while time.perf_counter() < stop:
                (a,) = await programs.place(acct["id"], pid, 1)
                await programs.release(acct["id"], pid, a["instance"], 1)
                n += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(p["id"]) for p in progs))
        return n / (time.perf_counter() - t0)
    finally:
        await store.close()


# -- main ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument(
        "--think", type=float, default=0.1, help="mean seconds between a client's requests"
    )
    ap.add_argument("--tick", type=float, default=1.0, help="the server's --tick")
    ap.add_argument("--storm", type=float, default=5.0, help="seconds of closed-loop API placement")
    ap.add_argument("--batch", type=int, default=16, help="processes per placement request")
    ap.add_argument("--skip-inproc", action="store_true", help="skip the in-process measures")
    ap.add_argument(
        "--inproc-only", action="store_true", help="only the in-process placement measures"
    )
    ap.add_argument("--no-baseline", action="store_true", help="skip the bare aiohttp baseline run")
    args = ap.parse_args()
    if args.inproc_only:
        with tempfile.TemporaryDirectory(prefix="bench-oss-") as tmp:
            p0 = _pressure()
            durable = asyncio.run(bench_store_place(Path(tmp), args.instances, 5.0))
            pre = bench_scheduler(CANDIDATES, 2.0)
            full = bench_scheduler(args.instances, 2.0)
            print(f"host CPU pressure at start / end: {p0} / {_pressure()}")
            print(
                f"durable placements/s in-process (store, {args.instances} instances):"
                f" {durable:,.0f}"
            )
            print(f"placement decisions/s, {CANDIDATES} pre-filtered candidates: {pre:,.0f}")
            print(f"placement decisions/s, full scan of {args.instances}: {full:,.0f}")
        return

    with tempfile.TemporaryDirectory(prefix="bench-oss-") as tmp:
        tmpd = Path(tmp)
        sched = sched_pre = store_rate = float("nan")
        if not args.skip_inproc:
            sched = bench_scheduler(args.instances, 3.0)
            sched_pre = bench_scheduler(CANDIDATES, 2.0)
            store_rate = asyncio.run(bench_store_place(tmpd / "inproc", args.instances, 5.0))

        admin, toks = asyncio.run(_setup(tmpd / "served", args.instances))
        proc, url = start_server(tmpd / "served", args.tick)
        try:
            start = time.time() + args.warmup + 5.0  # time for registrations
            stop = start + args.duration
            q: Any = mp.Queue()
            ps = [
                mp.Process(target=_run_instances, args=(url, toks, start, stop, q)),
                mp.Process(
                    target=_run_clients, args=(url, admin, args.clients, args.think, start, stop, q)
                ),
            ]
            for p in ps:
                p.start()
            while time.time() < start:
                time.sleep(0.1)
            psi0 = _pressure()
            m0 = _scrape(url, admin)
            cpu0 = _cpu(proc.pid)
            while time.time() < stop:
                time.sleep(0.1)
            m1 = _scrape(url, admin)
            cpu1 = _cpu(proc.pid)
            hb0, hb1 = _server_heartbeats(m0), _server_heartbeats(m1)
            res = dict(q.get(timeout=120) for _ in ps)
            for p in ps:
                p.join(60)
            psi1 = _pressure()
            storm_rate, storm_lat = asyncio.run(_place_storm(url, admin, 32, args.storm))
            batch_rate, batch_lat = asyncio.run(
                _place_storm(url, admin, 32, args.storm, args.batch)
            )
        finally:
            proc.kill()
            proc.wait()

    inst, cli = res["instances"], res["clients"]
    all_lat = [x for v in cli["lat"].values() for x in v]
    rows = [
        ("instances x heartbeat period", f"{args.instances} x 1 s"),
        ("API clients (mean think time)", f"{args.clients} ({args.think * 1000:.0f} ms)"),
        ("measured window", f"{args.duration:.0f} s"),
        ("heartbeats processed/s (server counter)", f"{(hb1 - hb0) / args.duration:,.0f}"),
        ("heartbeat ok / errors", f"{inst['ok']:,} / {inst['err']:,}"),
        ("heartbeat p50 / p99 ms", f"{pct(inst['lat'], 0.5):.1f} / {pct(inst['lat'], 0.99):.1f}"),
        ("API requests/s (excl. heartbeats)", f"{len(all_lat) / args.duration:,.0f}"),
        ("API p50 / p99 ms (all ops)", f"{pct(all_lat, 0.5):.1f} / {pct(all_lat, 0.99):.1f}"),
        (
            "server-side API p50 / p99 ms (histogram bucket)",
            f"{_hist_q(_hist(m0, False), _hist(m1, False), 0.5)} / "
            f"{_hist_q(_hist(m0, False), _hist(m1, False), 0.99)}",
        ),
        (
            "server-side heartbeat p50 / p99 ms (bucket)",
            f"{_hist_q(_hist(m0, True), _hist(m1, True), 0.5)} / "
            f"{_hist_q(_hist(m0, True), _hist(m1, True), 0.99)}",
        ),
        ("placements/s through the API", f"{cli['placements'] / args.duration:,.0f}"),
        (
            "placements/s through the API, closed loop (32 callers)",
            f"{storm_rate:,.0f} (p50 {pct(storm_lat, 0.5):.1f}"
            f" / p99 {pct(storm_lat, 0.99):.1f} ms)",
        ),
        (
            f"process placements/s through the API, {args.batch} per request, closed loop",
            f"{batch_rate:,.0f} (p50 {pct(batch_lat, 0.5):.1f}"
            f" / p99 {pct(batch_lat, 0.99):.1f} ms)",
        ),
        ("placements/s in-process, durable (store)", f"{store_rate:,.0f}"),
        (
            f"placement decisions/s in-process (scheduler, {CANDIDATES} pre-filtered candidates)",
            f"{sched_pre:,.0f}",
        ),
        (
            f"placement decisions/s in-process (scheduler, full scan of {args.instances})",
            f"{sched:,.0f}",
        ),
        ("server CPU (cores busy)", f"{(cpu1 - cpu0) / args.duration:.2f}"),
        (
            "load generators' CPU, whole run incl. set-up (seconds)",
            f"instances {inst['cpu']:.1f}, clients {cli['cpu']:.1f}",
        ),
        (
            "server CPU per request (incl. heartbeats)",
            f"{1000 * (cpu1 - cpu0) / max(1, len(all_lat) + hb1 - hb0):.2f} ms",
        ),
        ("host CPU pressure 'some' avg10 at start / end (incl. this bench)", f"{psi0} / {psi1}"),
    ]
    if not args.no_baseline:
        ours = {"names": list(toks), "api": all_lat, "hb": inst["lat"]}
        rows += baseline_rows(ours, (storm_rate, storm_lat), args)
    for op in sorted(cli["lat"]):
        v = cli["lat"][op]
        rows.append(
            (
                f"  {op}: n / p50 / p99 ms / errors",
                f"{len(v):,} / {pct(v, 0.5):.1f} / {pct(v, 0.99):.1f} / {cli['errs'].get(op, 0)}",
            )
        )
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="dcp-oss benchmark")
        t.add_column("measure")
        t.add_column("value", justify="right")
        for r in rows:
            t.add_row(*r)
        Console(width=130).print(t)
    except ImportError:
        for k, v in rows:
            print(f"{k:50} {v}")


def _scrape(url: str, token: str) -> str:
    import urllib.request

    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    for _ in range(4):  # a loaded machine drops some connections
        try:
            return urllib.request.urlopen(req, timeout=30).read().decode()
        except OSError:
            time.sleep(1.0)
    return urllib.request.urlopen(req, timeout=30).read().decode()


def _server_heartbeats(text: str) -> float:
    mt = re.search(r"^dcp_heartbeats_total (\S+)$", text, re.M)
    return float(mt.group(1)) if mt else float("nan")


def _hist(text: str, heartbeat: bool) -> dict[float, float]:
    """Cumulative server-side latency bucket counts (summed over routes)."""
    out: dict[float, float] = {}
    for mt in re.finditer(r"^dcp_api_request_seconds_bucket\{(.*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', mt.group(1)))
        if (labels.get("route") == "/v1/agents/heartbeat") != heartbeat:
            continue
        le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
        out[le] = out.get(le, 0.0) + float(mt.group(2))
    return out


def _hist_q(a: dict[float, float], b: dict[float, float], q: float) -> str:
    """Upper bound (ms) of the bucket holding quantile q of the requests between scrapes a, b."""
    les = sorted(b)
    total = b[les[-1]] - a.get(les[-1], 0.0)
    for le in les:
        if b[le] - a.get(le, 0.0) >= q * total:
            return "<= " + ("inf" if le == float("inf") else f"{le * 1000:g}")
    return "n/a"


def _pressure() -> str:
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return "n/a"
    mt = re.search(r"avg10=(\S+)", line)
    return f"{mt.group(1)}%" if mt else "n/a"


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    del statistics
    main()
