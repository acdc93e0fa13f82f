"""The compute service's HTTP routes: programs and their placements, default policies,
instances, instance types, pools, agent registration and heartbeats.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from aiohttp import web
from pydantic import Field

from oss import models as m
from oss.api import PROGRAM_PATH, Route, principal
from oss.compute.pool import InstanceType
from oss.errors import Unauthorized
from oss.service import Oss

# Program id -> (the dict a model was built from, the model): a program read again
# unchanged (a page of programs, an inspect) reuses its model; building one costs
# ~50 us, comparing two dicts ~2 us (issue 15).  Any change to the dict misses.
_MODELS: dict[str, tuple[dict[str, Any], m.Program]] = {}
MODEL_CACHE = 4096  # programs


def program_model(p: dict[str, Any]) -> m.Program:
    """The API model of a program as the store gave it (`p` must not change after)."""
    hit = _MODELS.get(p["id"])
    if hit is not None and hit[0] == p:
        return hit[1]
    model = m.Program(**p)
    if len(_MODELS) >= MODEL_CACHE:
        _MODELS.clear()
    _MODELS[p["id"]] = (p, model)
    return model


class ProgramQuery(m.Api):
    """Filters for listing programs."""

    state: m.ProgramState | None = None
    limit: int = Field(100, ge=1, le=10_000)


async def h_get_policies(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Policies:
    return m.Policies.model_validate(await oss.programs.get_policies(principal(who).account_id))


async def h_put_policies(oss: Oss, r: web.Request, who: Any, b: m.Policies, q: Any) -> m.Policies:
    await oss.programs.set_policies(principal(who).account_id, b.model_dump(mode="json"))
    return b


async def h_submit(oss: Oss, r: web.Request, who: Any, b: m.ProgramSubmit, q: Any) -> m.Program:
    return m.Program(**await oss.submit(principal(who), b))


async def h_programs(
    oss: Oss, r: web.Request, who: Any, b: Any, q: ProgramQuery
) -> list[m.Program]:
    return [
        program_model(p)
        for p in await oss.programs.programs(principal(who).account_id, q.state, q.limit)
    ]


async def h_program(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Program:
    prog = await oss.programs.program(principal(who).account_id, r.match_info["program_id"])
    if oss.network is not None:  # issue 13
        prog = dict(prog, address=await oss.network.address_ever(prog["id"]))
    return program_model(prog)


async def h_cancel(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Program:
    return m.Program(**await oss.cancel(principal(who), r.match_info["program_id"]))


async def h_resume(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Program:
    return m.Program(**await oss.resume(principal(who), r.match_info["program_id"]))


async def h_finish(oss: Oss, r: web.Request, who: Any, b: m.ProgramFinish, q: Any) -> m.Program:
    return m.Program(
        **await oss.finish(principal(who), r.match_info["program_id"], b.exit_status, b.signal)
    )


async def h_place(
    oss: Oss, r: web.Request, who: Any, b: m.PlacementRequest, q: Any
) -> m.PlacementResult:
    pid = r.match_info["program_id"]
    await oss.may_exec_as(principal(who).account_id, b.exec_as)
    got = await oss.place(principal(who).account_id, pid, b.processes, b.avoid)
    grants = [m.ExecGrant(**g) for g in await oss.exec_grants(got, b.exec_as, pid)]
    return m.PlacementResult(
        program_id=pid, assignments=[m.Placement(**a) for a in got], exec_grants=grants
    )


async def h_release(oss: Oss, r: web.Request, who: Any, b: m.ReleaseRequest, q: Any) -> m.Ok:
    await oss.programs.release(
        principal(who).account_id, r.match_info["program_id"], b.instance, b.processes
    )
    return m.Ok()


async def h_put_type(
    oss: Oss, r: web.Request, who: Any, b: m.InstanceTypeBody, q: Any
) -> m.InstanceTypeBody:
    await oss.instances.put_instance_type(
        InstanceType(b.name, b.cpus, b.memory_mb, b.price_micros_per_s, b.storage, b.speed)
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
            speed=t.speed,
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


def _instance(oss: Oss, row: dict[str, Any]) -> m.Instance:
    """An instance row with its last load and heartbeat (held in memory)."""
    return m.Instance(**row, load=oss.metrics.load(row["name"]), seen=oss.seen(row["name"]))


async def h_instances(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> list[m.Instance]:
    p = principal(who)
    return [
        _instance(oss, i) for i in await oss.instances.instances(None if p.admin else p.account_id)
    ]


async def h_instance(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Instance:
    p = principal(who)
    rows = await oss.instances.instances(
        None if p.admin else p.account_id, r.match_info["instance"]
    )
    return _instance(oss, rows[0])


async def h_register(
    oss: Oss, r: web.Request, who: Any, b: m.AgentRegister, q: Any
) -> m.AgentRegistered:
    if b.instance != who:
        raise Unauthorized("token does not belong to this instance")
    await oss.register(b, r.remote)
    # Stop orders ride on heartbeat replies: an agent beats at least once a tick.
    interval = min(oss.config.heartbeat_interval, oss.config.tick)
    return m.AgentRegistered(instance=b.instance, heartbeat_interval=interval)


async def h_heartbeat(
    oss: Oss, r: web.Request, who: Any, b: m.AgentHeartbeat, q: Any
) -> m.HeartbeatReply:
    if b.instance != who:
        raise Unauthorized("token does not belong to this instance")
    commands = oss.heartbeat(b)
    return m.HeartbeatReply(
        commands=[
            m.AgentCommand(
                id=c.id,
                program=c.program,
                action=c.action,
                reason=c.reason,
                tickets=list(c.tickets),
                pid=c.pid if c.action in ("migrate", "signal") else None,
                to=c.to if c.action == "migrate" else None,
                address=c.address if c.action == "migrate" else None,
                state=c.state if c.action == "network" else None,
                signal=c.signal if c.action == "signal" else None,
                thread=True if c.action == "signal" and c.thread else None,
                sender=c.sender if c.action == "signal" and c.sender else None,
                checkpoint=True if c.checkpoint else None,
                storage=dict(c.storage) if c.storage is not None else None,
                every=c.every if c.action == "checkpoint" else None,
                session=c.session if c.action == "restore" else None,
            )
            for c in commands
        ]
    )


async def h_agent_place(
    oss: Oss, r: web.Request, who: Any, b: m.AgentPlacementRequest, q: Any
) -> m.PlacementResult:
    """An instance places one exec of a program it runs (issue 10, recursive placement).

    Only for a program with processes on the asking instance (404 otherwise),
    by the program's own placement policy, the asker last among equals; the
    grant's ticket binds the exec, its ids (the owner account may use them),
    the program and its view, exactly as a placement asked from home.
    """
    pid = r.match_info["program_id"]
    account = await oss.programs.placed_on(pid, str(who))
    await oss.may_exec_as(account, b.exec_as)
    chosen = await oss.place(account, pid, b.processes, [*b.avoid, str(who)][:64])
    got = await _where_storage_is(oss, account, pid, chosen)
    grants = [m.ExecGrant(**g) for g in await oss.exec_grants(got, b.exec_as, pid)]
    where = ", ".join(a["instance"] for a in got)
    if got:
        said = f"runs its exec on {where}"
    elif chosen:
        said = "runs its exec there (the instance chosen mounts the program's storage first)"
    else:
        said = "runs its exec there (no instance given)"
    await oss.program_log(pid, f"placed: pid {b.parent_pid} on {who} {said}")
    return m.PlacementResult(
        program_id=pid, assignments=[m.Placement(**a) for a in got], exec_grants=grants
    )


async def _where_storage_is(
    oss: Oss, account: str, pid: str, got: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Issue 14: a program with storage places recursively only where it is mounted
    (a mount takes longer than an agent waits); the rest is given back, and the exec
    runs on the asking instance, which has it.  The instance chosen but not mounted
    starts mounting now (`mount_soon`), so the program's next execs can go there."""
    mounted = await oss.storage.mounts(pid)
    if mounted is None:
        return got
    for a in got:
        if a["instance"] not in mounted:
            await oss.programs.release(account, pid, a["instance"], a["processes"])
            oss.storage.mount_soon(pid, a["instance"], partial(oss.program_log, pid))
    return [a for a in got if a["instance"] in mounted]


