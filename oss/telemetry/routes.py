"""The telemetry service's HTTP routes: program, agent and OSS logs; metrics (JSON,
Prometheus, reported counters).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

from aiohttp import web
from pydantic import Field

from oss import models as m
from oss.api import PROGRAM_PATH, Result, Route, principal
from oss.errors import InvalidRequest
from oss.service import Oss
from oss.telemetry import logs as logmod
from oss.telemetry import processes as procmod

log = logging.getLogger(__name__)


class LogQueryParams(m.Api):
    """Filters for reading a log."""

    stream: Literal["stdout", "stderr", "log", "event"] | None = None
    instance: str | None = Field(None, max_length=64)
    since: float | None = Field(None, ge=0, le=1e11)
    until: float | None = Field(None, ge=0, le=1e11)
    cursor: int = Field(0, ge=0, le=2**62)
    limit: int = Field(10_000, ge=1, le=100_000)
    follow: bool = False


class StreamQueryParams(m.Api):
    """Filters for reading one output stream."""

    instance: str | None = Field(None, max_length=64)
    since: float | None = Field(None, ge=0, le=1e11)
    until: float | None = Field(None, ge=0, le=1e11)
    cursor: int = Field(0, ge=0, le=2**62)
    limit: int = Field(10_000, ge=1, le=100_000)
    follow: bool = False


def _lines(body: m.LogAppend, now: float) -> list[logmod.LogLine]:
    return [
        logmod.LogLine(ln.ts if ln.ts is not None else now, ln.stream, ln.text, ln.instance, ln.pid)
        for ln in body.lines
    ]


async def h_append_logs(oss: Oss, r: web.Request, who: Any, b: m.LogAppend, q: Any) -> m.Ok:
    await oss.logs.append_logs(
        principal(who).account_id, r.match_info["program_id"], _lines(b, oss.clock())
    )
    return m.Ok()


async def _read_log(
    oss: Oss, r: web.Request, account: str | None, program: str | None, q: Any, stream: str | None
) -> m.LogPage | web.StreamResponse:
    streams = frozenset([stream]) if stream else None
    lq = logmod.LogQuery(q.instance, q.since, q.until, streams, q.cursor, q.limit)
    if not q.follow:
        lines, cursor, decoded = await oss.logs.read_logs(account, program, lq)
        oss.metrics.log_chunks_decoded.inc(decoded)

        def render() -> str:
            return m.LogPage(lines=[_out(ln) for _, ln in lines], cursor=cursor).model_dump_json()

        # A page may hold 100,000 lines: build and serialise it off the loop.
        text = render() if len(lines) <= 100 else await asyncio.to_thread(render)
        return web.Response(text=text, content_type="application/json")
    if program is None:
        raise InvalidRequest("follow is only supported for program logs")
    await oss.programs.program(account or "", program)  # 404 before the stream starts
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(r)
    cursor = q.cursor
    seen_end = 0.0  # when this follower first saw the program ended (monotonic)
    try:
        while True:
            lines, cursor, decoded = await oss.logs.read_logs(
                account,
                program,
                logmod.LogQuery(q.instance, q.since, q.until, streams, cursor, q.limit),
            )
            oss.metrics.log_chunks_decoded.inc(decoded)
            for _, ln in lines:
                await resp.write(_out(ln).model_dump_json().encode() + b"\n")
            if not lines:
                if r.transport is None or r.transport.is_closing():
                    break  # the follower hung up; nothing to write to notice it by
                prog = await oss.programs.program(account or "", program)
                # Instances report a program's last lines up to a batch interval after it
                # ended: follow on that long after the end before closing.
                if prog["state"] not in ("pending", "running", "recovering"):
                    now = time.monotonic()
                    seen_end = seen_end or now
                    if (
                        oss.clock() - prog["updated"] >= FOLLOW_AFTER_END
                        or now - seen_end >= FOLLOW_AFTER_END
                    ):
                        break
                await asyncio.sleep(oss.config.follow_poll)
        await resp.write_eof()
    except ConnectionError:  # includes aiohttp's ClientConnectionResetError
        log.debug("log follower of %s went away", program)  # the client hung up: done
    return resp


FOLLOW_AFTER_END = 2.5  # seconds: the agents' report interval, settle time and margin


def _out(ln: logmod.LogLine) -> m.LogLineOut:
    return m.LogLineOut(ts=ln.ts, stream=ln.stream, text=ln.text, instance=ln.instance, pid=ln.pid)


async def h_logs(oss: Oss, r: web.Request, who: Any, b: Any, q: LogQueryParams) -> Result:
    return await _read_log(
        oss, r, principal(who).account_id, r.match_info["program_id"], q, q.stream
    )


async def h_stdout(oss: Oss, r: web.Request, who: Any, b: Any, q: StreamQueryParams) -> Result:
    return await _read_log(
        oss, r, principal(who).account_id, r.match_info["program_id"], q, "stdout"
    )


async def h_stderr(oss: Oss, r: web.Request, who: Any, b: Any, q: StreamQueryParams) -> Result:
    return await _read_log(
        oss, r, principal(who).account_id, r.match_info["program_id"], q, "stderr"
    )


async def h_oss_logs(oss: Oss, r: web.Request, who: Any, b: Any, q: StreamQueryParams) -> Result:
    return await _read_log(oss, r, None, None, q, None)


async def h_agent_logs(oss: Oss, r: web.Request, who: Any, b: m.AgentLogAppend, q: Any) -> m.Ok:
    lines = [
        logmod.LogLine(
            ln.ts if ln.ts is not None else oss.clock(), ln.stream, ln.text, str(who), ln.pid
        )
        for ln in b.lines
    ]
    await oss.logs.append_logs(None, b.program_id, lines, instance_owner=str(who))
    return m.Ok()


async def h_report_metrics(oss: Oss, r: web.Request, who: Any, b: m.MetricsReport, q: Any) -> m.Ok:
    pid = r.match_info["program_id"]
    # Only the caller's own program, and an instance label only where it runs: a tenant
    # never reports for an instance (instance load comes from agents' heartbeats alone).
    await oss.programs.check_placed(principal(who).account_id, pid, b.instance)
    oss.metrics.report(pid, b)
    return m.Ok()


async def h_program_metrics(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.ProgramMetrics:
    pid = r.match_info["program_id"]
    await oss.programs.program(principal(who).account_id, pid)
    by_process = {
        f"{row['instance']}:{row['pid']}": _process_counters(row)
        for row in await oss.processes.newest(pid)
    }
    return m.ProgramMetrics(
        **oss.metrics.program(pid).model_dump(),
        by_instance=oss.metrics.by_instance(pid),
        by_process=by_process,
    )


def _process_counters(row: Any) -> m.Counters:
    p = procmod.process_row(row)
    return m.Counters(
        syscalls=p.syscalls_by_service,
        latency_seconds={},
        cpu_seconds=p.cpu_seconds,
        memory_bytes=p.max_rss_kb * 1024,
        io_read_bytes=p.io_read_bytes,
        io_write_bytes=p.io_write_bytes,
        net_rx_bytes=p.net_rx_bytes,
        net_tx_bytes=p.net_tx_bytes,
    )


async def h_agent_report(
    oss: Oss, r: web.Request, who: Any, b: m.AgentReport, q: Any
) -> m.ReportAck:
    return await oss.report(str(who), b)


async def h_processes(
    oss: Oss, r: web.Request, who: Any, b: Any, q: m.ProcessQuery
) -> m.ProcessList:
    if q.offset or q.limit is not None:  # one page (the web view's timeline), as it is now
        rows, total = await oss.processes.page(
            principal(who).account_id, r.match_info["program_id"], q.offset, q.limit or 1000
        )
        procs = [procmod.process_row(x) for x in rows]
        return m.ProcessList(
            processes=procs,
            incomplete=[f"{p.instance}:{p.pid}" for p in procs if p.state == "running"],
            total=total,
        )
    return await oss.process_list(
        principal(who).account_id, r.match_info["program_id"], q.final_wait, q.expect
    )


async def h_metrics_json(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.MetricsJson:
    p = principal(who)
    progs = await oss.programs.programs(p.account_id, None, 10_000)
    ids = {x["id"] for x in progs}
    insts = await oss.instances.instances(None if p.admin else p.account_id)
    return m.MetricsJson(
        programs={i: oss.metrics.program(i) for i in sorted(ids)},
        instances={
            i["name"]: oss.metrics.instance(i["name"], None if p.admin else ids) for i in insts
        },
    )


async def h_prometheus(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> web.Response:
    # Rendering walks every series: off the loop (prometheus_client locks each metric while
    # it copies its children), one render at a time.
    async with oss.metrics.render_lock:
        body = await asyncio.to_thread(oss.metrics.exposition)
    return web.Response(body=body, content_type="text/plain")


async def h_instance_metrics(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.MetricsJson:
    p = principal(who)
    name = r.match_info["instance"]
    await oss.instances.instances(None if p.admin else p.account_id, name)
    progs = {x["id"] for x in await oss.programs.programs(p.account_id, None, 10_000)}
    return m.MetricsJson(
        programs={}, instances={name: oss.metrics.instance(name, None if p.admin else progs)}
    )


P = PROGRAM_PATH
ROUTES: tuple[Route, ...] = (
    Route(
        "GET", "/metrics", h_prometheus, "admin", "Prometheus metrics", content_type="text/plain"
    ),
    Route(
        "POST",
        P + "/logs",
        h_append_logs,
        "account",
        "Append log/stdout/stderr lines",
        m.LogAppend,
        m.Ok,
        big_body=True,
    ),
    Route(
        "GET",
        P + "/logs",
        h_logs,
        "account",
        "Consolidated log (follow=true streams NDJSON)",
        response=m.LogPage,
        query=LogQueryParams,
    ),
    Route(
        "GET",
        P + "/stdout",
        h_stdout,
        "account",
        "Standard output",
        response=m.LogPage,
        query=StreamQueryParams,
    ),
    Route(
        "GET",
        P + "/stderr",
        h_stderr,
        "account",
        "Standard error",
        response=m.LogPage,
        query=StreamQueryParams,
    ),
    Route(
        "POST",
        P + "/metrics",
        h_report_metrics,
        "account",
        "Report counters",
        m.MetricsReport,
        m.Ok,
    ),
    Route(
        "GET",
        P + "/metrics",
        h_program_metrics,
        "account",
        "Program counters (measured; by instance and by process)",
        response=m.ProgramMetrics,
    ),
    Route(
        "GET",
        P + "/processes",
        h_processes,
        "account",
        "The program's processes with their measured usage",
        response=m.ProcessList,
        query=m.ProcessQuery,
    ),
    Route(
        "POST",
        "/v1/agents/report",
        h_agent_report,
        "agent",
        "Agent reports measured usage, output lines and events (a batch per seq)",
        m.AgentReport,
        m.ReportAck,
        big_body=True,
    ),
    Route(
        "GET", "/v1/metrics", h_metrics_json, "account", "Counters as JSON", response=m.MetricsJson
    ),
    Route(
        "GET",
        "/v1/instances/{instance}/metrics",
        h_instance_metrics,
        "account",
        "Instance counters",
        response=m.MetricsJson,
    ),
    Route(
        "GET",
        "/v1/oss/logs",
        h_oss_logs,
        "admin",
        "The OSS log",
        response=m.LogPage,
        query=StreamQueryParams,
    ),
    Route(
        "POST",
        "/v1/agents/logs",
        h_agent_logs,
        "agent",
        "Agent appends program log lines",
        m.AgentLogAppend,
        m.Ok,
        big_body=True,
    ),
)
