"""The OSS HTTP API (aiohttp): one route table drives dispatch, auth and /openapi.json.

HTTP statuses live here only, in `STATUS` (error type -> status).  Every
failure becomes a JSON `ErrorBody`; a 500 means a bug (the fuzz test hunts
for them).  Tenant isolation: account routes pass the caller's account id to
the store, which answers NotFound (404) for another account's objects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from aiohttp.typedefs import Handler as AioHandler
from pydantic import BaseModel, Field, ValidationError
from pydantic.json_schema import models_json_schema

from oss import models as m
from oss.accounts.store import Principal
from oss.compute.pool import InstanceType
from oss.errors import (
    BudgetExhausted,
    Conflict,
    Forbidden,
    InvalidRequest,
    LeaseError,
    LimitExceeded,
    NoCapacity,
    NotFound,
    OssError,
    PayloadTooLarge,
    ProviderError,
    RequestTimeout,
    StoreError,
    Unauthorized,
    ValidationFailed,
)
from oss.listener import ListenerLimits
from oss.service import Oss
from oss.telemetry import logs as logmod

log = logging.getLogger(__name__)

OSS_KEY = web.AppKey("oss", Oss)
LIMITS_KEY = web.AppKey("limits", ListenerLimits)

# The one error -> HTTP status table (most specific class first).
STATUS: tuple[tuple[type[OssError], int], ...] = (
    (PayloadTooLarge, 413),
    (RequestTimeout, 408),
    (ValidationFailed, 422),
    (InvalidRequest, 400),
    (Unauthorized, 401),
    (BudgetExhausted, 402),
    (Forbidden, 403),
    (NotFound, 404),
    (LimitExceeded, 409),
    (LeaseError, 409),
    (Conflict, 409),
    (ProviderError, 502),
    (NoCapacity, 503),
    (StoreError, 503),
)


def status_of(exc: OssError) -> int:
    """The HTTP status of an OSS error."""
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


Scope = Literal["public", "admin", "account", "agent"]
Caller = Principal | str | None  # account principal, instance name, or nobody
Result = BaseModel | Sequence[BaseModel] | web.StreamResponse
Handler = Callable[[Oss, web.Request, Any, Any, Any], Awaitable[Result]]


class NoQuery(m.Api):
    """No query parameters."""


class ProgramQuery(m.Api):
    """Filters for listing programs."""

    state: m.ProgramState | None = None
    limit: int = Field(100, ge=1, le=10_000)


class LogQueryParams(m.Api):
    """Filters for reading a log."""

    stream: Literal["stdout", "stderr", "log"] | None = None
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


@dataclass(frozen=True, slots=True)
class Route:
    """One API operation."""

    method: str
    path: str
    handler: Handler
    scope: Scope
    summary: str
    body: type[m.Api] | None = None
    response: type[BaseModel] | None = None
    many: bool = False  # the response is a list of `response`
    query: type[m.Api] = NoQuery
    content_type: str = "application/json"
    big_body: bool = False  # body up to OssConfig.max_body_bytes, else SMALL_BODY


SMALL_BODY = 64 << 10  # bytes: the body cap of every route but the few that carry bulk
INLINE_BODY = 8 << 10  # bytes: bodies up to this size are validated on the loop
MAX_ERRORS = 20  # validation errors listed in a 422 (the count says how many in all)


# -- handlers (oss, request, caller, body, query) -> result -------------------


def _acct(who: Any) -> Principal:
    assert isinstance(who, Principal)
    return who


async def h_health(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Ok:
    return m.Ok()


async def h_openapi(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> web.Response:
    return web.json_response(openapi())


async def h_create_account(
    oss: Oss, r: web.Request, who: Any, b: m.AccountCreate, q: Any
) -> m.AccountCreated:
    acct, user, token = await oss.accounts.create_account(
        b.name, b.admin, b.pricing_model.value, b.user
    )
    return m.AccountCreated(account=m.Account(**acct), user=m.User(**user), token=token)


async def h_accounts(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> list[m.Account]:
    p = _acct(who)
    return [m.Account(**a) for a in await oss.accounts.accounts(None if p.admin else p.account_id)]


async def h_account(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Account:
    p = _acct(who)
    aid = r.match_info["account_id"]
    if not p.admin and aid != p.account_id:
        raise NotFound(f"account {aid}")
    rows = await oss.accounts.accounts(aid)
    if not rows:
        raise NotFound(f"account {aid}")
    return m.Account(**rows[0])


async def h_create_user(oss: Oss, r: web.Request, who: Any, b: m.UserCreate, q: Any) -> m.User:
    return m.User(**await oss.accounts.create_user(_acct(who).account_id, b.name))


async def h_users(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> list[m.User]:
    return [m.User(**u) for u in await oss.accounts.users(_acct(who).account_id)]


async def h_user(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.User:
    return m.User(**(await oss.accounts.users(_acct(who).account_id, r.match_info["user_id"]))[0])


async def h_create_token(
    oss: Oss, r: web.Request, who: Any, b: m.TokenCreate, q: Any
) -> m.TokenCreated:
    p = _acct(who)
    return m.TokenCreated(
        **await oss.accounts.create_token(p.account_id, b.user_id or p.user_id, b.label)
    )


async def h_tokens(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> list[m.TokenInfo]:
    return [m.TokenInfo(**t) for t in await oss.accounts.tokens(_acct(who).account_id)]


async def h_revoke_token(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Ok:
    await oss.accounts.revoke_token(_acct(who).account_id, r.match_info["token_id"])
    oss.forget_tokens()
    return m.Ok()


async def _limits_scope(oss: Oss, r: web.Request, p: Principal) -> tuple[str, str]:
    if "user_id" in r.match_info:
        uid = r.match_info["user_id"]
        await oss.accounts.users(p.account_id, uid)
        return "user", uid
    if "program_id" in r.match_info:
        pid = r.match_info["program_id"]
        await oss.programs.program(p.account_id, pid)
        return "program", pid
    return "account", p.account_id


async def h_get_limits(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.LimitsBody:
    scope, sid = await _limits_scope(oss, r, _acct(who))
    return m.LimitsBody(**await oss.billing.get_limits(scope, sid))


async def h_put_limits(oss: Oss, r: web.Request, who: Any, b: m.LimitsBody, q: Any) -> m.LimitsBody:
    scope, sid = await _limits_scope(oss, r, _acct(who))
    await oss.billing.set_limits(scope, sid, b.model_dump(exclude_none=True))
    return b


async def h_get_policies(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Policies:
    return m.Policies.model_validate(await oss.programs.get_policies(_acct(who).account_id))


async def h_put_policies(oss: Oss, r: web.Request, who: Any, b: m.Policies, q: Any) -> m.Policies:
    await oss.programs.set_policies(_acct(who).account_id, b.model_dump(mode="json"))
    return b


async def h_submit(oss: Oss, r: web.Request, who: Any, b: m.ProgramSubmit, q: Any) -> m.Program:
    return m.Program(**await oss.submit(_acct(who), b))


async def h_programs(
    oss: Oss, r: web.Request, who: Any, b: Any, q: ProgramQuery
) -> list[m.Program]:
    return [
        m.Program(**p) for p in await oss.programs.programs(_acct(who).account_id, q.state, q.limit)
    ]


async def h_program(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Program:
    return m.Program(
        **await oss.programs.program(_acct(who).account_id, r.match_info["program_id"])
    )


async def h_cancel(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Program:
    return m.Program(**await oss.cancel(_acct(who), r.match_info["program_id"]))


async def h_finish(oss: Oss, r: web.Request, who: Any, b: m.ProgramFinish, q: Any) -> m.Program:
    return m.Program(
        **await oss.finish(_acct(who), r.match_info["program_id"], b.exit_status, b.signal)
    )


async def h_place(
    oss: Oss, r: web.Request, who: Any, b: m.PlacementRequest, q: Any
) -> m.PlacementResult:
    pid = r.match_info["program_id"]
    await oss.may_exec_as(_acct(who).account_id, b.exec_as)
    got = await oss.programs.place(_acct(who).account_id, pid, b.processes, b.avoid)
    grants = [m.ExecGrant(**g) for g in await oss.exec_grants(got, b.exec_as)]
    return m.PlacementResult(
        program_id=pid, assignments=[m.Placement(**a) for a in got], exec_grants=grants
    )


async def h_release(oss: Oss, r: web.Request, who: Any, b: m.ReleaseRequest, q: Any) -> m.Ok:
    await oss.programs.release(
        _acct(who).account_id, r.match_info["program_id"], b.instance, b.processes
    )
    return m.Ok()


def _lines(body: m.LogAppend, now: float) -> list[logmod.LogLine]:
    return [
        logmod.LogLine(ln.ts if ln.ts is not None else now, ln.stream, ln.text, ln.instance, ln.pid)
        for ln in body.lines
    ]


async def h_append_logs(oss: Oss, r: web.Request, who: Any, b: m.LogAppend, q: Any) -> m.Ok:
    await oss.logs.append_logs(
        _acct(who).account_id, r.match_info["program_id"], _lines(b, oss.clock())
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
                if prog["state"] not in ("pending", "running", "recovering"):
                    break
                await asyncio.sleep(oss.config.follow_poll)
        await resp.write_eof()
    except ConnectionError:  # includes aiohttp's ClientConnectionResetError
        log.debug("log follower of %s went away", program)  # the client hung up: done
    return resp


def _out(ln: logmod.LogLine) -> m.LogLineOut:
    return m.LogLineOut(ts=ln.ts, stream=ln.stream, text=ln.text, instance=ln.instance, pid=ln.pid)


async def h_logs(oss: Oss, r: web.Request, who: Any, b: Any, q: LogQueryParams) -> Result:
    return await _read_log(oss, r, _acct(who).account_id, r.match_info["program_id"], q, q.stream)


async def h_stdout(oss: Oss, r: web.Request, who: Any, b: Any, q: StreamQueryParams) -> Result:
    return await _read_log(oss, r, _acct(who).account_id, r.match_info["program_id"], q, "stdout")


async def h_stderr(oss: Oss, r: web.Request, who: Any, b: Any, q: StreamQueryParams) -> Result:
    return await _read_log(oss, r, _acct(who).account_id, r.match_info["program_id"], q, "stderr")


async def h_oss_logs(oss: Oss, r: web.Request, who: Any, b: Any, q: StreamQueryParams) -> Result:
    return await _read_log(oss, r, None, None, q, None)


async def h_report_metrics(oss: Oss, r: web.Request, who: Any, b: m.MetricsReport, q: Any) -> m.Ok:
    pid = r.match_info["program_id"]
    # Only the caller's own program, and an instance label only where it runs: a tenant
    # never reports for an instance (instance load comes from agents' heartbeats alone).
    await oss.programs.check_placed(_acct(who).account_id, pid, b.instance)
    oss.metrics.report(pid, b)
    return m.Ok()


async def h_program_metrics(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Counters:
    pid = r.match_info["program_id"]
    await oss.programs.program(_acct(who).account_id, pid)
    return oss.metrics.program(pid)


async def h_metrics_json(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.MetricsJson:
    p = _acct(who)
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


async def h_put_type(
    oss: Oss, r: web.Request, who: Any, b: m.InstanceTypeBody, q: Any
) -> m.InstanceTypeBody:
    await oss.instances.put_instance_type(
        InstanceType(b.name, b.cpus, b.memory_mb, b.price_micros_per_s, b.storage)
    )
    return b


async def h_types(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> list[m.InstanceTypeBody]:
    return [
        m.InstanceTypeBody(
            name=t.name,
            cpus=t.cpus,
            memory_mb=t.memory_mb,
            price_micros_per_s=t.price_micros_per_s,
            storage=t.storage,
        )
        for t in await oss.instances.instance_types()
    ]


async def h_put_pool(oss: Oss, r: web.Request, who: Any, b: m.PoolCreate, q: Any) -> m.Pool:
    await oss.instances.put_pool(b.name, b.instance_type, b.warm_target, b.max_size, b.provider)
    return m.Pool(**(await oss.instances.pools(b.name))[0])


async def h_pools(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> list[m.Pool]:
    return [m.Pool(**p) for p in await oss.instances.pools()]


async def h_pool(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Pool:
    return m.Pool(**(await oss.instances.pools(r.match_info["pool"]))[0])


async def h_create_instance(
    oss: Oss, r: web.Request, who: Any, b: m.InstanceCreate, q: Any
) -> m.InstanceToken:
    return m.InstanceToken(instance=b.name, token=await oss.mint_instance_token(b.name, b.pool))


async def h_instances(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> list[m.Instance]:
    p = _acct(who)
    return [
        m.Instance(**i) for i in await oss.instances.instances(None if p.admin else p.account_id)
    ]


async def h_instance(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Instance:
    p = _acct(who)
    rows = await oss.instances.instances(
        None if p.admin else p.account_id, r.match_info["instance"]
    )
    return m.Instance(**rows[0])


async def h_instance_metrics(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.MetricsJson:
    p = _acct(who)
    name = r.match_info["instance"]
    await oss.instances.instances(None if p.admin else p.account_id, name)
    progs = {x["id"] for x in await oss.programs.programs(p.account_id, None, 10_000)}
    return m.MetricsJson(
        programs={}, instances={name: oss.metrics.instance(name, None if p.admin else progs)}
    )


async def h_billing(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Billing:
    total, recs = await oss.billing.billing(_acct(who).account_id, r.match_info.get("program_id"))
    return m.Billing(total_micros=total, records=[m.BillingRecord(**x) for x in recs])


async def h_register(
    oss: Oss, r: web.Request, who: Any, b: m.AgentRegister, q: Any
) -> m.AgentRegistered:
    if b.instance != who:
        raise Unauthorized("token does not belong to this instance")
    await oss.register(b, r.remote)
    return m.AgentRegistered(instance=b.instance, heartbeat_interval=oss.config.heartbeat_interval)


async def h_heartbeat(oss: Oss, r: web.Request, who: Any, b: m.AgentHeartbeat, q: Any) -> m.Ok:
    if b.instance != who:
        raise Unauthorized("token does not belong to this instance")
    oss.heartbeat(b)
    return m.Ok()


async def h_agent_logs(oss: Oss, r: web.Request, who: Any, b: m.AgentLogAppend, q: Any) -> m.Ok:
    lines = [
        logmod.LogLine(
            ln.ts if ln.ts is not None else oss.clock(), ln.stream, ln.text, str(who), ln.pid
        )
        for ln in b.lines
    ]
    await oss.logs.append_logs(None, b.program_id, lines, instance_owner=str(who))
    return m.Ok()


async def h_lease_acquire(
    oss: Oss, r: web.Request, who: Any, b: m.LeaseAcquire, q: Any
) -> m.LeaseOut:
    lease = await oss.locks.acquire(b.name, str(who), b.ttl)
    return m.LeaseOut(
        name=lease.name, holder=lease.holder, fencing=lease.fencing, expires=lease.expires
    )


async def h_lease_release(oss: Oss, r: web.Request, who: Any, b: m.LeaseRef, q: Any) -> m.Ok:
    await oss.locks.release_token(b.name, str(who), b.fencing)
    return m.Ok()


async def h_lease_validate(oss: Oss, r: web.Request, who: Any, b: m.LeaseRef, q: Any) -> m.Ok:
    await oss.locks.validate(b.name, b.fencing)
    return m.Ok()


P = "/v1/programs/{program_id}"
ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", h_health, "public", "Liveness", response=m.Ok),
    Route("GET", "/openapi.json", h_openapi, "public", "This document"),
    Route(
        "GET", "/metrics", h_prometheus, "admin", "Prometheus metrics", content_type="text/plain"
    ),
    Route(
        "POST",
        "/v1/accounts",
        h_create_account,
        "admin",
        "Create an account",
        m.AccountCreate,
        m.AccountCreated,
    ),
    Route(
        "GET",
        "/v1/accounts",
        h_accounts,
        "account",
        "List visible accounts",
        response=m.Account,
        many=True,
    ),
    Route(
        "GET",
        "/v1/accounts/{account_id}",
        h_account,
        "account",
        "Inspect an account",
        response=m.Account,
    ),
    Route("POST", "/v1/users", h_create_user, "account", "Create a user", m.UserCreate, m.User),
    Route("GET", "/v1/users", h_users, "account", "List users", response=m.User, many=True),
    Route("GET", "/v1/users/{user_id}", h_user, "account", "Inspect a user", response=m.User),
    Route(
        "GET",
        "/v1/users/{user_id}/limits",
        h_get_limits,
        "account",
        "User limits",
        response=m.LimitsBody,
    ),
    Route(
        "PUT",
        "/v1/users/{user_id}/limits",
        h_put_limits,
        "account",
        "Set user limits",
        m.LimitsBody,
        m.LimitsBody,
    ),
    Route(
        "POST",
        "/v1/tokens",
        h_create_token,
        "account",
        "Mint a token",
        m.TokenCreate,
        m.TokenCreated,
    ),
    Route("GET", "/v1/tokens", h_tokens, "account", "List tokens", response=m.TokenInfo, many=True),
    Route(
        "DELETE",
        "/v1/tokens/{token_id}",
        h_revoke_token,
        "account",
        "Revoke a token",
        response=m.Ok,
    ),
    Route("GET", "/v1/limits", h_get_limits, "account", "Account limits", response=m.LimitsBody),
    Route(
        "PUT",
        "/v1/limits",
        h_put_limits,
        "account",
        "Set account limits",
        m.LimitsBody,
        m.LimitsBody,
    ),
    Route(
        "GET", "/v1/policies", h_get_policies, "account", "Default policies", response=m.Policies
    ),
    Route(
        "PUT",
        "/v1/policies",
        h_put_policies,
        "account",
        "Set default policies",
        m.Policies,
        m.Policies,
    ),
    Route(
        "POST",
        "/v1/programs",
        h_submit,
        "account",
        "Submit a program execution",
        m.ProgramSubmit,
        m.Program,
        big_body=True,
    ),
    Route(
        "GET",
        "/v1/programs",
        h_programs,
        "account",
        "List programs",
        response=m.Program,
        many=True,
        query=ProgramQuery,
    ),
    Route("GET", P, h_program, "account", "Inspect a program", response=m.Program),
    Route("POST", P + "/cancel", h_cancel, "account", "Cancel a program", response=m.Program),
    Route(
        "POST",
        P + "/finish",
        h_finish,
        "account",
        "Report a program's end",
        m.ProgramFinish,
        m.Program,
    ),
    Route(
        "POST",
        P + "/placements",
        h_place,
        "account",
        "Place more processes",
        m.PlacementRequest,
        m.PlacementResult,
    ),
    Route(
        "POST",
        P + "/release",
        h_release,
        "account",
        "Processes ended on an instance",
        m.ReleaseRequest,
        m.Ok,
    ),
    Route("GET", P + "/limits", h_get_limits, "account", "Program limits", response=m.LimitsBody),
    Route(
        "PUT",
        P + "/limits",
        h_put_limits,
        "account",
        "Set program limits",
        m.LimitsBody,
        m.LimitsBody,
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
        "GET", P + "/metrics", h_program_metrics, "account", "Program counters", response=m.Counters
    ),
    Route("GET", P + "/billing", h_billing, "account", "Program billing", response=m.Billing),
    Route("GET", "/v1/billing", h_billing, "account", "Account billing", response=m.Billing),
    Route(
        "GET", "/v1/metrics", h_metrics_json, "account", "Counters as JSON", response=m.MetricsJson
    ),
    Route(
        "GET",
        "/v1/instances",
        h_instances,
        "account",
        "List visible instances",
        response=m.Instance,
        many=True,
    ),
    Route(
        "POST",
        "/v1/instances",
        h_create_instance,
        "admin",
        "Create an instance credential",
        m.InstanceCreate,
        m.InstanceToken,
    ),
    Route(
        "GET",
        "/v1/instances/{instance}",
        h_instance,
        "account",
        "Inspect an instance",
        response=m.Instance,
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
        "/v1/instance-types",
        h_types,
        "account",
        "List instance types",
        response=m.InstanceTypeBody,
        many=True,
    ),
    Route(
        "PUT",
        "/v1/instance-types",
        h_put_type,
        "admin",
        "Create an instance type",
        m.InstanceTypeBody,
        m.InstanceTypeBody,
    ),
    Route("GET", "/v1/pools", h_pools, "account", "List pools", response=m.Pool, many=True),
    Route("PUT", "/v1/pools", h_put_pool, "admin", "Create or resize a pool", m.PoolCreate, m.Pool),
    Route("GET", "/v1/pools/{pool}", h_pool, "account", "Inspect a pool", response=m.Pool),
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
        "/v1/agents/register",
        h_register,
        "agent",
        "Agent registration",
        m.AgentRegister,
        m.AgentRegistered,
    ),
    Route(
        "POST",
        "/v1/agents/heartbeat",
        h_heartbeat,
        "agent",
        "Agent heartbeat",
        m.AgentHeartbeat,
        m.Ok,
    ),
    Route(
        "POST",
        "/v1/agents/leases/acquire",
        h_lease_acquire,
        "agent",
        "Acquire or renew a lease (409 if held)",
        m.LeaseAcquire,
        m.LeaseOut,
    ),
    Route(
        "POST",
        "/v1/agents/leases/release",
        h_lease_release,
        "agent",
        "Release a lease",
        m.LeaseRef,
        m.Ok,
    ),
    Route(
        "POST",
        "/v1/agents/leases/validate",
        h_lease_validate,
        "agent",
        "Check a fencing token is current (409 if stale)",
        m.LeaseRef,
        m.Ok,
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


def _error(
    status: int, code: str, message: str, fields: dict[str, Any] | None = None
) -> web.Response:
    body = m.ErrorBody(error=code, message=message, fields=fields or {})
    return web.Response(status=status, body=body.model_dump_json(), content_type="application/json")


def _bearer(r: web.Request) -> str:
    h = r.headers.get("Authorization", "")
    scheme, _, token = h.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send Authorization: Bearer <token>")
    return token.strip()


def _validation_fields(e: ValidationError) -> dict[str, Any]:
    return {
        "errors": [
            {"loc": [str(x) for x in err["loc"]], "msg": err["msg"], "type": err["type"]}
            for err in e.errors(include_url=False, include_input=False, include_context=False)[
                :MAX_ERRORS
            ]
        ]
    }


def _parse_body(model: type[m.Api], raw: bytes) -> m.Api:
    """The body as `model`, strictly: "5" or true is not an integer, 1 is not a string.

    JSON-mode strict validation still takes enum values as their strings.  Text
    pydantic's parser refuses is parsed again by Python's to say why (400), and
    text only Python's accepts (a lone surrogate) is validated from its value.
    """
    text = raw if raw.strip() else b"{}"
    try:
        return model.model_validate_json(text, strict=True)
    except ValidationError as exc:
        if not any(e["type"] == "json_invalid" for e in exc.errors()):
            raise ValidationFailed(
                f"{exc.error_count()} error(s) in the body", **_validation_fields(exc)
            ) from exc
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc2:
            raise InvalidRequest(f"body is not valid JSON: {exc2}") from exc2
        except RecursionError as exc2:
            raise InvalidRequest("body is nested too deeply") from exc2
        try:
            model.model_validate(data)
        except ValidationError as exc2:
            exc = exc2
        raise ValidationFailed(
            f"{exc.error_count()} error(s) in the body", **_validation_fields(exc)
        ) from exc


async def _read_body(r: web.Request, cap: int, timeout: float) -> bytes:
    """The request body, refused (413) past `cap` bytes and (408) past `timeout` seconds."""
    if r.content_length is not None and r.content_length > cap:
        raise PayloadTooLarge(f"limit is {cap} bytes")
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await r.content.readany():
                size += len(chunk)
                if size > cap:
                    raise PayloadTooLarge(f"limit is {cap} bytes")
                parts.append(chunk)
    except TimeoutError as exc:
        raise RequestTimeout(f"body not received within {timeout:g} s") from exc
    return b"".join(parts)


def _dispatch(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(r: web.Request) -> web.StreamResponse:
        oss = r.app[OSS_KEY]
        who: Caller = None
        if route.scope in ("account", "admin"):
            who = await oss.authenticate(_bearer(r))
            if route.scope == "admin" and not who.admin:
                raise Forbidden("admin account required")
        elif route.scope == "agent":
            who = await oss.authenticate_instance(_bearer(r), None)
        body: Any = None
        if route.body is not None:
            # Read only now, after the token checked out, and never more than the cap.
            cap = oss.config.max_body_bytes if route.big_body else SMALL_BODY
            raw = await _read_body(r, cap, r.app[LIMITS_KEY].body_timeout)
            if len(raw) <= INLINE_BODY:
                body = _parse_body(route.body, raw)
            else:  # a big body takes milliseconds to validate: not on the loop
                body = await asyncio.to_thread(_parse_body, route.body, raw)
        try:
            query = route.query.model_validate(dict(r.query))
        except ValidationError as exc:
            raise ValidationFailed(
                f"{exc.error_count()} error(s) in the query", **_validation_fields(exc)
            ) from exc
        out = await route.handler(oss, r, who, body, query)
        if isinstance(out, web.StreamResponse):
            return out
        if isinstance(out, BaseModel):
            text = out.model_dump_json()
        else:
            text = "[" + ",".join(x.model_dump_json() for x in out) + "]"
        return web.Response(text=text, content_type="application/json")

    return handle


@web.middleware
async def _errors(request: web.Request, handler: AioHandler) -> web.StreamResponse:
    t0 = time.perf_counter()
    route = (
        request.match_info.route.resource.canonical
        if request.match_info.route.resource
        else "unmatched"
    )
    try:
        return await handler(request)
    except OssError as exc:
        resp = _error(status_of(exc), exc.code, exc.message, _jsonable(exc.fields))
        if not request.content.at_eof():
            # A refused body is not drained: close rather than read what nobody wants.
            resp.force_close()
        return resp
    except web.HTTPRequestEntityTooLarge as exc:
        return _error(413, PayloadTooLarge.code, f"{PayloadTooLarge().message}: {exc.text}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, "http_error", exc.reason)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "internal", "internal error (a bug: see the OSS log)")
    finally:
        request.app[OSS_KEY].metrics.observe_api(route, time.perf_counter() - t0)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(d)
        return d
    except (TypeError, ValueError):
        return {k: str(v) for k, v in d.items()}


def make_app(
    oss: Oss, *, manage: bool = True, limits: ListenerLimits | None = None
) -> web.Application:
    """The aiohttp application; with `manage`, it starts and closes `oss` with the app."""
    app = web.Application(client_max_size=oss.config.max_body_bytes, middlewares=[_errors])
    app[OSS_KEY] = oss
    app[LIMITS_KEY] = limits or ListenerLimits()
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _dispatch(route))
    if manage:

        async def lifecycle(app: web.Application) -> Any:
            await oss.start()
            yield
            await oss.close()

        app.cleanup_ctx.append(lifecycle)
    return app


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document, generated from the route table and the models."""
    models: list[type[BaseModel]] = [m.ErrorBody]
    for rt in ROUTES:
        for x in (rt.body, rt.response):
            if x is not None and x not in models:
                models.append(x)
    keyed, top = models_json_schema(
        [(x, "validation") for x in models], ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    ref = {x: keyed[(x, "validation")] for x in models}
    paths: dict[str, Any] = {}
    for rt in ROUTES:
        op: dict[str, Any] = {
            "summary": rt.summary,
            "operationId": rt.method.lower()
            + re.sub(r"[^a-z0-9]+", "_", rt.path.lower()).rstrip("_"),
            "x-scope": rt.scope,
            "responses": {
                "default": {
                    "description": "error",
                    "content": {"application/json": {"schema": ref[m.ErrorBody]}},
                }
            },
        }
        if rt.response is not None:
            schema = ref[rt.response]
            if rt.many:
                schema = {"type": "array", "items": schema}
            op["responses"]["200"] = {
                "description": "ok",
                "content": {"application/json": {"schema": schema}},
            }
        else:
            op["responses"]["200"] = {"description": "ok", "content": {rt.content_type: {}}}
        if rt.scope != "public":
            op["security"] = [{"bearer": []}]
        params: list[dict[str, Any]] = [
            {"name": seg[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for seg in rt.path.split("/")
            if seg.startswith("{")
        ]
        qschema = rt.query.model_json_schema()
        for name, prop in qschema.get("properties", {}).items():
            params.append({"name": name, "in": "query", "required": False, "schema": prop})
        if params:
            op["parameters"] = params
        if rt.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref[rt.body]}},
            }
        paths.setdefault(rt.path, {})[rt.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "DCP operating system service", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
