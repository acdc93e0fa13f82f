"""`dcp-oss programs|instances|pools|migrate|drain`: the compute service's commands
against a running OSS (connection, output and exit codes: oss.console)."""

from __future__ import annotations

import time

import click

from oss import console as con
from oss import models as m

MIGRATE_WAIT = 150.0  # s: the OSS waits up to 60 s per session; a drain moves several
STATES = [
    "pending",
    "running",
    "recovering",
    "finished",
    "failed",
    "cancelled",
    "stopped_budget",
    "stopped_limit",
    "suspended",
]


def _argv(p: m.Program, width: int = 50) -> str:
    text = " ".join(p.argv)
    return text if len(text) <= width else text[: width - 3] + "..."


def _where(p: m.Program) -> str:
    return ",".join(f"{x.instance}:{x.processes}" for x in p.placements) or "-"


def _end(p: m.Program) -> str:
    if p.signal is not None:
        return f"signal {p.signal}"
    return "-" if p.exit_status is None else str(p.exit_status)


# -- programs ------------------------------------------------------------------------


@click.group()
def programs() -> None:
    """List, inspect and cancel the account's programs.

    \b
    Example:
      export DCP_OSS=http://127.0.0.1:8470 DCP_TOKEN_FILE=~/.dcp/token
      dcp-oss programs list --state running
    """


