"""The OSS core: wires the repositories, the decision modules and the background loops.

`Oss` is what the HTTP server (oss.server) and an embedded user call.  It owns
its background tasks (one TaskGroup, cancelled and awaited by `close`).  Every
`tick` seconds it: persists heartbeats, fails silent instances (availability),
meters running programs (pricing), retries pending/recovering placements,
runs the optimizer and flushes the OSS log; a second loop reconciles pools (pool
manager) so slow providers never delay the duties.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oss.accounts.store import Accounts, Principal, hash_token
from oss.billing.pricing import Rates
from oss.billing.store import Billing, BudgetCheck
from oss.compute import availability, exectickets, migrations, movers, optimizer
from oss.compute.commands import Command, CommandQueue
from oss.compute.failover import CheckpointStore, Failover
from oss.compute.instances import Instances
from oss.compute.moving import Mover
from oss.compute.pool import InstanceType, PoolDemand, PoolState, Provider
from oss.compute.pools import PoolManager
from oss.compute.programs import Programs
from oss.db.store import Store
from oss.errors import (
    Conflict,
    Forbidden,
    MigrationFailed,
    NoCapacity,
    NotFound,
    OssError,
    Unauthorized,
)
from oss.ipc.locking import LockService
from oss.models import (
    AgentHeartbeat,
    AgentRegister,
    AgentReport,
    ExecIdentity,
    Load,
    MigrationOutcome,
    MigrationTicketRequest,
    Policies,
    ProcessList,
    ProgramSubmit,
    ReportAck,
)
from oss.network.manager import Applier, NetworkConfig, NetworkManager
from oss.network.unixpaths import UnixPaths
from oss.schema import VERSIONS
from oss.storage.relay import SqlSpecs, StorageNotMounted, StorageRelay
from oss.telemetry import logs as logmod
from oss.telemetry.metrics import MetricsCollector
from oss.telemetry.processes import Processes, measured_counters, process_row, seeded
from oss.telemetry.store import Logs

log = logging.getLogger(__name__)

HEARTBEAT_FLUSH_TICKS = 5  # persist heartbeats every this many ticks
PLACED_REMEMBERED = 3600.0  # seconds an instance may report for a program placed there
PLACED_KEPT = 100_000  # (program, instance) placements remembered for that
FINAL_POLL = 0.05  # seconds between looks while a processes read waits for final rows


class ContextLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes messages with their context: `[program=... instance=...] message`."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        ctx = " ".join(f"{k}={v}" for k, v in (self.extra or {}).items() if v is not None)
        return (f"[{ctx}] {msg}" if ctx else msg), kwargs


@dataclass(frozen=True, slots=True)
class OssConfig:
    """Configuration of one OSS process (validated on construction)."""

    data_dir: Path
    heartbeat_interval: float = 1.0  # what agents are told
    heartbeat_timeout: float = 5.0  # silent longer than this -> failed
    migrate_timeout: float = 60.0  # s a migrate request waits for the source's outcome
    tick: float = 1.0  # period of metering, availability, optimizer, pools
    slots_per_cpu: int = 4  # processes per CPU on an instance
    rates: Rates = field(default_factory=Rates)
    provider_timeout: float = 300.0  # one provider create/destroy call
    public_url: str | None = None  # handed to new instances as their OSS URL
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    follow_poll: float = 0.2  # log follow polling period
    token_cache_seconds: float = 5.0  # how long a verified token is trusted
    idle_grace: float = 30.0  # an idle pool instance beyond the warm target lives this long
    demand_window: float = 10.0  # placements refused for capacity count this long as demand
    backoff_base: float = 1.0  # a failing provider: wait min(base * 2**n, 60 s) after n
    durable: bool = True  # False: no fsync per commit (a store that dies with its run)
    # Issue 12: optimizer moves (oss.compute.movers), decided every `moves_every` seconds.
    move_rules: movers.Rules = field(default_factory=movers.Rules)
    moves_every: float = 2.0

    def __post_init__(self) -> None:
        for name in (
            "heartbeat_interval",
            "heartbeat_timeout",
            "tick",
            "provider_timeout",
            "demand_window",
            "backoff_base",
            "moves_every",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.heartbeat_timeout < self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must be >= heartbeat_interval")
        if self.slots_per_cpu < 1:
            raise ValueError("slots_per_cpu must be >= 1")


class Oss:
    """The operating system service."""

    def __init__(
        self,
        config: OssConfig,
        providers: Mapping[str, Provider] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.store = Store(config.data_dir, VERSIONS, clock, durable=config.durable)
        self.accounts = Accounts(self.store)
        self.instances = Instances(self.store)
        self.programs = Programs(self.store, BudgetCheck())
        self.billing = Billing(self.store)
        self.logs = Logs(self.store)
        self.processes = Processes(self.store)
        self.metrics = MetricsCollector()
        self.locks = LockService(self.store, clock)
        self.pools = PoolManager(
            self.instances,
            providers or {},
            self.oss_log,
            config.provider_timeout,
            config.public_url,
            clock=clock,
            slots_per_cpu=config.slots_per_cpu,
            idle_grace=config.idle_grace,
            backoff_base=config.backoff_base,
            released=self._released,
        )
        # Autoscaling: (time, instance type or None, processes) of placements refused
        # for want of capacity; the pool manager counts those of the last window.
        self._refused: deque[tuple[float, str | None, int]] = deque(maxlen=10_000)
        self._last_seen: dict[str, float] = {}
        self._checkpointing: set[str] = set()  # instances whose CRIU works (issue 12)
        self._beats: dict[str, tuple[float, Load]] = {}  # serialised when flushed
        self._oss_lines: list[logmod.LogLine] = []
        self._event_lines: dict[str, list[logmod.LogLine]] = {}  # program -> placed events
        self._placed_on: dict[tuple[str, str], float] = {}  # (program, instance) -> when
        self._token_cache: dict[str, tuple[Principal, float]] = {}
        self._instance_cache: dict[str, tuple[str, float]] = {}
        self._decided: dict[str, str] = {}
        # Limits act: orders for agents (heartbeat replies).  Ids from the wall clock's ms:
        # past every id an earlier run of this OSS gave the agents (they skip ids seen).
        self.commands = CommandQueue(first=int(time.time() * 1000))
        # Issue 12: periodic checkpoints kept here, restored elsewhere when an instance is lost.
        self.failover = Failover(
            CheckpointStore(config.data_dir / "checkpoints"),
            self.commands,
            self._restore_targets,
            lambda name: name in self._checkpointing,
            self.oss_log,
            self.program_log,
            clock=clock,
            runs_on=lambda prog, inst: self.placed(prog, [{"instance": inst, "processes": 1}]),
            prepare=self._storage_on,
            saved=self.store,  # a restarted OSS reads its policies and index back
        )
        # Issue 12: migrate commands given out (by id) and the requests waiting for them.
        self._moves: dict[int, Command] = {}
        self._outcomes = migrations.Outcomes()
        self._move_reasons: dict[int, str] = {}  # command id -> why it moves (recorded)
        # Optimizer moves (issue 12): profiles from usage samples, decisions each tick.
        self.mover = Mover(self, config.move_rules, config.moves_every)
        # Issue 14: programs' storage on instances (kept in the store: survives a restart).
        self.storage = StorageRelay(self.commands, SqlSpecs(self.store, clock))
        self._runner: asyncio.Task[None] | None = None
        # Issue 13: program addresses and redirects (None: no network prefix configured).
        self.network: NetworkManager | None = None
        self.unix_paths = UnixPaths(self.store)  # issue 13: AF_UNIX paths bound per instance
        self.heartbeats_processed = 0
        self._ticks = 0

    # -- lifecycle -----------------------------------------------------------

    def use_network(self, config: NetworkConfig, applier: Applier) -> None:
        """Give programs addresses from `config.prefix`, redirected by `applier` (before
        `start`; issue 13).  The egress of a program's instances is shaped to the
        tightest bandwidth limit of its account, user and program."""
        from oss.billing.store import bandwidth_cap_kbit

        self.network = NetworkManager(self.store, config, applier, self.clock, bandwidth_cap_kbit)

    def use_vm_network(
        self,
        prefix: ipaddress.IPv4Network,
        bridge: str,
        subnet: ipaddress.IPv4Network,
        gateway: str,
        netns: str | None = None,
    ) -> None:
        """Program addresses for VM instances on `bridge` (this host's, in `netns`; its
        address `gateway` on `subnet`): the host is changed here, each instance through
        `network` commands to its agent (oss.network.vms; issue 13)."""
        from oss.network.plan import HostSpot
        from oss.network.vms import SpotBook, VmApplier

        host = HostSpot("host", bridge)
        spots = SpotBook(host, subnet, gateway)
        loop = asyncio.get_running_loop()

        def send(instance: str, program: str, state: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(self.commands.network, instance, program, state)

        config = NetworkConfig(prefix, spots, {host.name: host})
        self.use_network(config, VmApplier(host.name, netns, spots, send))

    async def start(self) -> None:
        """Open the store and start the background loop."""
        await self.store.open()
        if self.network is not None:
            await self.network.start()
        now = self.clock()
        # After a restart every ready instance gets a full timeout to heartbeat again.
        self._last_seen = {name: now for name in await self.instances.ready_instances()}
        # Issue 12: checkpoint policies, stored checkpoints, restores still to do.
        self._checkpointing |= await self.failover.load(set(self._last_seen))
        await self.unix_paths.load()  # issue 13: the AF_UNIX paths bound before
        await self._seed_metrics()
        self._runner = asyncio.create_task(self._loop(), name="oss-background")
        self.oss_log("oss started")

    async def close(self) -> None:
        """Stop the background loop, flush, close the store."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        await self.mover.close()
        if self.network is not None:
            await self.network.close()
        await self.failover.flush()
        await self.unix_paths.flush()
        await self._flush_all()
        await self.store.close()

    async def _loop(self) -> None:
        # Pools get their own loop: a provider may take minutes to boot a VM, and that must
        # not hold up metering or failure detection.
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._every_tick(self.tick), name="oss-duties")
            tg.create_task(self._every_tick(self._reconcile_pools), name="oss-pools")

    async def _every_tick(self, duty: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self.config.tick)
            await duty()

    async def _reconcile_pools(self) -> None:
        try:
            await self.reconcile_pools()
        except (OssError, OSError) as exc:
            log.error("pool reconcile failed: %s", exc)
        except Exception:
            log.exception("pool reconcile crashed")

    async def reconcile_pools(self) -> None:
        """One pool pass with the demand of now (refused placements, target widths)."""
        rows = await self.programs.demand()
        since = self.clock() - self.config.demand_window
        refused = [(t, n) for ts, t, n in self._refused if ts >= since]

        def demand(state: PoolState, itype: InstanceType) -> PoolDemand:
            def mine(t: str | None) -> bool:
                return t is None or t == itype.name

            return PoolDemand(
                waiting=sum(n for t, n in refused if mine(t))
                + sum(w for t, w, _ in rows if mine(t)),
                wanted_width=sum(w for t, _, w in rows if mine(t)),
            )

        await self.pools.reconcile(demand)

    async def place(
        self, account_id: str, program_id: str, processes: int, avoid: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """Place more processes of a program; a refusal for capacity is demand on the pools."""
        try:
            return await self.programs.place(account_id, program_id, processes, avoid)
        except NoCapacity:
            prog = await self.programs.program(account_id, program_id)
            self._refused.append(
                (self.clock(), prog["resource_policy"].get("instance_type"), processes)
            )
            raise

    async def tick(self) -> None:
        """One pass of every periodic duty; one failing duty does not stop the others."""
        for duty in (
            self._flush,
            self.check_availability,
            self.meter,
            self.retry_waiting,
            self.optimize,
            self.mover.tick,
        ):
            try:
                await duty()
            except (OssError, OSError) as exc:
                log.error("periodic duty %s failed: %s", duty.__name__, exc)
            except Exception:
                # A bug in one duty must not stop metering or failure detection for good.
                log.exception("periodic duty %s crashed", duty.__name__)

    async def _flush(self) -> None:
        await self._flush_logs()
        self._ticks += 1
        # Heartbeats are liveness hints, not acknowledged data: persisting them every few
        # ticks is enough for a restart (which grants every instance a full timeout anyway).
        if self._beats and self._ticks % HEARTBEAT_FLUSH_TICKS == 0:
            await self._persist_beats()

    async def _flush_all(self) -> None:
        await self._flush_logs()
        if self._beats:
            await self._persist_beats()

    async def _persist_beats(self) -> None:
        beats, self._beats = self._beats, {}
        await self.instances.flush_heartbeats(
            {name: (t, load.model_dump_json()) for name, (t, load) in beats.items()}
        )

    async def _flush_logs(self) -> None:
        events, self._event_lines = self._event_lines, {}
        for program_id, lines in events.items():
            try:
                await self.logs.append_logs(None, program_id, lines)
            except OssError as exc:
                log.warning("placement events of %s not logged: %s", program_id, exc)
        if self._oss_lines:
            lines, self._oss_lines = self._oss_lines, []
            await self.logs.append_logs(None, None, lines)

    # -- logs ----------------------------------------------------------------

    def oss_log(self, text: str, instance: str | None = None) -> None:
        """Add a line to the OSS log (written on the next flush)."""
        ContextLog(log, {"instance": instance}).info("%s", text)
        self._oss_lines.append(logmod.LogLine(self.clock(), "log", text, instance))

    async def program_log(self, program_id: str, text: str) -> None:
        """Append an OSS decision line to a program's log."""
        ContextLog(log, {"program": program_id}).debug("%s", text)
        await self.logs.append_logs(None, program_id, [logmod.LogLine(self.clock(), "log", text)])

    # -- auth ----------------------------------------------------------------

    async def authenticate(self, token: str) -> Principal:
        """The caller behind a bearer token (cached briefly; revocation clears the cache)."""
        h = hash_token(token)
        hit = self._token_cache.get(h)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        p = await self.accounts.authenticate(token)
        if len(self._token_cache) > 100_000:
            self._token_cache.clear()
        self._token_cache[h] = (p, now + self.config.token_cache_seconds)
        return p

    def forget_tokens(self) -> None:
        """Drop cached token checks (after a revocation)."""
        self._token_cache.clear()

    async def mint_instance_token(self, name: str, pool: str | None = None) -> str:
        """Create instance `name` (or re-key it) and return its bearer token."""
        token = await self.instances.mint_instance_token(name, pool)
        self._instance_cache.clear()  # a re-key invalidates the old token at once
        return token

    async def authenticate_instance(self, token: str, claimed: str | None) -> str:
        """The instance behind an instance token; 401 if the body names another one.

        Cached like account tokens: a heartbeat then never leaves the event loop.
        """
        h = hash_token(token)
        now = time.monotonic()
        hit = self._instance_cache.get(h)
        if hit is not None and hit[1] > now:
            name = hit[0]
        else:
            name = await self.instances.authenticate_instance(token)
            if len(self._instance_cache) > 100_000:
                self._instance_cache.clear()
            self._instance_cache[h] = (name, now + self.config.token_cache_seconds)
        if claimed is not None and claimed != name:
            raise Unauthorized("token does not belong to this instance")
        return name

    # -- agents --------------------------------------------------------------

    async def may_exec_as(self, account_id: str, exec_as: ExecIdentity | None) -> None:
        """Forbidden unless the account may run processes with these ids.

        uid 0 and gid 0 (also as a supplementary group) need the operator's
        `allow_root` on the account; any other id is the tenant's own business
        on its instances.
        """
        if exec_as is None:
            return
        if 0 in (exec_as.uid, exec_as.gid, *exec_as.groups) and not await self.accounts.allows_root(
            account_id
        ):
            raise Forbidden(
                "this account may not run processes as uid 0 or gid 0 on instances"
                " (an operator can allow it: dcp-oss account create --allow-root)"
            )

    async def register(self, body: AgentRegister, peer: str | None = None) -> None:
        """An agent came up; `peer` is the host it connected from (its advertised address's host).

        The OSS hands out `peer:port`, not the address the body claims: an
        instance token alone cannot point clients at another host.
        """
        address = body.address
        if peer:
            port = body.address.rpartition(":")[2]
            address = f"[{peer}]:{port}" if ":" in peer else f"{peer}:{port}"
        await self.instances.register_instance(
            body.instance,
            address,
            body.hostname,
            body.cpus,
            body.memory_mb,
            self.config.slots_per_cpu,
            body.exec_key,
            body.speed,
        )
        self._last_seen[body.instance] = self.clock()
        if body.checkpoint:
            self._checkpointing.add(body.instance)
        else:
            self._checkpointing.discard(body.instance)
        self.failover.capability(body.instance, bool(body.checkpoint))  # kept over a restart
        self.failover.fence(body.instance)  # issue 12: it was lost; its programs ran on elsewhere
        self.oss_log(
            f"instance {body.instance} registered at {address}"
            + (" (can checkpoint)" if body.checkpoint else "")
            + ("" if body.speed is None else f" (cpu speed {body.speed:.2f})"),
            body.instance,
        )
        if self.network is not None and peer:  # issue 13: where its program addresses go
            self.network.place(body.instance, peer)

    async def exec_grants(
        self,
        assignments: Sequence[Mapping[str, Any]],
        exec_as: ExecIdentity | None,
        program_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """A fresh exec ticket per placed process, for instances whose agent sent an exec key.

        Tickets are bound to `exec_as` (one exec, its uid/gid/groups); without it none
        are minted.  The caller checked that the account may use those ids.
        """
        if program_id is not None:
            self.placed(program_id, assignments)  # telemetry: these instances report for it
        if exec_as is None:
            return []
        if program_id is not None and self.network is not None:
            for a in assignments:  # the program's address is there before its process
                await self.network.join(program_id, a["instance"])
        keys = await self.instances.exec_targets([a["instance"] for a in assignments])
        # Issue 10: each ticket binds the program and the digest of its stored view.
        bound: dict[str, Any] = {}
        if program_id is not None:
            _placement, view = await self.programs.view_of(program_id)
            bound = dict(
                program=program_id,
                view=exectickets.view_digest(
                    view.get("maps", ()),
                    view.get("placement", "spread"),
                    view.get("metering", "exec"),
                    view.get("home", ""),
                ),
            )
        grants = []
        for a in assignments:
            found = keys.get(a["instance"])
            if found is None:
                continue
            address, key = found
            tickets = [
                exectickets.mint(
                    key,
                    a["instance"],
                    uid=exec_as.uid,
                    gid=exec_as.gid,
                    groups=exec_as.groups,
                    digest=exec_as.digest,
                    **bound,
                )
                for _ in range(a["processes"])
            ]
            if program_id is not None:
                self.failover.granted(program_id, [a["instance"]])  # issue 12: its policy
                # The nonce (third field of the public part) finds the session on the agent.
                self.commands.minted(program_id, a["instance"], (t.split(".")[2] for t in tickets))
            grants.append(dict(instance=a["instance"], address=address, tickets=tickets))
        return grants

    def heartbeat(self, body: AgentHeartbeat) -> list[Command]:
        """An agent is alive (kept in memory, persisted each tick); its pending commands."""
        if body.instance not in self._last_seen:
            raise Conflict(
                f"instance {body.instance} is not registered (or failed): register again"
            )
        now = self.clock()
        self._last_seen[body.instance] = now
        self._beats[body.instance] = (now, body.load)
        self.metrics.heartbeat(body.instance, body.load)
        self.heartbeats_processed += 1
        return self.commands.for_instance(body.instance, body.done)

    def can_checkpoint(self, instance: str) -> bool:
        """Did the instance's agent say at registration that its CRIU works (issue 12)?"""
        return instance in self._checkpointing

    def seen(self, instance: str) -> float | None:
        """When the instance's last heartbeat arrived (None: not since the OSS started)."""
        return self._last_seen.get(instance)

    async def check_availability(self) -> list[str]:
        """Fail instances silent past the timeout; mark their programs for recovery."""
        await self.failover.dispatch()  # planned restores waiting for a replacement (issue 12)
        failures = availability.silent(self._last_seen, self.clock(), self.config.heartbeat_timeout)
        if not failures:
            return []
        names = [f.instance for f in failures]
        for n in names:
            self._last_seen.pop(n, None)
            self._beats.pop(n, None)
        reason = f"no heartbeat for over {self.config.heartbeat_timeout:g}s"
        # Issue 12: before the programs say the instance failed, so their homes never
        # call a process lost that is about to be restored from its checkpoint.
        held = {n: await self.programs.instance_programs(n) for n in names}
        self.failover.plan(names, held)
        lost = await self.instances.fail_instances(names, reason)
        silent_for = {f.instance: f.silent_for for f in failures}
        for f in failures:
            self.oss_log(
                f"instance {f.instance} failed: silent for {f.silent_for:.1f}s", f.instance
            )
            self.commands.drop_instance(f.instance)
            await self.storage.forget_instance(f.instance)
            self.unix_paths.lost(f.instance)  # issue 13: its path sockets went with it
        for program, instance, count, by_client in lost:
            then = "its client placed them" if by_client else "marked for recovery"
            await self.program_log(
                program,
                f"instance {instance} lost: {count} process(es) ended"
                f" (silent {silent_for[instance]:.1f} s): {then}",
            )
        await self._lose_processes(failures)
        await self.failover.dispatch()  # issue 12: restores from checkpoints
        # Replacements: failed instances no longer count as live in their pools.
        self.oss_log(f"requesting replacements for {len(names)} failed instance(s)")
        return names

    # -- measured usage (issue 10: telemetry) ----------------------------------

    async def report(self, instance: str, body: AgentReport) -> ReportAck:
        """Apply an agent's telemetry batch: usage into `processes` and the metrics,
        output lines and events into the programs' logs.  A replayed batch is acked, not
        applied again."""
        if body.instance != instance:
            raise Unauthorized("token does not belong to this instance")
        now = self.clock()
        placed = {
            prog
            for prog in {u.program_id for u in body.usage}
            | {ln.program_id for ln in body.logs}
            | {e.program_id for e in body.events}
            if now - self._placed_on.get((prog, instance), -1e18) <= PLACED_REMEMBERED
        }
        done = await self.processes.apply(instance, body, placed)
        if done.fresh:
            self.mover.observe(instance, body, placed)
        for program_id, inst, _pid, delta in done.deltas:
            self.metrics.report(program_id, measured_counters(delta, inst))
        if done.refused:
            self.oss_log(
                f"refused {done.refused} telemetry row(s) of programs not run here", instance
            )
        return ReportAck(acked_seq=done.acked_seq, refused=done.refused)

    def placed(self, program_id: str, assignments: Sequence[Mapping[str, Any]]) -> None:
        """Processes of a program were placed: their instances may report for it (even
        after the placement is released), and the program's log gets `placed` events."""
        now = self.clock()
        for a in assignments:
            self._placed_on[(program_id, a["instance"])] = now
            n = a["processes"]
            self._event_lines.setdefault(program_id, []).append(
                logmod.LogLine(
                    now, "event", f"placed {n} process{'es' if n > 1 else ''}", a["instance"]
                )
            )
        if len(self._placed_on) > PLACED_KEPT:  # forget the oldest half
            keep = sorted(self._placed_on.items(), key=lambda kv: kv[1])[PLACED_KEPT // 2 :]
            self._placed_on = dict(keep)

    async def process_list(
        self, account_id: str, program_id: str, final_wait: float = 0.0, expect: int = 0
    ) -> ProcessList:
        """The program's processes; with `final_wait`, first wait (at most that long)
        until `expect` are recorded and every one has its final figures."""
        deadline = time.monotonic() + final_wait
        while True:
            rows = [process_row(x) for x in await self.processes.processes(account_id, program_id)]
            incomplete = [f"{p.instance}:{p.pid}" for p in rows if p.state == "running"]
            # A moved process goes on as its target's row: until that row is in, the
            # process is still to come (and counts once).
            seen = {(p.instance, p.pid) for p in rows}
            incomplete += [
                f"{p.moved_to}:{p.pid}"
                for p in rows
                if p.state == "migrated" and (p.moved_to, p.pid) not in seen
            ]
            moved = sum(p.state == "migrated" for p in rows)
            done = not incomplete and len(rows) - moved >= expect
            if done or time.monotonic() >= deadline:
                return ProcessList(processes=rows, incomplete=incomplete)
            await asyncio.sleep(FINAL_POLL)

    async def _lose_processes(self, failures: Sequence[availability.Failure]) -> None:
        """The running processes of failed instances are lost: rows and `lost` events."""
        now = self.clock()
        for f in failures:
            for row in await self.processes.lose(f.instance, now):
                argv = " ".join(json.loads(row["argv"]))
                text = (
                    f"lost: pid {row['pid']} ({argv}) on {f.instance}: silent {f.silent_for:.1f} s"
                )
                self._event_lines.setdefault(row["program_id"], []).append(
                    logmod.LogLine(now, "event", text, f.instance, row["pid"])
                )

    async def _seed_metrics(self) -> None:
        """After a restart the collector starts from the durable measured totals."""
        for program_id, inst, totals in seeded(await self.processes.totals()):
            self.metrics.report(program_id, measured_counters(totals, inst))

    # -- programs ------------------------------------------------------------

    async def submit(self, who: Principal, body: ProgramSubmit) -> dict[str, Any]:
        """Create and place a program (account defaults fill missing policies)."""
        defaults = Policies.model_validate(await self.programs.get_policies(who.account_id))
        spec = body.model_dump(mode="json")
        spec["resource_policy"] = (body.resource_policy or defaults.resource_policy).model_dump(
            mode="json"
        )
        spec["scaling_policy"] = (body.scaling_policy or defaults.scaling_policy).model_dump(
            mode="json"
        )
        if spec["scaling_policy"].get("moves") is None:  # issue 12: the account's default
            spec["scaling_policy"]["moves"] = defaults.scaling_policy.moves is not False
        limits = body.limits.model_dump(exclude_none=True) if body.limits else None
        if body.checkpoint_every is not None and not self._checkpointing:
            raise Conflict(
                "checkpoints asked (checkpoint_every) but no instance here has a working CRIU"
            )
        prog = await self.programs.submit(who, spec, limits)
        if body.checkpoint_every is not None:  # issue 12: failover from checkpoints
            self.failover.want(prog["id"], body.checkpoint_every)
        self.placed(prog["id"], prog["placements"])
        await self.program_log(
            prog["id"],
            f"submitted by {who.user_id}: {prog['state']}, placements "
            + (
                ", ".join(f"{p['instance']}x{p['processes']}" for p in prog["placements"]) or "none"
            ),
        )
        return prog

    async def retry_waiting(self) -> None:
        """Place pending and recovering programs where capacity appeared."""
        for pid in await self.programs.retry_waiting():
            await self.program_log(pid, "placed: running")

    async def meter(self) -> None:
        """Per-second metering into billing records; hard budgets stop programs."""
        res = await self.billing.meter(
            self.config.rates, lambda names: set(names) <= self._checkpointing
        )
        for st in res.stopped:
            await self.program_log(st.program_id, st.reason)
            self.oss_log(f"program {st.program_id} {st.reason}")
            if st.suspended:
                # Its instances checkpoint, then kill, its processes and keep the images;
                # the home (dcptrace) waits; `resume` continues it (issue 12).
                for cmd in self.commands.stop(
                    st.program_id, st.instances, st.reason, checkpoint=True
                ):
                    self.oss_log(
                        f"program {st.program_id}: {cmd.action}"
                        f"{' (checkpoint)' if cmd.checkpoint else ''} ordered (command {cmd.id})",
                        cmd.instance,
                    )
                continue
            await self._release_network(st.program_id)
            # Every instance running it freezes, then kills, its processes there; the
            # home (dcptrace) sees the stop in the program's state and stops its own.
            for cmd in self.commands.stop(st.program_id, st.instances, st.reason):
                self.oss_log(
                    f"program {st.program_id}: {cmd.action} ordered (command {cmd.id})",
                    cmd.instance,
                )

    async def optimize(self) -> None:
        """Run the optimizer on every running program; log each changed decision."""
        for p in await self.programs.active_programs():
            sp = p["scaling_policy"]
            names = [pl["instance"] for pl in p["placements"]]
            loads = [ld for ld in (self.metrics.load(n) for n in names) if ld is not None]
            cpus = int(p["cpus"])
            soft = p["budget_micros"]
            left = None if soft is None else max(0.0, 1.0 - p["spent_micros"] / max(soft, 1))
            load = optimizer.ProgramLoad(
                processes=p["processes"],
                instances=len(names),
                cpus=cpus,
                cpu_percent=sum(ld.cpu_percent for ld in loads) / len(loads) if loads else 0.0,
                runqueue=sum(ld.runqueue for ld in loads),
                budget_left_fraction=left,
                limit_headroom=p["headroom"],
            )
            d = optimizer.decide(
                optimizer.Goal(sp["goal"]),
                load,
                p["target_instances"],
                sp["min_instances"],
                sp["max_instances"],
            )
            self.metrics.decisions.labels(d.action.value).inc()
            if d.target != p["target_instances"]:
                await self.programs.set_target(p["id"], d.target)
            line = f"optimizer: {d.action.value} to {d.target} instance(s): {d.reason}"
            if self._decided.get(p["id"]) != line:
                self._decided[p["id"]] = line
                await self.program_log(p["id"], line)
                self.oss_log(f"program {p['id']} {line}")

    async def cancel(self, who: Principal, program_id: str) -> dict[str, Any]:
        """Cancel an active (or suspended) program."""
        before = await self.programs.program(who.account_id, program_id)
        prog = await self.programs.end_program(
            who.account_id, program_id, "cancelled", f"cancelled by {who.user_id}"
        )
        await self.program_log(program_id, f"cancelled by {who.user_id}")
        if before["state"] == "suspended":
            # Its instances end the suspended sessions (the deputies hear SIGKILL) and
            # drop their images (issue 12).
            held = [pl["instance"] for pl in before["placements"]]
            self.commands.stop(program_id, held, f"cancelled by {who.user_id}")
        self.commands.forget_program(program_id)
        self.failover.forget(program_id)  # issue 12: its checkpoints go
        self.mover.forget(program_id)
        await self._release_network(program_id)
        return prog

    async def resume(self, who: Principal, program_id: str) -> dict[str, Any]:
        """Continue a program suspended at its hard budget (issue 12): refused while a
        limit that stops it is still past; each instance holding it restores it."""
        instances = await self.billing.resume(who.account_id, program_id, who.user_id)
        await self.program_log(program_id, f"resumed by {who.user_id}")
        for cmd in self.commands.resume(program_id, instances, f"resumed by {who.user_id}"):
            self.oss_log(f"program {program_id}: resume ordered (command {cmd.id})", cmd.instance)
        return await self.programs.program(who.account_id, program_id)

    async def finish(
        self, who: Principal, program_id: str, exit_status: int | None, signal: int | None
    ) -> dict[str, Any]:
        """The program ended on its own."""
        state = "finished" if signal is None and exit_status == 0 else "failed"
        reason = (
            f"exited with status {exit_status}" if signal is None else f"killed by signal {signal}"
        )
        prog = await self.programs.end_program(
            who.account_id, program_id, state, reason, exit_status, signal
        )
        await self.program_log(program_id, reason)
        self.commands.forget_program(program_id)
        self.failover.forget(program_id)  # issue 12: its checkpoints go
        self.mover.forget(program_id)
        await self._release_network(program_id)
        return prog

    async def _release_network(self, program_id: str) -> None:
        """The program ended: its address and redirects go (one line if a node failed)."""
        self.unix_paths.release(program_id)
        if self.network is None:
            return
        try:
            await self.network.release(program_id)
        except Exception as exc:  # noqa: BLE001 - the end is recorded regardless
            self.oss_log(f"program {program_id}: network set-up not fully removed: {exc}")

    async def _storage_on(self, program: str, instance: str) -> None:
        """A restore or migration target mounts the program's storage first (issue 14):
        the process holds files and a working directory in it.  StorageNotMounted if not."""
        if await self.storage.mounts(program) is not None:
            await self.storage.mount(program, instance)

    async def _restore_targets(self) -> dict[str, str]:
        """Ready instances with an exec key -> their agent's address (issue 12)."""
        ready = list(await self.instances.ready_instances())
        return {n: a for n, (a, _key) in (await self.instances.exec_targets(ready)).items()}

    async def instance_programs(self, instance: str) -> set[str]:
        """Ids of programs placed on an instance."""
        return await self.programs.instance_programs(instance)

    # -- migration (issue 12) -------------------------------------------------------

    async def migrate(
        self, who: Principal, program_id: str, to: str, pid: int | None
    ) -> list[dict[str, Any]]:
        """Move the program's running session(s) to instance `to`, one after another;
        MigrationFailed (one line) for the first that cannot move: it runs on."""
        rows = await self.processes.processes(who.account_id, program_id)  # 404: not yours
        refs = migrations.sessions_to_move(rows, pid, to)
        address = await self._target(to)
        why = f"requested by {who.user_id}"
        return [await self._move(program_id, ref, to, address, why) for ref in refs]

    async def move_session(
        self, program_id: str, ref: migrations.SessionRef, to: str, reason: str
    ) -> dict[str, Any]:
        """Move one session to `to` for `reason` (recorded with the move); the optimizer's
        way in (issue 12).  MigrationFailed (one line): it runs on where it was."""
        return await self._move(program_id, ref, to, await self._target(to), reason)

    def migrating(self, program_id: str) -> bool:
        """Is a migration of the program under way (requested, draining or optimizer's)?"""
        return any(cmd.program == program_id for cmd in self._moves.values())

    async def _target(self, to: str) -> str:
        """The address of a ready target with an exec key; one line why not otherwise."""
        found = await self.instances.exec_targets([to])
        if to in found:
            return found[to][0]
        try:
            row = (await self.instances.instances(None, to))[0]
        except NotFound:
            raise NotFound(f"instance {to}") from None
        if row["state"] != "ready":
            raise MigrationFailed(f"instance {to} is {row['state']}, not ready")
        raise MigrationFailed(f"instance {to} registered no exec key: it cannot take programs")

    async def _move(
        self,
        program_id: str,
        ref: migrations.SessionRef,
        to: str,
        address: str,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """Order one session's move through its source's heartbeat; wait for the outcome."""
        if ref.instance not in self._last_seen:
            raise MigrationFailed(f"the source instance {ref.instance} is not live")
        try:
            await self._storage_on(program_id, to)
        except StorageNotMounted as exc:
            raise MigrationFailed(
                f"the program's storage could not be mounted on {exc.detail}"
            ) from None
        cmd = self.commands.migrate(ref.instance, program_id, ref.pid, to, address)
        self._moves[cmd.id] = cmd
        if reason is not None:
            self._move_reasons[cmd.id] = reason
        waiting = self._outcomes.expect(cmd.id)
        try:
            async with asyncio.timeout(self.config.migrate_timeout):
                outcome = await waiting
        except TimeoutError:
            self.commands.cancel(ref.instance, cmd.id)
            raise MigrationFailed(
                f"no word from {ref.instance} within {self.config.migrate_timeout:g}s"
            ) from None
        finally:
            self._outcomes.forget(cmd.id)
            self._move_reasons.pop(cmd.id, None)
        if not outcome["ok"]:
            raise MigrationFailed(f"pid {ref.pid} on {ref.instance}: {outcome['error']}")
        return dict(
            pid=ref.pid,
            source=ref.instance,
            target=to,
            freeze_ms=outcome["freeze_ms"],
            image_bytes=outcome["image_bytes"],
        )

    def _own_move(self, instance: str, cid: int) -> Command:
        cmd = self._moves.get(cid)
        if cmd is None or cmd.instance != instance:
            raise NotFound(f"migrate command {cid}")  # another instance's: not there
        return cmd

    async def migration_ticket(self, instance: str, body: MigrationTicketRequest) -> str:
        """A ticket for the target of a migrate command given to `instance`."""
        cmd = self._own_move(instance, body.command)
        found = await self.instances.exec_targets([cmd.to])
        if cmd.to not in found:
            raise MigrationFailed(f"instance {cmd.to} is no longer ready")
        return migrations.mint_ticket(found[cmd.to][1], cmd.to, body.session)

    async def migration_outcome(self, instance: str, body: MigrationOutcome) -> None:
        """A source agent's outcome: the record follows a move, the request hears it."""
        cmd = self._own_move(instance, body.command)
        del self._moves[cmd.id]
        self.commands.cancel(instance, cmd.id)
        reason = self._move_reasons.pop(cmd.id, None)
        if body.ok:
            now = self.clock()
            await self.processes.migrated(
                cmd.program, instance, cmd.pid, cmd.to, body.freeze_ms, now, reason
            )
            await self.programs.move(cmd.program, instance, cmd.to)  # its slot goes along
            self._placed_on[(cmd.program, cmd.to)] = now  # the target reports for it now
            self.failover.migrated(cmd.program, instance, cmd.to, cmd.pid)  # its checkpoints
            self._event_lines.setdefault(cmd.program, []).append(
                logmod.LogLine(
                    now,
                    "event",
                    f"migrated from {instance} to {cmd.to} (freeze {body.freeze_ms:.0f} ms)"
                    + (f": {reason}" if reason else ""),
                    cmd.to,
                    cmd.pid,
                )
            )
            self.oss_log(f"program {cmd.program}: pid {cmd.pid} moved to {cmd.to}", instance)
            if self.network is not None:  # issue 13: its redirects follow it
                took = await self.network.moved(cmd.program, cmd.pid, instance, cmd.to)
                if took:
                    self.oss_log(
                        f"program {cmd.program}: redirects re-pointed to {cmd.to} in "
                        f"{took * 1000:.1f} ms",
                        cmd.to,
                    )
        else:
            self.oss_log(
                f"program {cmd.program}: pid {cmd.pid} not moved to {cmd.to}: {body.error}",
                instance,
            )
        self._outcomes.resolve(cmd.id, body.model_dump())

    async def _released(self, instance: str) -> None:
        """A provider destroyed the instance on purpose: the program storage it mounted
        went with it (its agent unmounted), so a run's end orders it nothing."""
        await self.storage.forget_instance(instance, "the instance was released")

    async def drain(self, instance: str) -> dict[str, Any]:
        """Move every program session off `instance`, then release it (its provider) or
        mark it drained; what cannot move stays, a line each, and the instance too."""
        row = (await self.instances.instances(None, instance))[0]  # NotFound
        await self.instances.set_draining(instance, True)  # nothing new is placed there
        try:
            return await self._drain(instance, row)
        except BaseException:
            await self.instances.set_draining(instance, False)
            raise

    async def _drain(self, instance: str, row: dict[str, Any]) -> dict[str, Any]:
        rows = await self.processes.running_on(instance)
        live = [n for n in sorted(await self.instances.ready_instances()) if n != instance]
        targets = await self.instances.exec_targets(live)
        names = sorted(targets)
        moved: list[dict[str, Any]] = []
        refused: list[str] = []
        by_program: dict[str, list[Any]] = {}
        for r in rows:
            by_program.setdefault(r["program_id"], []).append(r)
        turn = 0
        for program_id, prow in sorted(by_program.items()):
            for ref in migrations.sessions_to_move(prow, None, ""):
                if not names:
                    refused.append(f"{program_id} pid {ref.pid}: no other ready instance")
                    continue
                to = names[turn % len(names)]
                turn += 1
                try:
                    why = f"draining {instance}"
                    moved.append(await self._move(program_id, ref, to, targets[to][0], why))
                except MigrationFailed as exc:
                    refused.append(f"{program_id} pid {ref.pid}: {exc.detail}")
        state = row["state"]
        if not refused:
            state = await self.pools.release(instance, row["pool"])
            self.oss_log(f"instance {instance} drained: {state}", instance)
        else:  # what could not move runs on there: the instance takes placements again
            await self.instances.set_draining(instance, False)
        return dict(instance=instance, moved=moved, refused=refused, state=state)
