"""Optimizer moves, the adapter (issue 12, migrate on decision): profiles from the
agents' usage samples, the state `oss.compute.movers.decide` needs, and its moves
applied through the migration machinery (`Oss.move_session`, the same path as
`dcp-oss migrate`).

Each move runs as a task owned here (cancelled and awaited by `close`), so a move
that waits for its source's outcome never holds up the OSS's other duties.  Every
move is logged with its reason in the program's log and the OSS log before it
starts and again with its outcome; the reason is recorded with the migration (the
process's `move_reason`, in `programs show` and the run record).  A hold is logged
once each time its kind changes, only for programs that have a CPU-bound process
(the others hold for the obvious reason, every tick).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from oss import models as m
from oss.compute import movers, optimizer
from oss.compute.migrations import SessionRef, sessions_to_move
from oss.db.store import Conn
from oss.errors import MigrationFailed, OssError

if TYPE_CHECKING:
    from oss.service import Oss

log = logging.getLogger(__name__)

FAILED_BACKOFF = 300.0  # s a target that failed a session's move is not tried again for it


class Mover:
    """Decides optimizer moves every `every` seconds and carries them out."""

    def __init__(self, oss: Oss, rules: movers.Rules, every: float) -> None:
        self.oss = oss
        self.rules = rules
        self.every = every
        self.profiles = movers.Profiles(window=max(10.0, 2 * rules.min_observed))
        self._last_pass = float("-inf")
        self._tasks: dict[str, asyncio.Task[None]] = {}  # program -> its move under way
        self._held: dict[str, movers.Why] = {}  # program -> the kind of its last logged hold
        self._failed: dict[tuple[str, int, str], float] = {}  # (program, pid, target) -> when

    # -- input ---------------------------------------------------------------------------

    def observe(self, instance: str, report: m.AgentReport, placed: Collection[str]) -> None:
        """The live samples of an applied report, for programs placed on `instance`."""
        now = self.oss.clock()
        for u in report.usage:
            if u.at is None or u.final or u.program_id not in placed:
                continue
            self.profiles.observe(
                u.program_id,
                instance,
                u.session if u.session is not None else u.pid,
                u.pid,
                u.started,
                movers.Sample(u.at, u.cpu_us, u.wait_us),
                now,
            )

    def forget(self, program_id: str) -> None:
        """The program ended: its profiles and hold go."""
        self.profiles.forget([program_id])
        self._held.pop(program_id, None)

    # -- the pass ------------------------------------------------------------------------

    async def tick(self) -> None:
        """One decision pass, at most every `every` seconds (an OSS duty)."""
        now = time.monotonic()
        if now - self._last_pass < self.every:
            return
        self._last_pass = now
        wall = self.oss.clock()
        for key, at in list(self._failed.items()):
            if wall - at > FAILED_BACKOFF:
                del self._failed[key]
        busy = self.profiles.busy(wall)
        bound = sorted(
            {prog for (prog, _i, _s), b in busy.items() if b.fraction >= self.rules.busy_min}
        )
        if not bound:
            return
        places: dict[str, movers.Place] | None = None
        for program_id in bound:
            if program_id in self._tasks:
                continue  # one move per program at a time
            if places is None:
                places = await self._places()
            try:
                await self._decide(program_id, busy, places, wall)
            except OssError as exc:
                log.warning("optimizer moves: program %s skipped: %s", program_id, exc)

    async def _decide(
        self,
        program_id: str,
        busy: Mapping[tuple[str, str, int], movers.Busy],
        places: Mapping[str, movers.Place],
        now: float,
    ) -> None:
        got = await self._program(program_id, busy, places, now)
        if got is None:
            return
        program, argv = got
        d = movers.decide(program, places, now, self.rules)
        if isinstance(d, movers.Hold):
            if self._held.get(program_id) is not d.why:
                self._held[program_id] = d.why
                await self._say(program_id, f"optimizer: no move: {d.reason}")
            return
        self._held.pop(program_id, None)
        ref = SessionRef(d.source, d.pid, argv.get((d.source, d.pid), ""))
        self._tasks[program_id] = asyncio.create_task(
            self._apply(d, ref), name=f"optimizer-move-{program_id}"
        )

    async def _apply(self, d: movers.Move, ref: SessionRef) -> None:
        """Carry out one move; its outcome goes to both logs."""
        try:
            await self._say(
                d.program,
                f"optimizer: moving pid {d.pid} from {d.source} to {d.target}: {d.reason}",
            )
            try:
                done = await self.oss.move_session(
                    d.program, ref, d.target, f"optimizer: {d.reason}"
                )
            except OssError as exc:  # refused, or the target went away meanwhile
                self._failed[(d.program, d.pid, d.target)] = self.oss.clock()
                await self._say(
                    d.program,
                    f"optimizer: pid {d.pid} not moved to {d.target} (it runs on at"
                    f" {d.source}): {exc.detail or exc}",
                )
                return
            await self._say(
                d.program,
                f"optimizer: moved pid {d.pid} from {d.source} to {d.target}, frozen"
                f" {done['freeze_ms']:.0f} ms",
            )
        except OssError as exc:
            log.warning("optimizer move of %s pid %d: %s", d.program, d.pid, exc)
        finally:
            self._tasks.pop(d.program, None)

    async def _say(self, program_id: str, text: str) -> None:
        await self.oss.program_log(program_id, text)
        self.oss.oss_log(f"program {program_id} {text}")

    async def close(self) -> None:
        """Cancel the moves under way (a cancelled wait leaves the program where it was,
        or where its source's outcome puts it)."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    # -- the state the decision needs ---------------------------------------------------

    async def _places(self) -> dict[str, movers.Place]:
        """Every ready instance with its speed (measured, else its type's), price, slots
        and load; `can_take` when it checkpoints, has an exec key and is not draining."""

        def op(c: Conn) -> list[Any]:
            return c.execute(
                "SELECT i.name, i.instance_type, coalesce(i.speed, t.speed) speed,"
                " i.price_micros_per_s, i.slots, i.used_slots, i.cpus, i.draining,"
                " i.exec_key IS NOT NULL AND i.address IS NOT NULL has_key"
                " FROM instances i LEFT JOIN instance_types t ON t.name=i.instance_type"
                " WHERE i.state='ready'"
            ).fetchall()

        out = {}
        for r in await self.oss.store.read(op):
            load = self.oss.metrics.load(r["name"])
            out[r["name"]] = movers.Place(
                name=r["name"],
                instance_type=r["instance_type"],
                speed=r["speed"],
                price_micros_per_s=r["price_micros_per_s"],
                slots=r["slots"],
                free_slots=r["slots"] - r["used_slots"],
                cpus=r["cpus"],
                runqueue=load.runqueue if load is not None else 0.0,
                can_take=bool(r["has_key"])
                and not r["draining"]
                and self.oss.can_checkpoint(r["name"]),
            )
        return out

    async def _program(
        self,
        program_id: str,
        busy: Mapping[tuple[str, str, int], movers.Busy],
        places: Mapping[str, movers.Place],
        now: float,
    ) -> tuple[movers.Program, dict[tuple[str, int], str]] | None:
        """The decision's view of a running program (None: not running, nothing movable)."""

        def op(c: Conn) -> Any:
            return c.execute(
                "SELECT state, account_id, resource_policy, scaling_policy FROM programs"
                " WHERE id=?",
                (program_id,),
            ).fetchone()

        p = await self.oss.store.read(op)
        if p is None or p["state"] != "running":
            return None
        rows = await self.oss.processes.processes(p["account_id"], program_id)
        try:
            refs = sessions_to_move(rows, None, "")
        except MigrationFailed:
            return None
        sp = json.loads(p["scaling_policy"])
        rp = json.loads(p["resource_policy"])
        first: dict[int, float] = {}
        for r in rows:
            first[r["pid"]] = min(first.get(r["pid"], r["started"]), r["started"])
        left: dict[int, set[str]] = {}
        last_move = None
        for r in rows:
            if r["state"] == "migrated":
                left.setdefault(r["pid"], set()).add(r["instance"])
                last_move = max(last_move or 0.0, r["ended"] or 0.0)
        for prog, pid, target in self._failed:
            if prog == program_id:
                left.setdefault(pid, set()).add(target)
        sessions = tuple(
            movers.Session(
                instance=s.instance,
                pid=s.pid,
                argv=s.argv,
                age_s=max(0.0, now - first.get(s.pid, now)),
                busy=busy.get((program_id, s.instance, s.pid)),
                left=frozenset(left.get(s.pid, ())),
            )
            for s in refs
            if s.instance in places and self.oss.can_checkpoint(s.instance)
        )
        if not sessions:
            return None
        program = movers.Program(
            id=program_id,
            goal=optimizer.Goal(sp.get("goal", "fastest")),
            moves=sp.get("moves") is not False,
            sessions=sessions,
            budget_left_micros=await self.oss.billing.budget_left(program_id),
            migrating=self.oss.migrating(program_id),
            last_move_at=last_move,
            instance_type=rp.get("instance_type"),
            min_price_micros=rp.get("min_price_micros"),
            max_price_micros=rp.get("max_price_micros"),
            dedicated=rp.get("tenancy") == "dedicated",
        )
        return program, {(s.instance, s.pid): s.argv for s in refs}
