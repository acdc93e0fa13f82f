"""Benchmark one `dcp-oss serve` (subprocess, loopback) under load, against bare aiohttp.

Load: N simulated instances (default 1,000) heartbeating every second, and C
concurrent API clients (default 200), each looping over a request mix with a
think time between requests (submit, place, release, inspect, list, append a
log line, read billing); then closed-loop placement storms.  The load comes
from one generator process (`bench/oss_load.py`: raw keep-alive HTTP, ~0.03 ms
of CPU per request) pinned to CPU 1, the server under test pinned to CPU 0, so
the generator never takes the server's core (`--no-pin`: both float).  The same
generator then drives a bare aiohttp handler (fixed JSON, no auth, no store) on
CPU 0 in the same run: the baseline, and OSS / bare ratios.  Also measures the
scheduler in-process: the pure decision alone, and the store's durable place
(SQL pre-filter + decision + limit check + reservation + group commit), without
HTTP.

    PYTHONPATH=. python3 bench/bench_oss.py --duration 15 --runs 3

Prints a table per run and min / median over the runs; figures go in
docs/BENCHMARKS.md.  No timed assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

SERVER_CPU, LOAD_CPU = 0, 1


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs, in milliseconds."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return 1000 * s[min(len(s) - 1, int(q * len(s)))]


NICE = 0  # --nice: the priority of the server's and the generator's groups (root: below 0)


def _pinned(cpu: int | None) -> Callable[[], None] | None:
    """A preexec_fn that pins the child (and every thread it starts) to `cpu`."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def _spawn(argv: list[str], cpu: int | None, **kw: Any) -> subprocess.Popen[str]:
    """Start a bench process in a session of its own, pinned to `cpu`.

    Its own session is its own scheduler autogroup (kernel.sched_autogroup_enabled=1
    here): otherwise the server, the generator and this script would share one group's
    CPU share against every other session on the machine.  With --nice the group's
    nice is set (/proc/PID/autogroup; a thread's nice counts only inside its group).
    """
    proc = subprocess.Popen(argv, text=True, preexec_fn=_pinned(cpu), start_new_session=True, **kw)
    if NICE:
        try:
            Path(f"/proc/{proc.pid}/autogroup").write_text(str(NICE))
        except OSError:
            os.setpriority(os.PRIO_PROCESS, proc.pid, NICE)
    return proc


# -- set-up --------------------------------------------------------------------------


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


def _started(proc: subprocess.Popen[str], what: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"{what} did not start: {line!r}")
    return line.split()[-1]


OSS_TREE = ROOT  # --oss-tree: the checkout whose dcp-oss is measured (before/after runs)


