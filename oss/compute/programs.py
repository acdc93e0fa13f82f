"""The compute repository of programs: programs, their placements, account policies.

Placement is one step in one writer transaction: the scheduler decides over the
instances' free slots, the limits are checked, the slots are reserved.  The limit
check goes through a `Budget` (implemented by billing, injected by oss.service), so
compute imports nothing of billing and the step stays atomic.  The conn-level
functions at the end run inside billing's and telemetry's transactions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from oss.accounts.store import Principal
from oss.compute import scheduler
from oss.compute.instances import (
    candidates,
    free_slots,
    move_slot,
    own_candidates,
    release_placed,
)
from oss.db.store import SHORT_PAGE, Conn, Store, new_id, to_json
from oss.errors import BudgetExhausted, Conflict, LimitExceeded, NoCapacity, NotFound

ACTIVE = ("pending", "running", "recovering")
SUSPENDED = "suspended"  # stopped at its hard budget, checkpointed: placements kept (issue 12)
VIEW_CACHE = 4096  # programs whose view is kept in memory (cleared whole when full)


class Budget(Protocol):
    """The limits and budgets a program is held to (billing implements it).

    Every method runs inside the caller's transaction (`c`).
    """

    def check(
        self, c: Conn, program_id: str, instances: int, storage_mb: int, bandwidth_mbps: int
    ) -> None:
        """Raise LimitExceeded/BudgetExhausted if the program may not add these resources."""

    def set_program_limits(self, c: Conn, program_id: str, body: Mapping[str, Any]) -> None:
        """Set a new program's own limits."""

    def headroom(self, c: Conn, program_id: str) -> int:
        """How many more instances the limits allow the program (large if unlimited)."""

    def program_budget(self, c: Conn, program_id: str) -> int | None:
        """The program's own soft budget in micros (None: none)."""


