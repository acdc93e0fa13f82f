"""The compute repository of instances: instance types, pools, instances, their tokens.

`Instances` runs its queries through the shared store (oss.db).  The conn-level
functions (`candidates`, `free_slots`) run inside the programs repository's
transactions: placement reads and reserves instance slots in one step.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from oss.accounts.store import hash_token
from oss.compute import scheduler
from oss.compute.pool import Backoff, InstanceType, PoolState
from oss.db.store import SHORT_PAGE, Conn, Store
from oss.errors import Conflict, NotFound, Unauthorized

CANDIDATES = 32  # instances the SQL pre-filter hands the scheduler (plus the program's own)


class Instances:
    """Instance types, pools and instances (with their bearer tokens and exec keys)."""

    def __init__(self, db: Store) -> None:
        self._db = db

    async def mint_instance_token(self, instance: str, pool: str | None = None) -> str:
        """Create (or re-key) instance `instance` and return its new bearer token."""
        token = "dcpi_" + secrets.token_urlsafe(32)
        now = self._db.clock()

        def op(c: Conn) -> str:
            mint_instance(c, instance, pool, token, now)
            return token

        return await self._db.write(op)

    async def authenticate_instance(self, token: str) -> str:
        """The instance name an instance token stands for."""
        h = hash_token(token)

        def op(c: Conn) -> str:
            r = c.execute("SELECT instance FROM instance_tokens WHERE hash=?", (h,)).fetchone()
            if r is None:
                raise Unauthorized()
            return str(r["instance"])

        return await self._db.read(op, short=True)

    async def put_instance_type(self, t: InstanceType) -> None:
        """Create or replace an instance type."""

        def op(c: Conn) -> None:
            c.execute(
                "INSERT OR REPLACE INTO instance_types(name, cpus, memory_mb,"
                " price_micros_per_s, storage, speed) VALUES(?,?,?,?,?,?)",
                (t.name, t.cpus, t.memory_mb, t.price_micros_per_s, t.storage, t.speed),
            )

        await self._db.write(op)

    async def instance_types(self) -> list[InstanceType]:
        """All instance types."""

        def op(c: Conn) -> list[InstanceType]:
            return [
                InstanceType(
                    r["name"],
                    r["cpus"],
                    r["memory_mb"],
                    r["price_micros_per_s"],
                    r["storage"],
                    r["speed"],
                )
                for r in c.execute("SELECT * FROM instance_types ORDER BY name")
            ]

        return await self._db.read(op)

    async def put_pool(
        self, name: str, instance_type: str, warm_target: int, max_size: int, provider: str
    ) -> None:
        """Create or resize a pool."""
        now = self._db.clock()

        def op(c: Conn) -> None:
            if not c.execute(
                "SELECT 1 FROM instance_types WHERE name=?", (instance_type,)
            ).fetchone():
                raise NotFound(f"instance type {instance_type}")
            c.execute(
                "INSERT INTO pools VALUES(?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET"
                " instance_type=excluded.instance_type, warm_target=excluded.warm_target,"
                " max_size=excluded.max_size, provider=excluded.provider",
                (name, instance_type, warm_target, max_size, provider, now),
            )

        await self._db.write(op)

    async def pools(self, name: str | None = None) -> list[dict[str, Any]]:
        """Pools with their instance type and live/idle counts."""

        def op(c: Conn) -> list[dict[str, Any]]:
            rows = c.execute(
                "SELECT p.*, t.cpus, t.memory_mb, t.price_micros_per_s, t.storage,"
                " (SELECT count(*) FROM instances i WHERE i.pool=p.name AND"
                "   i.state IN ('pending','ready')) AS live,"
                " (SELECT count(*) FROM instances i WHERE i.pool=p.name AND i.state='ready'"
                "   AND i.used_slots=0) AS idle"
                " FROM pools p JOIN instance_types t ON t.name=p.instance_type"
                + (" WHERE p.name=?" if name else "")
                + " ORDER BY p.name",
                (name,) if name else (),
            ).fetchall()
            if name and not rows:
                raise NotFound(f"pool {name}")
            return [
                dict(
                    name=r["name"],
                    instance_type=dict(
                        name=r["instance_type"],
                        cpus=r["cpus"],
                        memory_mb=r["memory_mb"],
                        price_micros_per_s=r["price_micros_per_s"],
                        storage=r["storage"],
                    ),
                    warm_target=r["warm_target"],
                    max_size=r["max_size"],
                    provider=r["provider"],
                    live=r["live"],
                    idle=r["idle"],
                )
                for r in rows
            ]

        return await self._db.read(op)

    async def pool_states(
        self, now: float | None = None, slots_per_cpu: int = 1, idle_grace: float = 0.0
    ) -> list[tuple[PoolState, str, InstanceType]]:
        """Every pool's fill state, provider name and instance type.

        Also keeps `instances.idle_since` (since when a ready instance runs nothing)
        up to date, as of `now` (the OSS clock; None: the store's).
        """
        at = self._db.clock() if now is None else now

        def op(c: Conn) -> tuple[list[tuple[PoolState, str, InstanceType]], list[Any]]:
            out = []
            changes: list[Any] = []  # (idle_since or None, name): written after the read
            for p in c.execute(
                "SELECT p.*, t.cpus, t.memory_mb, t.price_micros_per_s, t.storage FROM pools p"
                " JOIN instance_types t ON t.name=p.instance_type ORDER BY p.name"
            ).fetchall():
                rows = c.execute(
                    "SELECT name, state, used_slots, idle_since FROM instances WHERE pool=? AND"
                    " state IN ('pending','ready','failed') ORDER BY created, name",
                    (p["name"],),
                ).fetchall()
                live = [r for r in rows if r["state"] != "failed"]
                since: dict[str, float] = {}
                for r in rows:
                    idle = r["state"] == "ready" and r["used_slots"] == 0
                    if idle:
                        since[r["name"]] = r["idle_since"] if r["idle_since"] is not None else at
                    if idle != (r["idle_since"] is not None):
                        changes.append((at if idle else None, r["name"]))
                idle_names = tuple(
                    r["name"] for r in live if r["state"] == "ready" and r["used_slots"] == 0
                )
                pending = sum(1 for r in live if r["state"] == "pending")
                st = PoolState(
                    p["name"],
                    p["warm_target"],
                    p["max_size"],
                    len(live),
                    idle_names,
                    pending,
                    idle_since=since,
                    idle_grace=idle_grace,
                    slots_per_instance=max(1, p["cpus"] * slots_per_cpu),
                    failed=tuple(r["name"] for r in rows if r["state"] == "failed"),
                )
                it = InstanceType(
                    p["instance_type"],
                    p["cpus"],
                    p["memory_mb"],
                    p["price_micros_per_s"],
                    p["storage"],
                )
                out.append((st, p["provider"], it))
            return out, changes

        states, changes = await self._db.read(op)
        if changes:  # a write only when an instance became idle or busy

            def record(c: Conn) -> None:
                c.executemany("UPDATE instances SET idle_since=? WHERE name=?", changes)

            await self._db.write(record)
        return states

    async def pool_backoffs(self) -> dict[str, Backoff]:
        """Every pool's create back-off (pools that never failed are absent)."""

        def op(c: Conn) -> dict[str, Backoff]:
            return {
                r["pool"]: Backoff(r["failures"], r["next_try"], r["error"])
                for r in c.execute("SELECT * FROM pool_backoff")
            }

        return await self._db.read(op)

    async def set_pool_backoff(self, pool: str, b: Backoff) -> None:
        """Record a pool's back-off (failures 0: forget it)."""

        def op(c: Conn) -> None:
            if b.failures == 0:
                c.execute("DELETE FROM pool_backoff WHERE pool=?", (pool,))
            else:
                c.execute(
                    "INSERT OR REPLACE INTO pool_backoff VALUES(?,?,?,?)",
                    (pool, b.failures, b.next_try, b.error[:500]),
                )

        await self._db.write(op)

    async def new_pool_instance(self, pool: str) -> tuple[str, str]:
        """Create a pending instance in a pool; return (name, token)."""
        token = "dcpi_" + secrets.token_urlsafe(32)
        now = self._db.clock()

        def op(c: Conn) -> tuple[str, str]:
            name = f"{pool}-{secrets.token_hex(3)}"
            mint_instance(c, name, pool, token, now)
            return name, token

        return await self._db.write(op)

    async def set_instance_state(self, name: str, state: str) -> None:
        """Move an instance to a new state (pending/ready/failed/destroyed)."""

        def op(c: Conn) -> None:
            c.execute("UPDATE instances SET state=? WHERE name=?", (state, name))

        await self._db.write(op)

    async def register_instance(
        self,
        name: str,
        address: str,
        hostname: str,
        cpus: int,
        memory_mb: int,
        slots_per_cpu: int,
        exec_key: str | None = None,
        speed: float | None = None,
    ) -> None:
        """An agent registered: the instance is ready (with its exec key, if it sent one,
        and its measured CPU score: issue 12)."""
        now = self._db.clock()

        def op(c: Conn) -> None:
            r = c.execute("SELECT * FROM instances WHERE name=?", (name,)).fetchone()
            if r is None:
                raise NotFound(f"instance {name}")
            if r["state"] == "destroyed":
                raise Conflict(f"instance {name} was destroyed")
            c.execute(
                "UPDATE instances SET state='ready', address=?, hostname=?, cpus=?, memory_mb=?,"
                " slots=?, last_heartbeat=?, exec_key=?, speed=? WHERE name=?",
                (
                    address, hostname, cpus, memory_mb, cpus * slots_per_cpu, now, exec_key,
                    speed, name,
                ),  # fmt: skip
            )

        await self._db.write(op)

    async def flush_heartbeats(self, beats: Mapping[str, tuple[float, str]]) -> None:
        """Persist the latest heartbeat time and load of many instances."""

        def op(c: Conn) -> None:
            c.executemany(
                "UPDATE instances SET last_heartbeat=?, load=? WHERE name=? AND state='ready'",
                [(ts, load, name) for name, (ts, load) in beats.items()],
            )

        await self._db.write(op)

    async def instances(
        self, account_id: str | None, name: str | None = None, states: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Instances visible to an account (None: all), optionally one by name."""

        def op(c: Conn) -> list[dict[str, Any]]:
            where, args = [], []
            if account_id is not None:
                where.append(
                    "(name IN (SELECT instance FROM placements WHERE account_id=?) OR dedicated_to"
                    " IN (SELECT id FROM programs WHERE account_id=?))"
                )
                args += [account_id, account_id]
            if name is not None:
                where.append("name=?")
                args.append(name)
            if states:
                where.append(f"state IN ({','.join('?' * len(states))})")
                args += list(states)
            q = "SELECT * FROM instances" + (" WHERE " + " AND ".join(where) if where else "")
            rows = c.execute(q + " ORDER BY name", args).fetchall()
            if name is not None and not rows:
                raise NotFound(f"instance {name}")
            return [_instance_row(r) for r in rows]

        return await self._db.read(op)

    async def set_draining(self, name: str, draining: bool) -> None:
        """A draining instance takes no new placements (its programs are being moved off)."""
        await self._db.write(
            lambda c: c.execute(
                "UPDATE instances SET draining=? WHERE name=?", (int(draining), name)
            )
        )

    async def ready_instances(self) -> dict[str, float]:
        """Ready instances and their last persisted heartbeat."""

        def op(c: Conn) -> dict[str, float]:
            return {
                r["name"]: float(r["last_heartbeat"] or 0.0)
                for r in c.execute("SELECT name, last_heartbeat FROM instances WHERE state='ready'")
            }

        return await self._db.read(op)

    async def fail_instances(
        self, names: Sequence[str], reason: str
    ) -> list[tuple[str, str, int, bool]]:
        """Mark instances failed; their programs lose those processes.

        A program the OSS places (submitted with processes) is marked for recovery:
        its lost processes are placed again.  One whose client places each exec
        (`client_placed`) is not: those processes ended with the instance, and
        re-placing them would only hold phantom slots; its status names the instance.
        Returns (program, instance, processes lost, client-placed) per program affected.
        """
        now = self._db.clock()

        def op(c: Conn) -> list[tuple[str, str, int, bool]]:
            affected: list[tuple[str, str, int, bool]] = []
            for name in names:
                cur = c.execute(
                    "UPDATE instances SET state='failed', used_slots=0, dedicated_to=NULL"
                    " WHERE name=? AND state='ready'",
                    (name,),
                )
                if cur.rowcount == 0:
                    continue
                for p in c.execute(
                    "SELECT pl.program_id, pl.processes, pr.client_placed FROM placements pl"
                    " JOIN programs pr ON pr.id=pl.program_id WHERE pl.instance=?",
                    (name,),
                ).fetchall():
                    why = f"instance {name} failed: {reason}"
                    if p["client_placed"]:
                        c.execute(
                            "UPDATE programs SET processes=processes-?, status_reason=?,"
                            " updated=? WHERE id=? AND state IN ('running','recovering')",
                            (p["processes"], why, now, p["program_id"]),
                        )
                    else:
                        c.execute(
                            "UPDATE programs SET state='recovering',"
                            " lost_processes=lost_processes+?, processes=processes-?,"
                            " status_reason=?, updated=? WHERE id=? AND"
                            " state IN ('running','recovering')",
                            (p["processes"], p["processes"], why, now, p["program_id"]),
                        )
                    affected.append(
                        (p["program_id"], name, p["processes"], bool(p["client_placed"]))
                    )
                c.execute("DELETE FROM placements WHERE instance=?", (name,))
            return affected

        return await self._db.write(op)

    async def exec_targets(self, names: Sequence[str]) -> dict[str, tuple[str, str]]:
        """{instance: (agent address, exec key)} for the ready ones that registered a key."""

        def op(c: Conn) -> dict[str, tuple[str, str]]:
            q = (
                "SELECT name, address, exec_key FROM instances WHERE state='ready' AND"
                f" exec_key IS NOT NULL AND address IS NOT NULL AND name IN"
                f" ({','.join('?' * len(names))})"
            )
            return {r[0]: (r[1], r[2]) for r in c.execute(q, list(names))}

        return await self._db.read(op, short=len(names) <= SHORT_PAGE) if names else {}


# -- run inside a transaction (this repository's or the programs repository's) ----


def mint_instance(c: Conn, name: str, pool: str | None, token: str, now: float) -> None:
    """Create instance `name` (or keep it) and (re-)key it: a new token, no exec key."""
    t = None
    if pool is not None:
        t = c.execute(
            "SELECT t.* FROM pools p JOIN instance_types t ON t.name=p.instance_type"
            " WHERE p.name=?",
            (pool,),
        ).fetchone()
        if t is None:
            raise NotFound(f"pool {pool}")
    r = c.execute("SELECT state FROM instances WHERE name=?", (name,)).fetchone()
    if r is None:
        c.execute(
            "INSERT INTO instances(name, pool, instance_type, state, cpus, memory_mb,"
            " price_micros_per_s, storage, created) VALUES(?,?,?,'pending',?,?,?,?,?)",
            (
                name,
                pool,
                t["name"] if t else None,
                t["cpus"] if t else 0,
                t["memory_mb"] if t else 0,
                t["price_micros_per_s"] if t else 0,
                t["storage"] if t else None,
                now,
            ),
        )
    c.execute(
        "INSERT OR REPLACE INTO instance_tokens VALUES(?,?,?)", (name, hash_token(token), now)
    )
    # A re-key also retires the old agent's exec key: tickets wait for a new registration.
    c.execute("UPDATE instances SET exec_key=NULL WHERE name=?", (name,))


def _instance_row(r: sqlite3.Row) -> dict[str, Any]:
    return dict(
        name=r["name"],
        pool=r["pool"],
        instance_type=r["instance_type"],
        state=r["state"],
        address=r["address"],
        hostname=r["hostname"],
        cpus=r["cpus"],
        memory_mb=r["memory_mb"],
        price_micros_per_s=r["price_micros_per_s"],
        storage=r["storage"],
        slots=r["slots"],
        used_slots=r["used_slots"],
        dedicated=r["dedicated_to"] is not None,
        last_heartbeat=r["last_heartbeat"],
        speed=r["speed"],
    )


def candidates(
    c: Conn,
    program_id: str,
    policy: scheduler.SelectionPolicy,
    own: list[scheduler.Candidate] | None = None,
) -> list[scheduler.Candidate]:
    """Pre-filter in SQL (ready, free slots, hard requirements), capped for speed.

    The program's own instances with a free slot are always included (locality);
    `own`: those, when the caller read them already (`own_candidates`).
    """
    where = ["state='ready'", "used_slots < slots", "draining=0"]
    args: list[Any] = []
    if policy.instance_type is not None:
        where.append("instance_type=?")
        args.append(policy.instance_type)
    if policy.min_price_micros is not None:
        where.append("price_micros_per_s>=?")
        args.append(policy.min_price_micros)
    if policy.max_price_micros is not None:
        where.append("price_micros_per_s<=?")
        args.append(policy.max_price_micros)
    if policy.tenancy is scheduler.Tenancy.DEDICATED:
        where.append("(dedicated_to=? OR (dedicated_to IS NULL AND used_slots=0))")
        args.append(program_id)
    else:
        where.append("dedicated_to IS NULL")
    cols = "name, instance_type, cpus, price_micros_per_s, storage, slots, used_slots, dedicated_to"
    rows = c.execute(
        f"SELECT {cols} FROM instances WHERE {' AND '.join(where)}"
        f" ORDER BY price_micros_per_s, used_slots, name LIMIT {CANDIDATES}",
        args,
    ).fetchall()
    seen: dict[str, scheduler.Candidate] = {}
    for r in rows:
        seen[r[0]] = scheduler.Candidate(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])
    for cand in own_candidates(c, program_id) if own is None else own:
        seen[cand.name] = cand
    return list(seen.values())


_OWN = (
    # CROSS JOIN fixes the loop order (SQLite's rule): the program's few placements
    # outside, instances by primary key inside; otherwise it walks every ready instance.
    "SELECT i.name, i.instance_type, i.cpus, i.price_micros_per_s, i.storage, i.slots,"
    " i.used_slots, i.dedicated_to FROM placements p CROSS JOIN instances i"
    " ON i.name=p.instance WHERE p.program_id=? AND i.state='ready' AND i.draining=0"
    " AND i.used_slots < i.slots"
)


def own_candidates(c: Conn, program_id: str) -> list[scheduler.Candidate]:
    """The ready instances the program already runs on that have a free slot (the
    scheduler passes over full ones: a wide program's full instances are not read)."""
    return [
        scheduler.Candidate(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])
        for r in c.execute(_OWN, (program_id,))
    ]


def move_slot(c: Conn, program_id: str, source: str, target: str) -> None:
    """One process of a program moved from `source` to `target`: its slot goes along.

    The home later releases it naming `source` (where it placed it): the move is
    remembered so that release follows it (`release_placed`).
    """
    r = c.execute(
        "SELECT processes, account_id, user_id FROM placements WHERE program_id=? AND instance=?",
        (program_id, source),
    ).fetchone()
    if r is None:
        return  # not counted there (released already): nothing to carry
    if r["processes"] <= 1:
        c.execute("DELETE FROM placements WHERE program_id=? AND instance=?", (program_id, source))
    else:
        c.execute(
            "UPDATE placements SET processes=processes-1 WHERE program_id=? AND instance=?",
            (program_id, source),
        )
    dedicated = c.execute(
        "SELECT 1 FROM instances WHERE name=? AND dedicated_to=?", (source, program_id)
    ).fetchone()
    free_slots(c, source, 1, program_id)
    c.execute(
        "INSERT INTO placements VALUES(?,?,1,?,?) ON CONFLICT(program_id, instance)"
        " DO UPDATE SET processes=processes+1",
        (program_id, target, r["account_id"], r["user_id"]),
    )
    c.execute(
        "UPDATE instances SET used_slots=used_slots+1,"
        " dedicated_to=CASE WHEN ? THEN ? ELSE dedicated_to END WHERE name=?",
        (dedicated is not None, program_id, target),
    )
    c.execute(
        "INSERT INTO placement_moves VALUES(?,?,?,1) ON CONFLICT(program_id, source, target)"
        " DO UPDATE SET processes=processes+1",
        (program_id, source, target),
    )


def release_placed(c: Conn, program_id: str, instance: str, n: int, hops: int = 8) -> int:
    """Release up to `n` of a program's processes placed on `instance`; how many were.

    Those that moved away are released where they went (placement_moves), the
    processes still placed on `instance` first.
    """
    done = 0
    r = c.execute(
        "SELECT processes FROM placements WHERE program_id=? AND instance=?",
        (program_id, instance),
    ).fetchone()
    moved = c.execute(
        "SELECT target, processes FROM placement_moves WHERE program_id=? AND source=?"
        " ORDER BY target",
        (program_id, instance),
    ).fetchall()
    stayed = r["processes"] if r is not None else 0
    k = min(n, stayed)  # which one ended is not said: those still here first
    if k > 0:
        if k == stayed:
            c.execute(
                "DELETE FROM placements WHERE program_id=? AND instance=?", (program_id, instance)
            )
        else:
            c.execute(
                "UPDATE placements SET processes=processes-? WHERE program_id=? AND instance=?",
                (k, program_id, instance),
            )
        free_slots(c, instance, k, program_id)
        done += k
    for m in moved:
        if done >= n or hops <= 0:
            break
        take = min(n - done, m["processes"])
        if m["processes"] == take:
            c.execute(
                "DELETE FROM placement_moves WHERE program_id=? AND source=? AND target=?",
                (program_id, instance, m["target"]),
            )
        else:
            c.execute(
                "UPDATE placement_moves SET processes=processes-?"
                " WHERE program_id=? AND source=? AND target=?",
                (take, program_id, instance, m["target"]),
            )
        done += release_placed(c, program_id, m["target"], take, hops - 1)
    return done


def free_slots(c: Conn, instance: str, n: int, program_id: str) -> None:
    """A program's `n` processes left an instance: free the slots (and the dedication)."""
    c.execute("UPDATE instances SET used_slots=max(used_slots-?, 0) WHERE name=?", (n, instance))
    c.execute(
        "UPDATE instances SET dedicated_to=NULL WHERE name=? AND dedicated_to=? AND"
        " NOT EXISTS (SELECT 1 FROM placements WHERE instance=? AND program_id=?)",
        (instance, program_id, instance, program_id),
    )