def start_server(data: Path, tick: float, cpu: int | None) -> tuple[subprocess.Popen[str], str]:
    """`dcp-oss serve` on `data`, pinned to `cpu`."""
    env = {**os.environ, "PYTHONPATH": str(OSS_TREE)}
    argv = [sys.executable, "-m", "oss", "serve", "--listen", "127.0.0.1:0", "--data", str(data)]
    argv += ["--heartbeat-timeout", "15", "--tick", str(tick)]
    # Every simulated agent and client connects from 127.0.0.1: the per-peer cap (256,
    # meant for one real peer) would refuse most of the 1,000 agents' connections.
    argv += ["--max-connections-per-peer", "2048"]
    proc = _spawn(argv, cpu, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return proc, _started(proc, "dcp-oss")


# A bare aiohttp server answering every route with fixed JSON: the baseline the OSS's
# figures are divided by (same generator, same cores, same run, asyncio's loop as dcp-oss).
BARE_SERVER = r"""
import asyncio
from aiohttp import web
BODY = {"id": "prg_bare", "instance": "x", "heartbeat_interval": 1.0, "commands": [],
        "programs": [], "assignments": [{"instance": "sim00000", "processes": 1}], "grants": []}
async def ok(request):
    if request.can_read_body:
        await request.read()
    return web.json_response(BODY)
async def main():
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def start_bare(cpu: int | None) -> tuple[subprocess.Popen[str], str]:
    """The baseline: a bare aiohttp handler (no auth, no store, no validation)."""
    proc = _spawn(
        [sys.executable, "-c", BARE_SERVER], cpu, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    return proc, _started(proc, "the bare aiohttp server")


def start_load(spec: dict[str, Any], cpu: int | None) -> subprocess.Popen[str]:
    """The load generator (bench/oss_load.py), pinned to `cpu`; the spec goes on its stdin."""
    proc = _spawn(
        [sys.executable, str(ROOT / "bench" / "oss_load.py")],
        cpu,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    return proc


def finish_load(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    out = proc.stdout.read()
    if proc.wait(timeout) != 0 or not out:
        raise SystemExit(f"the load generator failed (status {proc.returncode})")
    res: dict[str, Any] = json.loads(out)
    return res


STORMS = ("pair", "cancel", "batch")


def drive(
    url: str, admin: str, toks: dict[str, str], args: Any, server_pid: int, scrape: bool
) -> dict[str, Any]:
    """One load run against the server at `url`: the generator's results, plus the
    server's CPU over the measured window (and its /metrics before and after, if asked)."""
    start = time.time() + args.warmup + 5.0  # time for the registrations
    stop = start + args.duration
    spec = dict(
        url=url,
        admin=admin,
        tokens=toks,
        clients=args.clients,
        think=args.think,
        start=start,
        stop=stop,
        storm=args.storm,
        storm_callers=args.callers,
        per_program=args.per_program,
        batch=args.batch,
        storms=STORMS,
    )
    cpus = args.cpus
    gen = start_load(spec, cpus[1])
    while time.time() < start:
        time.sleep(0.05)
    got: dict[str, Any] = {"psi0": _pressure(), "load0": os.getloadavg()[0]}
    if scrape:
        got["m0"] = _scrape(url, admin)
    cpu0 = _cpu(server_pid)
    while time.time() < stop:
        time.sleep(0.05)
    cpu1 = _cpu(server_pid)
    if scrape:
        got["m1"] = _scrape(url, admin)
    got["psi1"] = _pressure()
    got["server_cores"] = (cpu1 - cpu0) / args.duration
    got.update(finish_load(gen, args.duration + 3 * args.storm + 300))
    return got


def one_run(args: Any, tmpd: Path) -> dict[str, Any]:
    """The OSS, then the bare baseline, under the same load; the figures of both."""
    admin, toks = asyncio.run(_setup(tmpd, args.instances))
    proc, url = start_server(tmpd, args.tick, args.cpus[0])
    try:
        oss = drive(url, admin, toks, args, proc.pid, True)
    finally:
        proc.kill()
        proc.wait()
    bare: dict[str, Any] | None = None
    if not args.no_baseline:
        proc, url = start_bare(args.cpus[0])
        try:
            bare = drive(url, "bare", {n: "t" for n in toks}, args, proc.pid, False)
        finally:
            proc.kill()
            proc.wait()
    return {"oss": oss, "bare": bare}


def figures(r: dict[str, Any], duration: float) -> dict[str, float]:
    """The headline figures of one load run (ms, per second)."""
    api = [x for v in r["clients"]["lat"].values() for x in v]
    hb = r["instances"]["lat"]
    return {
        "hb_p50": pct(hb, 0.5),
        "hb_p99": pct(hb, 0.99),
        "api_p50": pct(api, 0.5),
        "api_p99": pct(api, 0.99),
        "api_rps": len(api) / duration,
        "pair": r["storm"]["pair"]["rate"],
        "cancel": r["storm"]["cancel"]["rate"],
        "batch": r["storm"]["batch"]["rate"],
    }


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


# -- main ---------------------------------------------------------------------------


def run_rows(res: dict[str, Any], args: Any) -> list[tuple[str, str]]:
    """The table of one run."""
    oss, bare = res["oss"], res["bare"]
    inst, cli = oss["instances"], oss["clients"]
    f = figures(oss, args.duration)
    m0, m1 = oss["m0"], oss["m1"]
    hb0, hb1 = _server_heartbeats(m0), _server_heartbeats(m1)
    storm = oss["storm"]
    hb_rate = (hb1 - hb0) / args.duration
    rows = [
        ("instances x heartbeat period", f"{args.instances} x 1 s"),
        ("API clients (mean think time)", f"{args.clients} ({args.think * 1000:.0f} ms)"),
        ("measured window", f"{args.duration:.0f} s"),
        ("cores: server / load generator", _where(args)),
        ("heartbeats processed/s (server counter)", f"{hb_rate:,.0f}"),
        ("heartbeat ok / errors", f"{inst['ok']:,} / {inst['err']:,}"),
        ("heartbeat p50 / p99 ms (from when due)", f"{f['hb_p50']:.1f} / {f['hb_p99']:.1f}"),
        ("  the generator's own send lag p99 ms", f"{pct(inst['lag'], 0.99):.1f}"),
        ("API requests/s (excl. heartbeats)", f"{f['api_rps']:,.0f}"),
        ("API p50 / p99 ms (all ops)", f"{f['api_p50']:.1f} / {f['api_p99']:.1f}"),
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
        ("placements/s through the API (this mix)", f"{cli['placements'] / args.duration:,.0f}"),
        ("server CPU (cores busy) in the window", f"{oss['server_cores']:.2f}"),
        (
            "server CPU per request (incl. heartbeats)",
            f"{1000 * oss['server_cores'] / max(1.0, f['api_rps'] + hb_rate):.3f} ms",
        ),
        ("generator CPU in the mixed phase (s)", f"{oss['cpu_mixed']:.1f}"),
        (
            "host CPU pressure 'some' avg10 / load average, start / end",
            f"{oss['psi0']} / {oss['psi1']}, {oss['load0']:.1f}",
        ),
        (
            f"closed loop, {args.callers} callers: place 1 + release it, pairs/s",
            _storm(storm["pair"]),
        ),
        (
            f"closed loop, {args.callers} callers: place 1 per request (cancel every"
            f" {args.per_program})",
            _storm(storm["cancel"]),
        ),
        (
            f"closed loop, {args.callers} callers: {args.batch} processes per request",
            _storm(storm["batch"]),
        ),
    ]
    if bare is not None:
        b = figures(bare, args.duration)
        rows += [
            ("BASELINE: bare aiohttp handler, same generator, same cores", ""),
            ("  heartbeat p50 / p99 ms (bare)", f"{b['hb_p50']:.1f} / {b['hb_p99']:.1f}"),
            ("  API p50 / p99 ms (bare)", f"{b['api_p50']:.1f} / {b['api_p99']:.1f}"),
            ("  API requests/s (bare)", f"{b['api_rps']:,.0f}"),
            ("  server CPU (cores busy, bare)", f"{bare['server_cores']:.2f}"),
            ("  closed loop place+release pairs/s (bare)", _storm(bare["storm"]["pair"])),
            ("  closed loop place 1 per request /s (bare)", _storm(bare["storm"]["cancel"])),
            (
                "RATIO OSS / bare: heartbeat p99, API p99, pairs/s, placements/s",
                f"{f['hb_p99'] / b['hb_p99']:.2f}x, {f['api_p99'] / b['api_p99']:.2f}x, "
                f"{f['pair'] / b['pair']:.2f}x, {f['cancel'] / b['cancel']:.2f}x",
            ),
        ]
    for op in sorted(cli["lat"]):
        v = cli["lat"][op]
        rows.append(
            (
                f"  {op}: n / p50 / p99 ms / errors",
                f"{len(v):,} / {pct(v, 0.5):.1f} / {pct(v, 0.99):.1f} / {cli['errs'].get(op, 0)}",
            )
        )
    return rows


def summary_rows(runs: list[dict[str, Any]], args: Any) -> list[tuple[str, str]]:
    """Min / median over the runs of each headline figure (and of the ratios)."""
    ours = [figures(r["oss"], args.duration) for r in runs]
    bares = [figures(r["bare"], args.duration) for r in runs if r["bare"] is not None]
    names = [
        ("hb_p99", "heartbeat p99 ms (target < 20)", False),
        ("api_p99", "API p99 ms (target < 50)", False),
        ("api_rps", "API requests/s", True),
        ("pair", f"place+release pairs/s, {args.callers} callers", True),
        ("cancel", "placements/s, one per request (target 5,000)", True),
        ("batch", f"process placements/s, {args.batch} per request", True),
    ]
    rows: list[tuple[str, str]] = []
    for key, label, more_is_better in names:
        xs = [f[key] for f in ours]
        best = max(xs) if more_is_better else min(xs)
        line = f"{best:,.1f} / {statistics.median(xs):,.1f}"
        if len(bares) == len(ours) and key not in ("batch",):
            bs = [f[key] for f in bares]
            ratios = [a / b for a, b in zip(xs, bs, strict=True)]
            bb = max(bs) if more_is_better else min(bs)
            line += (
                f"   bare {bb:,.1f} / {statistics.median(bs):,.1f}"
                f"   ratio median {statistics.median(ratios):.2f}x"
            )
        rows.append((f"{label}: best / median", line))
    return rows


def _storm(s: dict[str, Any]) -> str:
    errors = f", {s['errors']} errors" if s["errors"] else ""
    p50, p99 = pct(s["lat"], 0.5), pct(s["lat"], 0.99)
    return f"{s['rate']:,.0f} (p50 {p50:.1f} / p99 {p99:.1f} ms{errors})"


def _where(args: Any) -> str:
    s, g = args.cpus
    nice = f", nice {args.nice}" if args.nice else ""
    if s is None:
        return f"not pinned (both float over every core){nice}"
    return f"server on CPU {s} alone, generator on CPU {g} (sched_setaffinity){nice}"


def show(title: str, rows: list[tuple[str, str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        t.add_column("measure")
        t.add_column("value", justify="right")
        for r in rows:
            t.add_row(*r)
        Console(width=140).print(t)
    except ImportError:
        print(title)
        for k, v in rows:
            print(f"{k:60} {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=1, help="whole runs (OSS + bare); min / median")
    ap.add_argument(
        "--think", type=float, default=0.1, help="mean seconds between a client's requests"
    )
    ap.add_argument("--tick", type=float, default=1.0, help="the server's --tick")
    ap.add_argument("--storm", type=float, default=4.0, help="seconds of each closed-loop storm")
    ap.add_argument("--batch", type=int, default=16, help="processes per batched placement")
    ap.add_argument("--callers", type=int, default=32, help="closed-loop callers of each storm")
    ap.add_argument(
        "--per-program",
        type=int,
        default=100,
        help="placements before a storm program is cancelled",
    )
    ap.add_argument("--skip-inproc", action="store_true", help="skip the in-process measures")
    ap.add_argument(
        "--inproc-only", action="store_true", help="only the in-process placement measures"
    )
    ap.add_argument("--no-baseline", action="store_true", help="skip the bare aiohttp baseline run")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server and generator")
    ap.add_argument("--json", type=Path, help="also write every run's raw results here")
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="the nice of the server's and the generator's scheduler groups (e.g. -10, as"
        " root: on a machine other sessions load, their pinned cores go mostly to them)",
    )
    ap.add_argument(
        "--oss-tree",
        type=Path,
        default=ROOT,
        help="serve the dcp-oss of this checkout (e.g. an older one, for before/after)",
    )
    args = ap.parse_args()
    global NICE, OSS_TREE
    NICE, OSS_TREE = args.nice, args.oss_tree.resolve()
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    args.cpus = (SERVER_CPU, LOAD_CPU) if pin else (None, None)
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

    runs: list[dict[str, Any]] = []
    for k in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="bench-oss-") as tmp:
            res = one_run(args, Path(tmp))
        runs.append(res)
        show(f"dcp-oss under load, run {k + 1} of {args.runs}", run_rows(res, args))
    if args.json is not None:
        slim = [
            {
                side: {k: v for k, v in r[side].items() if k not in ("m0", "m1")}
                for side in r
                if r[side]
            }
            for r in runs
        ]
        args.json.write_text(json.dumps(slim))
    show(f"dcp-oss under load: best / median of {len(runs)} run(s)", summary_rows(runs, args))
    if not args.skip_inproc:
        # In a child placed like the server (pinned, in a group of its own, at --nice).
        child = _spawn(
            [sys.executable, __file__, "--inproc-only", "--instances", str(args.instances)],
            args.cpus[0],
            stdout=subprocess.PIPE,
        )
        out, _ = child.communicate(timeout=300)
        print(f"placement in-process (no HTTP), pinned like the server:\n{out}")


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
    main()