@programs.command("list")
@click.option("--state", type=click.Choice(STATES), default=None, help="Only this state.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@con.connection()
def programs_list(state: str | None, limit: int, target: con.Target) -> None:
    """The account's programs, newest first (like squeue).

    Columns: ID STATE PROCS LOST INSTANCES (name:processes now) SPENT AGE EXIT ARGV.
    --json: a list of Program.

    \b
    Example:
      dcp-oss programs list --state running --limit 20
    """

    async def go() -> list[m.Program]:
        async with target.client() as oss:
            return await oss.programs(state, limit)  # type: ignore[no-any-return]

    got = con.run(go())
    if target.json:
        return con.emit_json(got)
    now = time.time()
    con.table(
        ["ID", "STATE", "PROCS", "LOST", "INSTANCES", "SPENT", "AGE", "EXIT", "ARGV"],
        [
            [
                p.id, p.state, p.processes, p.lost_processes, _where(p),
                con.money(p.spent_micros), con.age(p.created, now), _end(p), _argv(p),
            ]
            for p in got
        ],
    )  # fmt: skip


@programs.command("show")
@click.argument("program")
@con.connection()
def programs_show(program: str, target: con.Target) -> None:
    """PROGRAM in detail, with each of its processes and where it runs (like scontrol show).

    --json: {"program": Program, "processes": ProcessList}.

    \b
    Example:
      dcp-oss programs show p-3f2a9c
    """

    async def go() -> tuple[m.Program, m.ProcessList]:
        async with target.client() as oss:
            return await oss.program(program), await oss.processes(program)

    prog, procs = con.run(go())
    if target.json:
        return con.emit_json(
            {
                "program": prog.model_dump(mode="json"),
                "processes": procs.model_dump(mode="json"),
            }
        )
    con.fields(
        [
            ("id", prog.id),
            ("state", prog.state + (f" ({prog.status_reason})" if prog.status_reason else "")),
            ("argv", " ".join(prog.argv)),
            ("cwd", prog.cwd),
            ("user", prog.user_id),
            ("created", con.when(prog.created)),
            ("updated", con.when(prog.updated)),
            ("processes", f"{prog.processes} ({prog.lost_processes} lost)"),
            ("placements", _where(prog)),
            ("exit", _end(prog)),
            ("spent", con.money(prog.spent_micros)),
            ("address", prog.address),
            ("stopped by", None if prog.stop is None else f"{prog.stop.level} {prog.stop.resource}"
             f" limit {prog.stop.limit}, was {prog.stop.value}"),
        ]
    )  # fmt: skip
    if procs.processes:
        click.echo("")
        con.table(
            ["INSTANCE", "PID", "PARENT", "STATE", "STARTED", "ENDED", "EXIT", "CPU_S", "ARGV"],
            [
                [
                    x.instance, x.pid, x.parent,
                    x.state + (f"->{x.moved_to}" if x.moved_to else ""),
                    con.when(x.started), con.when(x.ended),
                    f"signal {x.signal}" if x.signal else x.exit_status,
                    f"{x.cpu_seconds:.2f}", " ".join(x.argv)[:60],
                ]
                for x in procs.processes
            ],
        )  # fmt: skip
    moves = [x for x in procs.processes if x.moved_to]
    if moves:  # issue 12: each migration, and why (the optimizer's reason, or who asked)
        click.echo("\nmigrations:")
        for x in moves:
            frozen = "" if x.freeze_ms is None else f", frozen {x.freeze_ms:.0f} ms"
            click.echo(
                f"  pid {x.pid}: {x.instance} -> {x.moved_to} at {con.when(x.ended)}{frozen}"
                + (f": {x.move_reason}" if x.move_reason else "")
            )


@programs.command("cancel")
@click.argument("program_ids", metavar="PROGRAM...", nargs=-1, required=True)
@con.connection()
def programs_cancel(program_ids: tuple[str, ...], target: con.Target) -> None:
    """Cancel each PROGRAM (its processes are stopped where they run), like scancel.

    Exit 1 if any could not be cancelled (one line each).  --json: a list of Program.

    \b
    Example:
      dcp-oss programs cancel p-3f2a9c p-77b01d
    """

    async def go() -> tuple[list[m.Program], list[str]]:
        from oss.client import Unreachable
        from oss.errors import OssError

        done, failed = [], []
        async with target.client() as oss:
            for pid in program_ids:
                try:
                    done.append(await oss.cancel(pid))
                except Unreachable:
                    raise
                except OssError as exc:
                    failed.append(f"{pid}: {exc}")
        return done, failed

    done, failed = con.run(go())
    if target.json:
        con.emit_json(done)
    else:
        for p in done:
            click.echo(f"{p.id}: {p.state}")
    for line in failed:
        click.echo(f"{con.command_name()}: {line}", err=True)
    if failed:
        raise SystemExit(con.EXIT_REFUSED)


# -- instances -----------------------------------------------------------------------


@click.group()
def instances() -> None:
    """The instances the account's programs run on (an admin sees all), like virsh list.

    \b
    Example:
      dcp-oss instances list
    """


@instances.command("list")
@click.option("--state", type=click.Choice(["pending", "ready", "failed", "destroyed"]))
@con.connection()
def instances_list(state: str | None, target: con.Target) -> None:
    """Instances: NAME STATE POOL CPUS MEM_MB SLOTS (used/all) CPU% RUNQ (their last load)
    HEARTBEAT (how long ago) ADDRESS.

    --json: a list of Instance.

    \b
    Example:
      dcp-oss instances list --state ready
    """

    async def go() -> list[m.Instance]:
        async with target.client() as oss:
            return await oss.instances()  # type: ignore[no-any-return]

    got = [i for i in con.run(go()) if state is None or i.state == state]
    if target.json:
        return con.emit_json(got)
    now = time.time()
    con.table(
        ["NAME", "STATE", "POOL", "CPUS", "MEM_MB", "SLOTS", "CPU%", "RUNQ", "HEARTBEAT",
         "ADDRESS"],
        [
            [
                i.name, i.state, i.pool, i.cpus, i.memory_mb, f"{i.used_slots}/{i.slots}",
                None if i.load is None else f"{i.load.cpu_percent:.0f}",
                None if i.load is None else f"{i.load.runqueue:.1f}",
                con.age(i.seen or i.last_heartbeat, now), i.address,
            ]
            for i in got
        ],
    )  # fmt: skip


@instances.command("show")
@click.argument("name")
@con.connection()
def instances_show(name: str, target: con.Target) -> None:
    """Instance NAME in detail.  --json: Instance.

    \b
    Example:
      dcp-oss instances show vm1
    """

    async def go() -> m.Instance:
        async with target.client() as oss:
            return await oss.instance(name)  # type: ignore[no-any-return]

    i = con.run(go())
    if target.json:
        return con.emit_json(i)
    con.fields(
        [
            ("name", i.name),
            ("state", i.state),
            ("pool", i.pool),
            ("type", i.instance_type),
            ("address", i.address),
            ("hostname", i.hostname),
            ("cpus", i.cpus),
            ("memory", f"{i.memory_mb} MB"),
            ("slots", f"{i.used_slots} used of {i.slots}"),
            ("dedicated", "yes" if i.dedicated else "no"),
            ("price", f"{con.money(i.price_micros_per_s)} per s"),
            ("cpu speed", None if i.speed is None else f"{i.speed:.2f} (measured)"),
            ("load", None if i.load is None else
             f"cpu {i.load.cpu_percent:.1f}%, runqueue {i.load.runqueue:.2f}, "
             f"{i.load.memory_used_mb} MB used, {i.load.processes} processes"),
            ("heartbeat", None if (i.seen or i.last_heartbeat) is None else
             f"{con.when(i.seen or i.last_heartbeat)} ({con.age(i.seen or i.last_heartbeat)} ago)"),
        ]
    )  # fmt: skip


# -- pools ---------------------------------------------------------------------------


@click.group()
def pools() -> None:
    """Pools of instances of one type: list them, create or resize one (admin).

    \b
    Example:
      dcp-oss pools set small --type t2 --warm 2 --max 20
    """


@pools.command("list")
@con.connection()
def pools_list(target: con.Target) -> None:
    """Pools: NAME TYPE CPUS MEM_MB PRICE WARM MAX LIVE IDLE PROVIDER.  --json: a list of Pool.

    \b
    Example:
      dcp-oss pools list --json
    """

    async def go() -> list[m.Pool]:
        async with target.client() as oss:
            return await oss.pools()  # type: ignore[no-any-return]

    got = con.run(go())
    if target.json:
        return con.emit_json(got)
    con.table(
        ["NAME", "TYPE", "CPUS", "MEM_MB", "PRICE/S", "WARM", "MAX", "LIVE", "IDLE", "PROVIDER"],
        [
            [
                p.name, p.instance_type.name, p.instance_type.cpus, p.instance_type.memory_mb,
                con.money(p.instance_type.price_micros_per_s), p.warm_target, p.max_size,
                p.live, p.idle, p.provider,
            ]
            for p in got
        ],
    )  # fmt: skip


@pools.command("set")
@click.argument("name")
@click.option("--type", "itype", default=None, help="Instance type (default: the pool's).")
@click.option("--warm", type=click.IntRange(0, 100_000), default=None, help="Idle instances kept.")
@click.option("--max", "max_size", type=click.IntRange(0, 100_000), default=None, help="Cap.")
@click.option("--provider", default=None, help="Provider name (default: the pool's, or local).")
@con.connection()
def pools_set(
    name: str,
    itype: str | None,
    warm: int | None,
    max_size: int | None,
    provider: str | None,
    target: con.Target,
) -> None:
    """Create pool NAME or change it (admin token); unset options keep the pool's values.

    --json: Pool.

    \b
    Example:
      dcp-oss pools set small --type t2 --warm 2 --max 20
    """
    from oss.errors import NotFound

    async def go() -> m.Pool:
        async with target.client() as oss:
            try:
                old: m.Pool | None = m.Pool.model_validate(
                    await oss.request("GET", f"/v1/pools/{name}")
                )
            except NotFound:
                old = None
            if old is None and itype is None:
                con.fail(f"pool {name} does not exist: give its --type to create it")
            assert old is not None or itype is not None
            body = m.PoolCreate(
                name=name,
                instance_type=itype or old.instance_type.name,  # type: ignore[union-attr]
                warm_target=warm if warm is not None else (old.warm_target if old else 0),
                max_size=max_size if max_size is not None else (old.max_size if old else 1000),
                provider=provider or (old.provider if old else "local"),
            )
            return await oss.put_pool(body)  # type: ignore[no-any-return]

    try:
        p = con.run(go())
    except ValueError as exc:  # pydantic: a bad name
        raise click.BadParameter(str(exc).splitlines()[0]) from exc
    if target.json:
        return con.emit_json(p)
    click.echo(
        f"pool {p.name}: type {p.instance_type.name}, warm {p.warm_target}, max {p.max_size}, "
        f"provider {p.provider} ({p.live} live, {p.idle} idle)"
    )


# -- resume (issue 12) ---------------------------------------------------------------------


@click.command("resume")
@click.argument("program")
@con.connection()
def resume(program: str, target: con.Target) -> None:
    """Continue PROGRAM, suspended (checkpointed) at its hard budget.

    Raise the budget first (`dcp-oss limits set`): while it is still reached this is
    one line and the program stays suspended.  Each instance holding it restores its
    processes; its dcptrace gets the output and the exit status.  --json: Program.

    \b
    Example:
      dcp-oss limits set --program p-3f2a9c --hard-budget 5000000
      dcp-oss resume p-3f2a9c
    """

    async def go() -> m.Program:
        async with target.client() as oss:
            return await oss.resume(program)

    prog = con.run(go())
    if target.json:
        return con.emit_json(prog)
    click.echo(f"{prog.id}: {prog.state} ({prog.status_reason})")


# -- migrate, drain (long: progress on stderr, one summary line) ---------------------------


@click.command("migrate")
@click.argument("program")
@click.option("--to", "to", required=True, help="The instance to move to.")
@click.option("--pid", type=click.IntRange(1, 2**31), default=None, help="A process of the tree.")
@con.connection()
def migrate(program: str, to: str, pid: int | None, target: con.Target) -> None:
    """Move a running process tree of PROGRAM (every one without --pid) to instance --to.

    The program keeps its pids, output and exit status; a failed move leaves it running
    where it was.  Progress (elapsed time) on stderr, a line per moved session and one
    summary line on stdout.  --json: MigrateResult.

    \b
    Example:
      dcp-oss migrate p-3f2a9c --to vm2
    """

    async def go() -> tuple[m.MigrateResult, float]:
        async with target.client(MIGRATE_WAIT) as oss:
            return await con.with_progress(
                f"moving {program} to {to}", oss.migrate(program, to, pid)
            )

    done, took = con.run(go())
    if target.json:
        return con.emit_json(done)
    for x in done.moved:
        click.echo(f"pid {x.pid}: {x.source} -> {x.target}, frozen {x.freeze_ms:.0f} ms")
    frozen = max((x.freeze_ms for x in done.moved), default=0.0)
    click.echo(
        f"{program}: moved {len(done.moved)} session(s) to {to} in {took:.1f} s"
        f" (longest freeze {frozen:.0f} ms)"
    )


@click.command("drain")
@click.argument("instance")
@con.connection()
def drain(instance: str, target: con.Target) -> None:
    """Move every program off INSTANCE, then release it (admin token).

    What cannot move stays where it runs, one line each on stderr (exit 1), and the
    instance with it.  Progress on stderr, one summary line.  --json: DrainResult.

    \b
    Example:
      dcp-oss drain vm3
    """

    async def go() -> tuple[m.DrainResult, float]:
        async with target.client(MIGRATE_WAIT) as oss:
            return await con.with_progress(f"draining {instance}", oss.drain(instance))

    done, took = con.run(go())
    if target.json:
        con.emit_json(done)
    else:
        for x in done.moved:
            click.echo(f"{instance}: pid {x.pid} -> {x.target}, frozen {x.freeze_ms:.0f} ms")
    for line in done.refused:
        click.echo(f"{con.command_name()}: {instance}: cannot move {line}", err=True)
    if not target.json:
        click.echo(
            f"{instance}: {done.state}: moved {len(done.moved)} session(s), "
            f"{len(done.refused)} refused, in {took:.1f} s"
        )
    if done.refused:
        raise SystemExit(con.EXIT_REFUSED)