async def h_agent_release(oss: Oss, r: web.Request, who: Any, b: m.ReleaseRequest, q: Any) -> m.Ok:
    """A process an instance placed ended: its slot is free (404 unless the program runs there)."""
    pid = r.match_info["program_id"]
    account = await oss.programs.placed_on(pid, str(who))
    await oss.programs.release(account, pid, b.instance, b.processes)
    return m.Ok()


async def h_migrate(
    oss: Oss, r: web.Request, who: Any, b: m.MigrateRequest, q: Any
) -> m.MigrateResult:
    program_id = r.match_info["program_id"]
    moved = await oss.migrate(principal(who), program_id, b.to, b.pid)
    return m.MigrateResult(program=program_id, moved=[m.Migration(**x) for x in moved])


async def h_drain(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.DrainResult:
    done = await oss.drain(r.match_info["instance"])
    return m.DrainResult(
        instance=done["instance"],
        moved=[m.Migration(**x) for x in done["moved"]],
        refused=done["refused"],
        state=done["state"],
    )


async def h_agent_migration_ticket(
    oss: Oss, r: web.Request, who: Any, b: m.MigrationTicketRequest, q: Any
) -> m.MigrationTicket:
    return m.MigrationTicket(ticket=await oss.migration_ticket(str(who), b))


async def h_agent_migration_outcome(
    oss: Oss, r: web.Request, who: Any, b: m.MigrationOutcome, q: Any
) -> m.Ok:
    await oss.migration_outcome(str(who), b)
    return m.Ok()


P = PROGRAM_PATH
ROUTES: tuple[Route, ...] = (
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
        P + "/resume",
        h_resume,
        "account",
        "Continue a program suspended at its hard budget",
        response=m.Program,
    ),
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
        P + "/migrate",
        h_migrate,
        "account",
        "Move a running process tree of the program to another instance",
        m.MigrateRequest,
        m.MigrateResult,
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
        "POST",
        "/v1/instances/{instance}/drain",
        h_drain,
        "admin",
        "Move every program off an instance, then release it",
        response=m.DrainResult,
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
        "/v1/agents/programs/{program_id}/placements",
        h_agent_place,
        "agent",
        "Place an exec of a program the instance runs",
        m.AgentPlacementRequest,
        m.PlacementResult,
    ),
    Route(
        "POST",
        "/v1/agents/programs/{program_id}/release",
        h_agent_release,
        "agent",
        "A process the instance placed ended",
        m.ReleaseRequest,
        m.Ok,
    ),
    Route(
        "POST",
        "/v1/agents/migrations/ticket",
        h_agent_migration_ticket,
        "agent",
        "The ticket for a migrate command this instance was given",
        m.MigrationTicketRequest,
        m.MigrationTicket,
    ),
    Route(
        "POST",
        "/v1/agents/migrations/outcome",
        h_agent_migration_outcome,
        "agent",
        "The outcome of a migrate command this instance was given",
        m.MigrationOutcome,
        m.Ok,
    ),
    Route(
        "POST",
        "/v1/agents/heartbeat",
        h_heartbeat,
        "agent",
        "Agent heartbeat (the reply carries this instance's commands)",
        m.AgentHeartbeat,
        m.HeartbeatReply,
    ),
)