class Programs:
    """Programs and their placements on instances; account default policies."""

    def __init__(self, db: Store, budget: Budget) -> None:
        self._db = db
        self._budget = budget
        self._views: dict[str, tuple[str, dict[str, Any]]] = {}  # view_of's, immutable

    async def get_policies(self, account_id: str) -> dict[str, Any]:
        """The account's default policies."""

        def op(c: Conn) -> dict[str, Any]:
            r = c.execute("SELECT body FROM policies WHERE account_id=?", (account_id,)).fetchone()
            return json.loads(r["body"]) if r else {}

        return await self._db.read(op)

    async def set_policies(self, account_id: str, body: Mapping[str, Any]) -> None:
        """Replace the account's default policies."""

        def op(c: Conn) -> None:
            c.execute("INSERT OR REPLACE INTO policies VALUES(?,?)", (account_id, to_json(body)))

        await self._db.write(op)

    async def submit(
        self,
        who: Principal,
        spec: Mapping[str, Any],
        slots_limits: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """Create a program and place its first processes, limits checked atomically.

        If no instance fits right now the program is created `pending` (its
        storage and bandwidth are still reserved against the limits).
        """
        now = self._db.clock()
        pid = new_id("prog")

        def op(c: Conn) -> dict[str, Any]:
            policy = spec["resource_policy"]
            scaling = spec["scaling_policy"]
            if slots_limits:
                self._budget.set_program_limits(c, pid, dict(slots_limits))
            c.execute(
                "INSERT INTO programs(id, account_id, user_id, state, status_reason, argv, env,"
                " cwd, image, processes, target_instances, resource_policy, scaling_policy,"
                " storage_mb, bandwidth_mbps, created, updated, last_metered)"
                " VALUES(?,?,?,'pending','waiting for capacity',?,?,?,?,0,?,?,?,?,?,?,?,?)",
                (
                    pid,
                    who.account_id,
                    who.user_id,
                    to_json(spec["argv"]),
                    to_json(spec["env"]),
                    spec["cwd"],
                    spec["image"],
                    scaling["min_instances"],
                    to_json(policy),
                    to_json(scaling),
                    0,
                    0,
                    now,
                    now,
                    now,
                ),
            )
            # Storage and bandwidth are reserved whether or not it places now.
            self._budget.check(c, pid, 0, spec["storage_mb"], spec["bandwidth_mbps"])
            c.execute(
                "UPDATE programs SET storage_mb=?, bandwidth_mbps=? WHERE id=?",
                (spec["storage_mb"], spec["bandwidth_mbps"], pid),
            )
            view = spec.get("view")
            if view is not None:  # dcptrace's programs: placed by their own policy
                c.execute(
                    "UPDATE programs SET view_json=?, placement=? WHERE id=?",
                    (to_json(view), view.get("placement", "spread"), pid),
                )
            try:
                place(c, self._budget, pid, spec["processes"], now, initial=True)
            except NoCapacity:
                c.execute(
                    "UPDATE programs SET lost_processes=? WHERE id=?", (spec["processes"], pid)
                )
            return program_dict(c, pid, who.account_id)

        return await self._db.write(op)

    async def place(
        self, account_id: str, program_id: str, processes: int, avoid: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """Place more processes of an active program (limits checked atomically)."""
        now = self._db.clock()

        def op(c: Conn) -> list[dict[str, Any]]:
            p = c.execute(
                f"SELECT client_placed, {_PLACING} FROM programs"
                " WHERE id=? AND account_id=?",
                (program_id, account_id),
            ).fetchone()
            if p is None:
                raise NotFound(f"program {program_id}")
            if p["state"] not in ("running", "recovering"):
                raise Conflict(f"program {program_id} is {p['state']}")
            if not p["client_placed"]:
                # Its client places processes one exec at a time: recovery must not
                # re-place those an instance failure ends (they would be phantoms).
                c.execute("UPDATE programs SET client_placed=1 WHERE id=?", (program_id,))
            return place(c, self._budget, program_id, processes, now, tuple(avoid), row=p)

        return await self._db.write(op)

    async def retry_waiting(self) -> list[str]:
        """Place what pending and recovering programs still miss; return programs now running."""
        now = self._db.clock()

        def op(c: Conn) -> list[str]:
            done = []
            for r in c.execute(
                "SELECT id, lost_processes FROM programs WHERE state IN ('pending','recovering')"
                " ORDER BY created"
            ).fetchall():
                c.execute("SAVEPOINT retry")
                try:
                    if r["lost_processes"] > 0:
                        place(c, self._budget, r["id"], r["lost_processes"], now, initial=True)
                    c.execute(
                        "UPDATE programs SET state='running', lost_processes=0, status_reason=?"
                        " WHERE id=?",
                        ("running", r["id"]),
                    )
                except (NoCapacity, LimitExceeded, BudgetExhausted):
                    c.execute("ROLLBACK TO retry")
                    c.execute("RELEASE retry")
                    continue
                c.execute("RELEASE retry")
                done.append(r["id"])
            return done

        return await self._db.write(op)

    async def release(self, account_id: str, program_id: str, instance: str, n: int) -> None:
        """Some of a program's processes on an instance ended."""

        def op(c: Conn) -> None:
            check_program(c, program_id, account_id)
            k = release_placed(c, program_id, instance, n)
            if k == 0:
                raise NotFound(f"placement of {program_id} on {instance}")
            c.execute("UPDATE programs SET processes=processes-? WHERE id=?", (k, program_id))

        await self._db.write(op)

    async def move(self, program_id: str, source: str, target: str) -> None:
        """One of the program's processes moved from `source` to `target` (its slot too)."""
        await self._db.write(lambda c: move_slot(c, program_id, source, target))

    async def end_program(
        self,
        account_id: str | None,
        program_id: str,
        state: str,
        reason: str,
        exit_status: int | None = None,
        signal: int | None = None,
    ) -> dict[str, Any]:
        """Move an active program to a final state and free its instances."""
        now = self._db.clock()

        def op(c: Conn) -> dict[str, Any]:
            p = program_row(c, program_id, account_id)
            if p["state"] not in (*ACTIVE, SUSPENDED):
                raise Conflict(f"program {program_id} already {p['state']}")
            end(c, program_id, state, reason, exit_status, signal, now)
            return program_dict(c, program_id, p["account_id"])

        return await self._db.write(op)

    async def program(self, account_id: str, program_id: str) -> dict[str, Any]:
        """One program of the account."""
        return await self._db.read(lambda c: program_dict(c, program_id, account_id), short=True)

    async def instance_programs(self, instance: str) -> set[str]:
        """Ids of programs placed on an instance."""

        def op(c: Conn) -> set[str]:
            return {
                r[0]
                for r in c.execute(
                    "SELECT program_id FROM placements WHERE instance=?", (instance,)
                )
            }

        return await self._db.read(op)

    async def instances_of(self, program_id: str) -> list[str]:
        """The instances a program has processes on now."""

        def op(c: Conn) -> list[str]:
            return [
                str(r[0])
                for r in c.execute(
                    "SELECT DISTINCT instance FROM placements WHERE program_id=? ORDER BY instance",
                    (program_id,),
                )
            ]

        return await self._db.read(op)

    async def placed_on(self, program_id: str, instance: str) -> str:
        """The owner account of a program with processes on `instance`; NotFound otherwise.

        What lets an instance place a program's processes (issue 10): it runs one
        of them now.  Any other program, live or not, is not found for it.
        """

        def op(c: Conn) -> str:
            r = c.execute(
                "SELECT p.account_id, p.state FROM programs p JOIN placements l"
                " ON l.program_id=p.id WHERE p.id=? AND l.instance=?",
                (program_id, instance),
            ).fetchone()
            if r is None or r["state"] not in ("running", "recovering"):
                raise NotFound(f"program {program_id} on instance {instance}")
            return str(r["account_id"])

        return await self._db.read(op)

    async def view_of(self, program_id: str) -> tuple[str, dict[str, Any]]:
        """(placement policy, stored view) of a program (issue 10: bound into its tickets).

        Both are set at submit and never change: kept after the first read (one
        read less per placement with a ticket).  The caller must not modify them.
        """
        hit = self._views.get(program_id)
        if hit is not None:
            return hit

        def op(c: Conn) -> tuple[str, dict[str, Any]]:
            r = c.execute(
                "SELECT placement, view_json FROM programs WHERE id=?", (program_id,)
            ).fetchone()
            if r is None:
                raise NotFound(f"program {program_id}")
            return r[0], json.loads(r[1] or "{}")

        got = await self._db.read(op, short=True)
        if len(self._views) >= VIEW_CACHE:
            self._views.clear()
        self._views[program_id] = got
        return got

    async def check_placed(self, account_id: str, program_id: str, instance: str | None) -> None:
        """NotFound unless the account's program exists (and is placed on `instance`)."""

        def op(c: Conn) -> None:
            check_program(c, program_id, account_id)
            if (
                instance is not None
                and not c.execute(
                    "SELECT 1 FROM placements WHERE program_id=? AND instance=?",
                    (program_id, instance),
                ).fetchone()
            ):
                raise NotFound(f"program {program_id} is not placed on instance {instance}")

        await self._db.read(op)

    async def programs(
        self, account_id: str, state: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """The account's programs, newest first."""

        def op(c: Conn) -> list[dict[str, Any]]:
            # Two queries for the whole page, not two per program (issue 15).
            q = "SELECT * FROM programs WHERE account_id=?" + (" AND state=?" if state else "")
            args: list[Any] = [account_id] + ([state] if state else [])
            rows = c.execute(q + " ORDER BY created DESC LIMIT ?", (*args, limit)).fetchall()
            placed: dict[str, list[dict[str, Any]]] = {r["id"]: [] for r in rows}
            for i in range(0, len(rows), 500):  # SQLite's bound-parameter limit
                ids = [r["id"] for r in rows[i : i + 500]]
                for pl in c.execute(
                    "SELECT program_id, instance, processes FROM placements WHERE program_id IN"
                    f" ({','.join('?' * len(ids))}) ORDER BY program_id, instance",
                    ids,
                ):
                    placed[pl[0]].append(dict(instance=pl[1], processes=pl[2]))
            return [_as_dict(r, placed[r["id"]]) for r in rows]

        return await self._db.read(op, short=limit <= SHORT_PAGE)

    async def active_programs(self) -> list[dict[str, Any]]:
        """Every active program with its placements (for the optimizer)."""

        def op(c: Conn) -> list[dict[str, Any]]:
            # Fixed-width programs (min == max == target) need no decision.
            ids = [
                r["id"]
                for r in c.execute(
                    "SELECT id FROM programs WHERE state='running' AND ("
                    " json_extract(scaling_policy, '$.min_instances')"
                    "   != json_extract(scaling_policy, '$.max_instances')"
                    " OR target_instances != json_extract(scaling_policy, '$.min_instances'))"
                )
            ]
            out = []
            for i in ids:
                p = program_dict(c, i, None)
                p["headroom"] = self._budget.headroom(c, i)
                p["budget_micros"] = self._budget.program_budget(c, i)
                p["cpus"] = c.execute(
                    "SELECT coalesce(sum(i.cpus),0) FROM placements pl JOIN instances i"
                    " ON i.name=pl.instance WHERE pl.program_id=?",
                    (i,),
                ).fetchone()[0]
                out.append(p)
            return out

        return await self._db.read(op)

    async def demand(self) -> list[tuple[str | None, int, int]]:
        """Per active program: (its instance type or None, processes waiting, width wanted).

        Waiting: the processes a pending or recovering program could not place yet;
        width wanted: instances its target asks for (at most one per process) beyond
        those it uses.  The pool manager sums them per pool (autoscaling).
        """

        def op(c: Conn) -> list[tuple[str | None, int, int]]:
            return [
                (r[0], r[1], max(0, min(r[2], r[3] + r[1]) - r[4]))
                for r in c.execute(
                    "SELECT json_extract(p.resource_policy, '$.instance_type'),"
                    " CASE WHEN p.state IN ('pending','recovering') THEN p.lost_processes"
                    " ELSE 0 END, p.target_instances, p.processes,"
                    " (SELECT count(*) FROM placements pl WHERE pl.program_id=p.id)"
                    " FROM programs p WHERE p.state IN ('pending','running','recovering')"
                )
            ]

        return await self._db.read(op)

    async def set_target(self, program_id: str, target: int) -> None:
        """Set a program's target width (the optimizer's decision)."""

        def op(c: Conn) -> None:
            c.execute("UPDATE programs SET target_instances=? WHERE id=?", (target, program_id))

        await self._db.write(op)


# -- run inside a transaction (this repository's or another service's) ----------


def program_row(c: Conn, program_id: str, account_id: str | None) -> sqlite3.Row:
    """The program row; NotFound for another account's program (tenant isolation)."""
    if account_id is None:
        r = c.execute("SELECT * FROM programs WHERE id=?", (program_id,)).fetchone()
    else:
        r = c.execute(
            "SELECT * FROM programs WHERE id=? AND account_id=?", (program_id, account_id)
        ).fetchone()
    if r is None:
        raise NotFound(f"program {program_id}")
    return r


def check_program(c: Conn, program_id: str, account_id: str | None) -> None:
    """NotFound unless the program exists and is the account's (tenant isolation; None:
    any account's)."""
    r = c.execute("SELECT account_id FROM programs WHERE id=?", (program_id,)).fetchone()
    if r is None or (account_id is not None and r[0] != account_id):
        raise NotFound(f"program {program_id}")


def program_dict(c: Conn, program_id: str, account_id: str | None) -> dict[str, Any]:
    """A program as the API shows it, with its placements."""
    r = program_row(c, program_id, account_id)
    placements = [
        dict(instance=p["instance"], processes=p["processes"])
        for p in c.execute(
            "SELECT instance, processes FROM placements WHERE program_id=? ORDER BY instance",
            (program_id,),
        )
    ]
    return _as_dict(r, placements)


def _as_dict(r: sqlite3.Row, placements: list[dict[str, Any]]) -> dict[str, Any]:
    """A program row and its placements as the API shows them."""
    d = dict(r)
    for k in ("argv", "env", "resource_policy", "scaling_policy"):
        d[k] = json.loads(d[k])
    d.pop("last_metered")
    d["view"] = json.loads(d.pop("view_json", None) or "{}")  # issue 10 (B)
    d.pop("placement", None)
    d.pop("client_placed", None)  # issue 10 (E)
    stop = d.pop("stop_json", None)
    d["stop"] = json.loads(stop) if stop else None
    d["placements"] = placements
    return d


def _width(c: Conn, program_id: str) -> int:
    """How many instances the program's processes are placed on."""
    return int(
        c.execute("SELECT count(*) FROM placements WHERE program_id=?", (program_id,)).fetchone()[0]
    )


def _current(c: Conn, program_id: str) -> dict[str, int]:
    """Instance -> the program's processes placed there."""
    return {
        r[0]: r[1]
        for r in c.execute(
            "SELECT instance, processes FROM placements WHERE program_id=?", (program_id,)
        )
    }


# The program's columns a placement reads.
_PLACING = "state, account_id, user_id, resource_policy, target_instances, placement"


def place(
    c: Conn,
    budget: Budget,
    program_id: str,
    processes: int,
    now: float,
    avoid: Sequence[str] = (),
    *,
    initial: bool = False,
    row: sqlite3.Row | None = None,
) -> list[dict[str, Any]]:
    """Decide (scheduler), check limits, reserve: one atomic step in the caller's transaction.

    `row`: the program's `_PLACING` columns, when the caller read them already.
    """
    p = row or c.execute(f"SELECT {_PLACING} FROM programs WHERE id=?", (program_id,)).fetchone()
    rp = json.loads(p["resource_policy"])
    policy = scheduler.SelectionPolicy(
        rp.get("instance_type"),
        rp.get("min_price_micros"),
        rp.get("max_price_micros"),
        rp.get("storage"),
        scheduler.Tenancy(rp.get("tenancy", "shared")),
    )
    plan = None
    own = own_candidates(c, program_id) if p["placement"] is None else None
    target = p["target_instances"]
    if own and (len(own) >= target or _width(c, program_id) >= target):
        # As wide as its target: new processes go next to their siblings while those have
        # room (the scheduler's locality rule), so its instances with a free slot decide,
        # standing for every instance it uses (the scheduler adds none while one of them
        # has room, and their process counts do not enter its choice); the pre-filter
        # over every ready instance is needed only once they are full.  Same plan as with
        # every candidate (issue 15: most placements of a running program).
        with contextlib.suppress(NoCapacity):
            plan = scheduler.place(
                program_id,
                processes,
                policy,
                own,
                dict.fromkeys((x.name for x in own), 0),
                target,
                avoid,
            )
    current = {} if plan is not None else _current(c, program_id)
    if plan is None and p["placement"] is None:
        found = candidates(c, program_id, policy, own)
        plan = scheduler.place(
            program_id, processes, policy, found, current, target, avoid
        )
    elif plan is None:
        found = candidates(c, program_id, policy)
        # The processes a submission reserves (the root, which runs at home) are
        # placed even under `local`, locality first; later ones by the policy.
        name = "pack" if initial and p["placement"] == "local" else p["placement"]
        plan = _by_policy(program_id, name, processes, policy, found, current, avoid)
    new = sum(1 for a in plan if a.new_for_program)
    budget.check(c, program_id, new, 0, 0)
    dedicated = policy.tenancy is scheduler.Tenancy.DEDICATED
    for a in plan:
        c.execute(
            "INSERT INTO placements VALUES(?,?,?,?,?) ON CONFLICT(program_id, instance)"
            " DO UPDATE SET processes=processes+excluded.processes",
            (program_id, a.instance, a.processes, p["account_id"], p["user_id"]),
        )
        c.execute(
            "UPDATE instances SET used_slots=used_slots+?, dedicated_to=? WHERE name=?",
            (a.processes, program_id if dedicated else None, a.instance),
        )
    if p["state"] in ("running", "recovering"):
        # Its state stays (a recovering one's lost processes are placed by
        # `retry_waiting`): the three indexes on state are not rewritten.
        c.execute(
            "UPDATE programs SET processes=processes+?, updated=? WHERE id=?",
            (processes, now, program_id),
        )
    elif p["state"] == "pending":
        c.execute(
            "UPDATE programs SET processes=processes+?, state='running',"
            " status_reason='running', updated=? WHERE id=?",
            (processes, now, program_id),
        )
    return [dict(instance=a.instance, processes=a.processes) for a in plan]


def _by_policy(
    program_id: str,
    name: str,
    processes: int,
    policy: scheduler.SelectionPolicy,
    found: list[scheduler.Candidate],
    current: dict[str, int],
    avoid: Sequence[str],
) -> list[scheduler.Assignment]:
    """`processes` placed one by one by the program's placement policy (all or nothing)."""
    now_at = dict(current)
    used = {cand.name: cand.used_slots for cand in found}
    out: dict[str, int] = {}
    for _ in range(processes):
        view = [dataclasses.replace(cand, used_slots=used[cand.name]) for cand in found]
        (a,) = scheduler.place_by_policy(program_id, name, policy, view, now_at, avoid)
        now_at[a.instance] = now_at.get(a.instance, 0) + 1
        used[a.instance] += 1
        out[a.instance] = out.get(a.instance, 0) + 1
    return [scheduler.Assignment(n, k, n not in current) for n, k in sorted(out.items())]


def end(
    c: Conn,
    program_id: str,
    state: str,
    reason: str,
    exit_status: int | None,
    signal: int | None,
    now: float,
) -> None:
    """Move a program to a final state and free its instances."""
    for r in c.execute(
        "SELECT instance, processes FROM placements WHERE program_id=?", (program_id,)
    ).fetchall():
        c.execute(
            "DELETE FROM placements WHERE program_id=? AND instance=?", (program_id, r["instance"])
        )
        free_slots(c, r["instance"], r["processes"], program_id)
    c.execute("DELETE FROM placement_moves WHERE program_id=?", (program_id,))
    c.execute(
        "UPDATE programs SET state=?, status_reason=?, exit_status=?, signal=?, processes=0,"
        " updated=? WHERE id=?",
        (state, reason, exit_status, signal, now, program_id),
    )


def suspend(c: Conn, program_id: str, reason: str, now: float) -> None:
    """Suspend a running program (issue 12): its placements and slots stay, metering skips it."""
    c.execute(
        "UPDATE programs SET state=?, status_reason=?, updated=? WHERE id=?",
        (SUSPENDED, reason, now, program_id),
    )


def unsuspend(c: Conn, program_id: str, reason: str, now: float) -> None:
    """A suspended program runs again; metering bills it from `now` (not the pause)."""
    c.execute(
        "UPDATE programs SET state='running', status_reason=?, stop_json=NULL, last_metered=?,"
        " updated=? WHERE id=? AND state=?",
        (reason, now, now, program_id, SUSPENDED),
    )


def set_stop(c: Conn, program_id: str, stop: Mapping[str, Any]) -> None:
    """Record why a limit stopped the program (billing's breach: level, resource, limit, value)."""
    c.execute("UPDATE programs SET stop_json=? WHERE id=?", (to_json(dict(stop)), program_id))


def is_placed(c: Conn, program_id: str, instance: str) -> bool:
    """Has the program processes on the instance?"""
    return (
        c.execute(
            "SELECT 1 FROM placements WHERE program_id=? AND instance=?", (program_id, instance)
        ).fetchone()
        is not None
    )


def owner(c: Conn, program_id: str) -> tuple[str, str]:
    """(account id, user id) of a program."""
    p = c.execute("SELECT account_id, user_id FROM programs WHERE id=?", (program_id,)).fetchone()
    return p[0], p[1]


_USAGE_COLUMN = {"account": "account_id", "user": "user_id"}


def usage(c: Conn, scope: str, scope_id: str) -> tuple[int, int, int, int]:
    """(instances, storage MB, bandwidth Mbps, spent micros) of active programs in a scope.

    `scope` is "account", "user" or "program".  Spent is the program's own at program
    scope; an account's or user's total is kept by accounts (0 here).
    """
    if scope == "program":
        inst = _width(c, scope_id)
        r = c.execute(
            "SELECT storage_mb, bandwidth_mbps, spent_micros FROM programs WHERE id=?",
            (scope_id,),
        ).fetchone()
        return inst, r[0], r[1], r[2]
    col = _USAGE_COLUMN[scope]
    inst = c.execute(
        f"SELECT count(DISTINCT instance) FROM placements WHERE {col}=?", (scope_id,)
    ).fetchone()[0]
    r = c.execute(
        f"SELECT coalesce(sum(storage_mb),0), coalesce(sum(bandwidth_mbps),0) FROM programs"
        f" WHERE {col}=? AND state IN ('pending','running','recovering')",
        (scope_id,),
    ).fetchone()
    return inst, r[0], r[1], 0


def metered(c: Conn) -> list[sqlite3.Row]:
    """The programs metering bills: running or recovering."""
    return c.execute("SELECT * FROM programs WHERE state IN ('running','recovering')").fetchall()


def instance_uses(c: Conn, program_id: str) -> list[sqlite3.Row]:
    """The program's placements with their instance's price, slots and dedication."""
    return c.execute(
        "SELECT pl.instance, pl.processes, i.price_micros_per_s, i.slots,"
        " i.dedicated_to FROM placements pl JOIN instances i ON i.name=pl.instance"
        " WHERE pl.program_id=?",
        (program_id,),
    ).fetchall()


def charge(c: Conn, program_id: str, amount_micros: int, metered_until: float) -> None:
    """Add a charge to the program's spend; it is metered up to `metered_until`."""
    c.execute(
        "UPDATE programs SET spent_micros=spent_micros+?, last_metered=? WHERE id=?",
        (amount_micros, metered_until, program_id),
    )


def active_owners(c: Conn) -> list[sqlite3.Row]:
    """(id, account_id, user_id) of every active program."""
    return c.execute(
        "SELECT id, account_id, user_id FROM programs"
        " WHERE state IN ('running','recovering','pending')"
    ).fetchall()


def spent(c: Conn, account_id: str, newest: int) -> tuple[dict[str, int], list[sqlite3.Row]]:
    """What the account's programs spent, summed per user, and its `newest` programs
    (id, argv, spent_micros), newest first (billing's spend report)."""
    by_user = dict(
        c.execute(
            "SELECT user_id, SUM(spent_micros) FROM programs WHERE account_id=? GROUP BY user_id",
            (account_id,),
        ).fetchall()
    )
    rows = c.execute(
        "SELECT id, argv, spent_micros FROM programs WHERE account_id=?"
        " ORDER BY created DESC LIMIT ?",
        (account_id, newest),
    ).fetchall()
    return by_user, rows
