"""Durable OSS state in SQLite (WAL, synchronous=FULL).

Threading: one writer thread owns the only write connection; readers use a
small thread pool, each thread with its own connection (WAL lets them read
while the writer writes).  Nothing touches SQLite on the event loop.

Group commit: the writer drains its queue and runs each queued operation in
its own SAVEPOINT inside one `BEGIN IMMEDIATE` transaction, then commits once
(one fsync) and only then resolves the callers' futures.  So:

* an acknowledged write is on disk (synchronous=FULL fsyncs the WAL at commit);
* operations are serialised, each sees every earlier one: the limit check and
  the reservation in `submit`/`place` are atomic (no concurrent overshoot), and
  BEGIN IMMEDIATE keeps that true even if a second process opened the file;
* a failing operation rolls back to its savepoint alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from oss.billing import limits as lim
from oss.billing import pricing
from oss.compute import scheduler
from oss.compute.pool import InstanceType, PoolState
from oss.db import datadir
from oss.db.migrations import Version, migrate
from oss.errors import Conflict, NoCapacity, NotFound, StoreError, Unauthorized
from oss.telemetry import logs as logmod

log = logging.getLogger(__name__)
T = TypeVar("T")
Conn = sqlite3.Connection

ACTIVE = ("pending", "running", "recovering")

CANDIDATES = 32  # instances the SQL pre-filter hands the scheduler (plus the program's own)


def hash_token(token: str) -> str:
    """Tokens are 256-bit random, so a plain SHA-256 is a sound verifier."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_id(prefix: str) -> str:
    """A random object id."""
    return f"{prefix}_{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an account user."""

    account_id: str
    user_id: str
    admin: bool
    token_id: str


@dataclass(frozen=True, slots=True)
class MeterResult:
    """What a metering pass did."""

    records: int
    stopped: tuple[tuple[str, str], ...]  # (program id, reason)


def _j(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


class _Writer:
    """The writer thread: group commit of queued operations."""

    def __init__(self, path: Path, versions: Sequence[Version]) -> None:
        self._path = path
        self._versions = versions
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="oss-store-writer", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closed = False

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise StoreError(str(self._error)) from self._error

    def stop(self) -> None:
        self._closed = True
        self._q.put(None)
        self._thread.join()

    def submit(self, fn: Callable[[Conn], Any], fut: asyncio.Future[Any]) -> None:
        # Checked here so a write after close fails instead of waiting forever.
        if self._closed or not self._thread.is_alive():
            raise StoreError("the store is closed")
        self._q.put((fn, fut))

    def _run(self) -> None:
        try:
            conn = connect(self._path)
            migrate(conn, self._versions)
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        stop = False
        while not stop:
            item = self._q.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < 512:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(conn, batch)
        conn.close()

    @staticmethod
    def _commit(conn: Conn, batch: list[tuple[Callable[[Conn], Any], asyncio.Future[Any]]]) -> None:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut in batch:
                conn.execute("SAVEPOINT op")
                try:
                    r = fn(conn)
                except BaseException as exc:  # the op's own failure: roll back just it
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((fut, None, exc))
                else:
                    conn.execute("RELEASE op")
                    results.append((fut, r, None))
            conn.execute("COMMIT")
        except Exception as exc:  # disk full, I/O error...: the whole batch fails, loudly
            log.exception("store commit failed")
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("store rollback failed")
            err = StoreError(f"commit failed: {exc}")
            results = [(fut, None, err) for _, fut in batch]
        # One wake-up per loop for the whole batch, not one per operation.
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for item in results:
            by_loop.setdefault(item[0].get_loop(), []).append(item)
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_resolve_all, items)


def _resolve_all(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, r, e in items:
        if fut.cancelled():
            continue
        if e is not None:
            fut.set_exception(e)
        else:
            fut.set_result(r)


def connect(path: Path) -> Conn:
    """A connection with the OSS pragmas (autocommit: transactions are explicit)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class Store:
    """Async facade over the SQLite state."""

    def __init__(
        self,
        data_dir: Path,
        versions: Sequence[Version],
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`versions`: the schema sequence to migrate to (oss.schema.VERSIONS)."""
        self.path = datadir.prepare(data_dir)
        self.clock = clock
        self._writer = _Writer(self.path, versions)
        self._local = threading.local()
        self._readers: ThreadPoolExecutor | None = None
        self._reader_conns: list[Conn] = []
        self._lock = threading.Lock()
        self._closed = False

    async def open(self) -> None:
        """Start the writer (runs migrations) and the readers."""
        await asyncio.to_thread(self._writer.start)
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="oss-store-reader")

    async def close(self) -> None:
        """Finish queued writes and close every connection."""
        self._closed = True
        await asyncio.to_thread(self._writer.stop)
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        with self._lock:
            for c in self._reader_conns:
                c.close()
            self._reader_conns.clear()

    async def write(self, fn: Callable[[Conn], T]) -> T:
        """Run `fn` in the writer's transaction; returns after the commit is durable."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writer.submit(fn, fut)
        return await fut

    async def read(self, fn: Callable[[Conn], T]) -> T:
        """Run `fn` on a reader connection (sees committed state)."""
        if self._readers is None or self._closed:
            raise StoreError("the store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._read, fn)

    def _read(self, fn: Callable[[Conn], T]) -> T:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    # -- accounts, users, tokens ---------------------------------------------

    async def create_account(
        self, name: str, admin: bool, pricing_model: str, user: str, allow_root: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any], str]:
        """Create an account, its first user and a token; return (account, user, token)."""
        token = "dcp_" + secrets.token_urlsafe(32)
        now = self.clock()

        def op(c: Conn) -> tuple[dict[str, Any], dict[str, Any], str]:
            if c.execute("SELECT 1 FROM accounts WHERE name=?", (name,)).fetchone():
                raise Conflict(f"account {name!r} exists")
            aid, uid = new_id("acct"), new_id("user")
            c.execute(
                "INSERT INTO accounts(id, name, admin, pricing_model, created, allow_root)"
                " VALUES(?,?,?,?,?,?)",
                (aid, name, int(admin), pricing_model, now, int(allow_root)),
            )
            c.execute(
                "INSERT INTO users(id, account_id, name, created) VALUES(?,?,?,?)",
                (uid, aid, user, now),
            )
            c.execute(
                "INSERT INTO tokens VALUES(?,?,?,?,?,?,0)",
                (new_id("tok"), uid, aid, hash_token(token), "initial", now),
            )
            acct = dict(id=aid, name=name, admin=admin, pricing_model=pricing_model, created=now)
            return acct, dict(id=uid, account_id=aid, name=user, created=now), token

        return await self.write(op)

    async def authenticate(self, token: str) -> Principal:
        """The principal a bearer token stands for (Unauthorized if none)."""
        h = hash_token(token)

        def op(c: Conn) -> Principal:
            r = c.execute(
                "SELECT t.id, t.user_id, t.account_id, a.admin FROM tokens t JOIN accounts a"
                " ON a.id=t.account_id WHERE t.hash=? AND t.revoked=0",
                (h,),
            ).fetchone()
            if r is None:
                raise Unauthorized()
            return Principal(r["account_id"], r["user_id"], bool(r["admin"]), r["id"])

        return await self.read(op)

    async def authenticate_instance(self, token: str) -> str:
        """The instance name an instance token stands for."""
        h = hash_token(token)

        def op(c: Conn) -> str:
            r = c.execute("SELECT instance FROM instance_tokens WHERE hash=?", (h,)).fetchone()
            if r is None:
                raise Unauthorized()
            return str(r["instance"])

        return await self.read(op)

    async def accounts(self, account_id: str | None) -> list[dict[str, Any]]:
        """All accounts (None) or one."""

        def op(c: Conn) -> list[dict[str, Any]]:
            q = (
                "SELECT id, name, admin, pricing_model, created FROM accounts"
                + (" WHERE id=?" if account_id else "")
                + " ORDER BY created"
            )
            rows = c.execute(q, (account_id,) if account_id else ()).fetchall()
            return [dict(r) | {"admin": bool(r["admin"])} for r in rows]

        return await self.read(op)

    async def create_user(self, account_id: str, name: str) -> dict[str, Any]:
        """Add a user to an account."""
        now = self.clock()

        def op(c: Conn) -> dict[str, Any]:
            if c.execute(
                "SELECT 1 FROM users WHERE account_id=? AND name=?", (account_id, name)
            ).fetchone():
                raise Conflict(f"user {name!r} exists")
            uid = new_id("user")
            c.execute(
                "INSERT INTO users(id, account_id, name, created) VALUES(?,?,?,?)",
                (uid, account_id, name, now),
            )
            return dict(id=uid, account_id=account_id, name=name, created=now)

        return await self.write(op)

    async def users(self, account_id: str, user_id: str | None = None) -> list[dict[str, Any]]:
        """The account's users (or one of them; NotFound if not in the account)."""

        def op(c: Conn) -> list[dict[str, Any]]:
            if user_id is None:
                rows = c.execute(
                    "SELECT id, account_id, name, created FROM users WHERE account_id=?"
                    " ORDER BY created",
                    (account_id,),
                ).fetchall()
            else:
                rows = c.execute(
                    "SELECT id, account_id, name, created FROM users WHERE account_id=? AND id=?",
                    (account_id, user_id),
                ).fetchall()
                if not rows:
                    raise NotFound(f"user {user_id}")
            return [dict(r) for r in rows]

        return await self.read(op)

    async def create_token(self, account_id: str, user_id: str, label: str) -> dict[str, Any]:
        """Mint a token for a user of the account."""
        token = "dcp_" + secrets.token_urlsafe(32)
        now = self.clock()

        def op(c: Conn) -> dict[str, Any]:
            if not c.execute(
                "SELECT 1 FROM users WHERE id=? AND account_id=?", (user_id, account_id)
            ).fetchone():
                raise NotFound(f"user {user_id}")
            tid = new_id("tok")
            c.execute(
                "INSERT INTO tokens VALUES(?,?,?,?,?,?,0)",
                (tid, user_id, account_id, hash_token(token), label, now),
            )
            return dict(
                id=tid, user_id=user_id, label=label, created=now, revoked=False, token=token
            )

        return await self.write(op)

    async def tokens(self, account_id: str) -> list[dict[str, Any]]:
        """The account's tokens (metadata only)."""

        def op(c: Conn) -> list[dict[str, Any]]:
            rows = c.execute(
                "SELECT id, user_id, label, created, revoked FROM tokens WHERE account_id=?"
                " ORDER BY created",
                (account_id,),
            ).fetchall()
            return [dict(r) | {"revoked": bool(r["revoked"])} for r in rows]

        return await self.read(op)

    async def revoke_token(self, account_id: str, token_id: str) -> None:
        """Revoke a token of the account."""

        def op(c: Conn) -> None:
            cur = c.execute(
                "UPDATE tokens SET revoked=1 WHERE id=? AND account_id=?", (token_id, account_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"token {token_id}")

        await self.write(op)

    # -- instance credentials --------------------------------------------------

    async def mint_instance_token(self, instance: str, pool: str | None = None) -> str:
        """Create (or re-key) instance `instance` and return its new bearer token."""
        token = "dcpi_" + secrets.token_urlsafe(32)
        now = self.clock()

        def op(c: Conn) -> str:
            _mint_instance(c, instance, pool, token, now)
            return token

        return await self.write(op)

    # -- limits and policies -------------------------------------------------

    async def get_limits(self, scope: str, scope_id: str) -> dict[str, Any]:
        """Limits at one scope (empty dict: unlimited)."""
        return await self.read(lambda c: _limits(c, scope, scope_id))

    async def set_limits(self, scope: str, scope_id: str, body: Mapping[str, Any]) -> None:
        """Replace the limits at one scope."""

        def op(c: Conn) -> None:
            c.execute("INSERT OR REPLACE INTO limits VALUES(?,?,?)", (scope, scope_id, _j(body)))

        await self.write(op)

    async def get_policies(self, account_id: str) -> dict[str, Any]:
        """The account's default policies."""

        def op(c: Conn) -> dict[str, Any]:
            r = c.execute("SELECT body FROM policies WHERE account_id=?", (account_id,)).fetchone()
            return json.loads(r["body"]) if r else {}

        return await self.read(op)

    async def set_policies(self, account_id: str, body: Mapping[str, Any]) -> None:
        """Replace the account's default policies."""

        def op(c: Conn) -> None:
            c.execute("INSERT OR REPLACE INTO policies VALUES(?,?)", (account_id, _j(body)))

        await self.write(op)

    # -- instance types, pools, instances ------------------------------------

    async def put_instance_type(self, t: InstanceType) -> None:
        """Create or replace an instance type."""

        def op(c: Conn) -> None:
            c.execute(
                "INSERT OR REPLACE INTO instance_types VALUES(?,?,?,?,?)",
                (t.name, t.cpus, t.memory_mb, t.price_micros_per_s, t.storage),
            )

        await self.write(op)

    async def instance_types(self) -> list[InstanceType]:
        """All instance types."""

        def op(c: Conn) -> list[InstanceType]:
            return [
                InstanceType(
                    r["name"], r["cpus"], r["memory_mb"], r["price_micros_per_s"], r["storage"]
                )
                for r in c.execute("SELECT * FROM instance_types ORDER BY name")
            ]

        return await self.read(op)

    async def put_pool(
        self, name: str, instance_type: str, warm_target: int, max_size: int, provider: str
    ) -> None:
        """Create or resize a pool."""
        now = self.clock()

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

        await self.write(op)

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

        return await self.read(op)

    async def pool_states(self) -> list[tuple[PoolState, str, InstanceType]]:
        """Every pool's fill state, provider name and instance type."""

        def op(c: Conn) -> list[tuple[PoolState, str, InstanceType]]:
            out = []
            for p in c.execute(
                "SELECT p.*, t.cpus, t.memory_mb, t.price_micros_per_s, t.storage FROM pools p"
                " JOIN instance_types t ON t.name=p.instance_type ORDER BY p.name"
            ).fetchall():
                rows = c.execute(
                    "SELECT name, state, used_slots FROM instances WHERE pool=? AND"
                    " state IN ('pending','ready') ORDER BY created, name",
                    (p["name"],),
                ).fetchall()
                idle = tuple(
                    r["name"] for r in rows if r["state"] == "ready" and r["used_slots"] == 0
                )
                pending = sum(1 for r in rows if r["state"] == "pending")
                st = PoolState(p["name"], p["warm_target"], p["max_size"], len(rows), idle, pending)
                it = InstanceType(
                    p["instance_type"],
                    p["cpus"],
                    p["memory_mb"],
                    p["price_micros_per_s"],
                    p["storage"],
                )
                out.append((st, p["provider"], it))
            return out

        return await self.read(op)

    async def new_pool_instance(self, pool: str) -> tuple[str, str]:
        """Create a pending instance in a pool; return (name, token)."""
        token = "dcpi_" + secrets.token_urlsafe(32)
        now = self.clock()

        def op(c: Conn) -> tuple[str, str]:
            name = f"{pool}-{secrets.token_hex(3)}"
            _mint_instance(c, name, pool, token, now)
            return name, token

        return await self.write(op)

    async def set_instance_state(self, name: str, state: str) -> None:
        """Move an instance to a new state (pending/ready/failed/destroyed)."""

        def op(c: Conn) -> None:
            c.execute("UPDATE instances SET state=? WHERE name=?", (state, name))

        await self.write(op)

    async def register_instance(
        self,
        name: str,
        address: str,
        hostname: str,
        cpus: int,
        memory_mb: int,
        slots_per_cpu: int,
        exec_key: str | None = None,
    ) -> None:
        """An agent registered: the instance is ready (with its exec key, if it sent one)."""
        now = self.clock()

        def op(c: Conn) -> None:
            r = c.execute("SELECT * FROM instances WHERE name=?", (name,)).fetchone()
            if r is None:
                raise NotFound(f"instance {name}")
            if r["state"] == "destroyed":
                raise Conflict(f"instance {name} was destroyed")
            c.execute(
                "UPDATE instances SET state='ready', address=?, hostname=?, cpus=?, memory_mb=?,"
                " slots=?, last_heartbeat=?, exec_key=? WHERE name=?",
                (address, hostname, cpus, memory_mb, cpus * slots_per_cpu, now, exec_key, name),
            )

        await self.write(op)

    async def flush_heartbeats(self, beats: Mapping[str, tuple[float, str]]) -> None:
        """Persist the latest heartbeat time and load of many instances."""

        def op(c: Conn) -> None:
            c.executemany(
                "UPDATE instances SET last_heartbeat=?, load=? WHERE name=? AND state='ready'",
                [(ts, load, name) for name, (ts, load) in beats.items()],
            )

        await self.write(op)

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

        return await self.read(op)

    async def ready_instances(self) -> dict[str, float]:
        """Ready instances and their last persisted heartbeat."""

        def op(c: Conn) -> dict[str, float]:
            return {
                r["name"]: float(r["last_heartbeat"] or 0.0)
                for r in c.execute("SELECT name, last_heartbeat FROM instances WHERE state='ready'")
            }

        return await self.read(op)

    async def fail_instances(self, names: Sequence[str], reason: str) -> list[str]:
        """Mark instances failed; their programs lose those processes and need recovery.

        Returns the ids of the programs marked for recovery.
        """
        now = self.clock()

        def op(c: Conn) -> list[str]:
            affected: list[str] = []
            for name in names:
                cur = c.execute(
                    "UPDATE instances SET state='failed', used_slots=0, dedicated_to=NULL"
                    " WHERE name=? AND state='ready'",
                    (name,),
                )
                if cur.rowcount == 0:
                    continue
                for p in c.execute(
                    "SELECT program_id, processes FROM placements WHERE instance=?", (name,)
                ).fetchall():
                    c.execute(
                        "UPDATE programs SET state='recovering', lost_processes=lost_processes+?,"
                        " processes=processes-?, status_reason=?, updated=? WHERE id=? AND"
                        " state IN ('running','recovering')",
                        (
                            p["processes"],
                            p["processes"],
                            f"instance {name} failed: {reason}",
                            now,
                            p["program_id"],
                        ),
                    )
                    affected.append(p["program_id"])
                c.execute("DELETE FROM placements WHERE instance=?", (name,))
            return affected

        return await self.write(op)

    # -- programs ------------------------------------------------------------

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
        now = self.clock()
        pid = new_id("prog")

        def op(c: Conn) -> dict[str, Any]:
            policy = spec["resource_policy"]
            scaling = spec["scaling_policy"]
            if slots_limits:
                c.execute("INSERT INTO limits VALUES('program',?,?)", (pid, _j(dict(slots_limits))))
            c.execute(
                "INSERT INTO programs(id, account_id, user_id, state, status_reason, argv, env,"
                " cwd, image, processes, target_instances, resource_policy, scaling_policy,"
                " storage_mb, bandwidth_mbps, created, updated, last_metered)"
                " VALUES(?,?,?,'pending','waiting for capacity',?,?,?,?,0,?,?,?,?,?,?,?,?)",
                (
                    pid,
                    who.account_id,
                    who.user_id,
                    _j(spec["argv"]),
                    _j(spec["env"]),
                    spec["cwd"],
                    spec["image"],
                    scaling["min_instances"],
                    _j(policy),
                    _j(scaling),
                    0,
                    0,
                    now,
                    now,
                    now,
                ),
            )
            # Storage and bandwidth are reserved whether or not it places now.
            _check_limits(c, pid, lim.Delta(0, spec["storage_mb"], spec["bandwidth_mbps"]))
            c.execute(
                "UPDATE programs SET storage_mb=?, bandwidth_mbps=? WHERE id=?",
                (spec["storage_mb"], spec["bandwidth_mbps"], pid),
            )
            try:
                _place(c, pid, spec["processes"], now)
            except NoCapacity:
                c.execute(
                    "UPDATE programs SET lost_processes=? WHERE id=?", (spec["processes"], pid)
                )
            return _program(c, pid, who.account_id)

        return await self.write(op)

    async def place(
        self, account_id: str, program_id: str, processes: int, avoid: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """Place more processes of an active program (limits checked atomically)."""
        now = self.clock()

        def op(c: Conn) -> list[dict[str, Any]]:
            p = _program_row(c, program_id, account_id)
            if p["state"] not in ("running", "recovering"):
                raise Conflict(f"program {program_id} is {p['state']}")
            return _place(c, program_id, processes, now, frozenset(avoid))

        return await self.write(op)

    async def allows_root(self, account_id: str) -> bool:
        """May the account's exec tickets name uid 0 or gid 0 (operator's choice)?"""

        def op(c: Conn) -> bool:
            r = c.execute("SELECT allow_root FROM accounts WHERE id=?", (account_id,)).fetchone()
            return bool(r and r[0])

        return await self.read(op)

    async def exec_targets(self, names: Sequence[str]) -> dict[str, tuple[str, str]]:
        """{instance: (agent address, exec key)} for the ready ones that registered a key."""

        def op(c: Conn) -> dict[str, tuple[str, str]]:
            q = (
                "SELECT name, address, exec_key FROM instances WHERE state='ready' AND"
                f" exec_key IS NOT NULL AND address IS NOT NULL AND name IN"
                f" ({','.join('?' * len(names))})"
            )
            return {r[0]: (r[1], r[2]) for r in c.execute(q, list(names))}

        return await self.read(op) if names else {}

    async def retry_waiting(self) -> list[str]:
        """Place what pending and recovering programs still miss; return programs now running."""
        now = self.clock()

        def op(c: Conn) -> list[str]:
            done = []
            for r in c.execute(
                "SELECT id, lost_processes FROM programs WHERE state IN ('pending','recovering')"
                " ORDER BY created"
            ).fetchall():
                c.execute("SAVEPOINT retry")
                try:
                    if r["lost_processes"] > 0:
                        _place(c, r["id"], r["lost_processes"], now)
                    c.execute(
                        "UPDATE programs SET state='running', lost_processes=0, status_reason=?"
                        " WHERE id=?",
                        ("running", r["id"]),
                    )
                except (NoCapacity, lim.LimitExceeded, lim.BudgetExhausted):
                    c.execute("ROLLBACK TO retry")
                    c.execute("RELEASE retry")
                    continue
                c.execute("RELEASE retry")
                done.append(r["id"])
            return done

        return await self.write(op)

    async def release(self, account_id: str, program_id: str, instance: str, n: int) -> None:
        """Some of a program's processes on an instance ended."""

        def op(c: Conn) -> None:
            _program_row(c, program_id, account_id)
            r = c.execute(
                "SELECT processes FROM placements WHERE program_id=? AND instance=?",
                (program_id, instance),
            ).fetchone()
            if r is None:
                raise NotFound(f"placement of {program_id} on {instance}")
            k = min(n, r["processes"])
            if k == r["processes"]:
                c.execute(
                    "DELETE FROM placements WHERE program_id=? AND instance=?",
                    (program_id, instance),
                )
            else:
                c.execute(
                    "UPDATE placements SET processes=processes-? WHERE program_id=? AND instance=?",
                    (k, program_id, instance),
                )
            c.execute("UPDATE programs SET processes=processes-? WHERE id=?", (k, program_id))
            _free_slots(c, instance, k, program_id)

        await self.write(op)

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
        now = self.clock()

        def op(c: Conn) -> dict[str, Any]:
            p = _program_row(c, program_id, account_id)
            if p["state"] not in ACTIVE:
                raise Conflict(f"program {program_id} already {p['state']}")
            _end(c, program_id, state, reason, exit_status, signal, now)
            return _program(c, program_id, p["account_id"])

        return await self.write(op)

    async def program(self, account_id: str, program_id: str) -> dict[str, Any]:
        """One program of the account."""
        return await self.read(lambda c: _program(c, program_id, account_id))

    async def instance_programs(self, instance: str) -> set[str]:
        """Ids of programs placed on an instance."""

        def op(c: Conn) -> set[str]:
            return {
                r[0]
                for r in c.execute(
                    "SELECT program_id FROM placements WHERE instance=?", (instance,)
                )
            }

        return await self.read(op)

    async def check_placed(self, account_id: str, program_id: str, instance: str | None) -> None:
        """NotFound unless the account's program exists (and is placed on `instance`)."""

        def op(c: Conn) -> None:
            _program_row(c, program_id, account_id)
            if (
                instance is not None
                and not c.execute(
                    "SELECT 1 FROM placements WHERE program_id=? AND instance=?",
                    (program_id, instance),
                ).fetchone()
            ):
                raise NotFound(f"program {program_id} is not placed on instance {instance}")

        await self.read(op)

    async def programs(
        self, account_id: str, state: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """The account's programs, newest first."""

        def op(c: Conn) -> list[dict[str, Any]]:
            q = "SELECT id FROM programs WHERE account_id=?" + (" AND state=?" if state else "")
            args: list[Any] = [account_id] + ([state] if state else [])
            ids = [r["id"] for r in c.execute(q + " ORDER BY created DESC LIMIT ?", (*args, limit))]
            return [_program(c, i, account_id) for i in ids]

        return await self.read(op)

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
                p = _program(c, i, None)
                p["headroom"] = _headroom(c, i)
                p["budget_micros"] = _limits(c, "program", i).get("budget_micros")
                p["cpus"] = c.execute(
                    "SELECT coalesce(sum(i.cpus),0) FROM placements pl JOIN instances i"
                    " ON i.name=pl.instance WHERE pl.program_id=?",
                    (i,),
                ).fetchone()[0]
                out.append(p)
            return out

        return await self.read(op)

    async def set_target(self, program_id: str, target: int) -> None:
        """Set a program's target width (the optimizer's decision)."""

        def op(c: Conn) -> None:
            c.execute("UPDATE programs SET target_instances=? WHERE id=?", (target, program_id))

        await self.write(op)

    # -- metering and billing ------------------------------------------------

    async def meter(self, rates: pricing.Rates, net_bytes: Mapping[str, int]) -> MeterResult:
        """Bill every running program for the whole seconds since it was last metered.

        Then stop programs whose spending reached a hard budget at any level.
        """
        now = self.clock()

        def op(c: Conn) -> MeterResult:
            n = 0
            for p in c.execute(
                "SELECT p.*, a.pricing_model FROM programs p JOIN accounts a ON a.id=p.account_id"
                " WHERE p.state IN ('running','recovering')"
            ).fetchall():
                secs = pricing.whole_seconds(p["last_metered"], now)
                if secs == 0:
                    continue
                uses = [
                    pricing.InstanceUse(
                        r["instance"],
                        r["price_micros_per_s"],
                        r["processes"],
                        r["slots"],
                        r["dedicated_to"] == p["id"],
                    )
                    for r in c.execute(
                        "SELECT pl.instance, pl.processes, i.price_micros_per_s, i.slots,"
                        " i.dedicated_to FROM placements pl JOIN instances i ON i.name=pl.instance"
                        " WHERE pl.program_id=?",
                        (p["id"],),
                    )
                ]
                m = pricing.Metered(secs, uses, p["storage_mb"], net_bytes.get(p["id"], 0))
                model = pricing.PricingModel(p["pricing_model"])
                ch = pricing.charge(m, model, rates)
                end = p["last_metered"] + secs
                detail = dict(
                    instance_micros=float(ch.instance_micros),
                    storage_micros=float(ch.storage_micros),
                    net_micros=float(ch.net_micros),
                    premium_micros=float(ch.premium_micros),
                )
                c.execute(
                    "INSERT INTO billing(program_id, account_id, user_id, start, end, seconds,"
                    " model, amount_micros, detail) VALUES(?,?,?,?,?,?,?,?,?)",
                    (
                        p["id"],
                        p["account_id"],
                        p["user_id"],
                        p["last_metered"],
                        end,
                        secs,
                        model.value,
                        ch.amount_micros,
                        _j(detail),
                    ),
                )
                c.execute(
                    "UPDATE programs SET spent_micros=spent_micros+?, last_metered=? WHERE id=?",
                    (ch.amount_micros, end, p["id"]),
                )
                c.execute(
                    "UPDATE accounts SET spent_micros=spent_micros+? WHERE id=?",
                    (ch.amount_micros, p["account_id"]),
                )
                c.execute(
                    "UPDATE users SET spent_micros=spent_micros+? WHERE id=?",
                    (ch.amount_micros, p["user_id"]),
                )
                n += 1
            stopped = []
            # Only programs under some hard budget can be stopped: find those first.
            hard = {
                (r[0], r[1])
                for r in c.execute(
                    "SELECT scope, scope_id FROM limits"
                    " WHERE json_extract(body, '$.hard_budget_micros') IS NOT NULL"
                )
            }
            for p in c.execute(
                "SELECT id, account_id, user_id FROM programs"
                " WHERE state IN ('running','recovering','pending')"
            ).fetchall():
                if not hard & {
                    ("account", p["account_id"]),
                    ("user", p["user_id"]),
                    ("program", p["id"]),
                }:
                    continue
                levels = _levels(c, p["id"])
                for level, limits_, use in levels:
                    if lim.budget_state(use.spent_micros, limits_) is lim.BudgetState.HARD_STOP:
                        reason = (
                            f"stopped: {level.value} hard budget of {limits_.hard_budget_micros}"
                            f" micros reached (spent {use.spent_micros})"
                        )
                        _end(c, p["id"], "stopped_budget", reason, None, None, now)
                        stopped.append((p["id"], reason))
                        break
            return MeterResult(n, tuple(stopped))

        return await self.write(op)

    async def billing(
        self, account_id: str, program_id: str | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """The account's (or one program's) billing records and total."""

        def op(c: Conn) -> tuple[int, list[dict[str, Any]]]:
            if program_id is not None:
                _program_row(c, program_id, account_id)
            q = "SELECT * FROM billing WHERE account_id=?" + (
                " AND program_id=?" if program_id else ""
            )
            args = (account_id, program_id) if program_id else (account_id,)
            rows = c.execute(q + " ORDER BY id", args).fetchall()
            recs = [
                dict(
                    id=r["id"],
                    program_id=r["program_id"],
                    user_id=r["user_id"],
                    start=r["start"],
                    end=r["end"],
                    seconds=r["seconds"],
                    model=r["model"],
                    amount_micros=r["amount_micros"],
                    **json.loads(r["detail"]),
                )
                for r in rows
            ]
            return sum(r["amount_micros"] for r in recs), recs

        return await self.read(op)

    # -- logs ----------------------------------------------------------------

    async def append_logs(
        self,
        account_id: str | None,
        program_id: str | None,
        lines: Sequence[logmod.LogLine],
        instance_owner: str | None = None,
    ) -> int:
        """Append lines (zstd chunks of up to CHUNK_LINES per instance); durable on return."""
        groups: dict[str | None, list[logmod.LogLine]] = {}
        for ln in lines:
            groups.setdefault(ln.instance, []).append(ln)
        blobs = [
            (inst, chunk[0].ts, chunk[-1].ts, len(chunk), logmod.encode(chunk))
            for inst, g in groups.items()
            for chunk in logmod.chunks_of(g)
        ]

        def op(c: Conn) -> int:
            acct = account_id
            if program_id is not None:
                p = _program_row(c, program_id, account_id)
                acct = p["account_id"]
                if (
                    instance_owner is not None
                    and not c.execute(
                        "SELECT 1 FROM placements WHERE program_id=? AND instance=?",
                        (program_id, instance_owner),
                    ).fetchone()
                ):
                    raise NotFound(f"program {program_id} on instance {instance_owner}")
            for inst, lo, hi, n, blob in blobs:
                c.execute(
                    "INSERT INTO log_chunks(account_id, program_id, instance, ts_min, ts_max,"
                    " n, data) VALUES(?,?,?,?,?,?,?)",
                    (acct, program_id, inst, lo, hi, n, blob),
                )
            return sum(b[3] for b in blobs)

        return await self.write(op)

    async def read_logs(
        self, account_id: str | None, program_id: str | None, q: logmod.LogQuery
    ) -> tuple[list[tuple[int, logmod.LogLine]], int, int]:
        """A page of a program's log (or the OSS log: program None) from `q.cursor`.

        Returns (lines, the cursor after them, chunks decoded).  Chunks are read
        and decompressed one at a time on a reader thread, up to the one holding
        the page's last line: the cost follows what is returned, not the log size.
        """
        start_chunk, _ = logmod.split_cursor(q.cursor)

        def op(c: Conn) -> tuple[list[tuple[int, logmod.LogLine]], int, int]:
            if program_id is not None:
                _program_row(c, program_id, account_id)
            # The last chunk first: chunks committed while this page is read are not
            # skipped by the cursor (the read transaction is one snapshot anyway).
            last = c.execute(
                "SELECT coalesce(max(id), 0) FROM log_chunks WHERE program_id IS ?", (program_id,)
            ).fetchone()[0]
            where = ["program_id IS ?", "id >= ?", "id <= ?"]
            args: list[Any] = [program_id, start_chunk, last]
            if q.instance is not None:
                where.append("instance IS ?")
                args.append(q.instance)
            if q.since is not None:
                where.append("ts_max >= ?")
                args.append(q.since)
            if q.until is not None:
                where.append("ts_min <= ?")
                args.append(q.until)
            rows = c.execute(
                "SELECT id, data FROM log_chunks WHERE " + " AND ".join(where) + " ORDER BY id",
                args,
            )
            lines, after, decoded = logmod.page(((r[0], r[1]) for r in rows), q)
            if after is None:  # read to the end: resume after the last chunk
                after = max(q.cursor, logmod.cursor(last + 1, 0))
            return lines, after, decoded

        return await self.read(op)

    # -- leases (locking service) ------------------------------------------

    async def lease_op(self, fn: Callable[[Conn], T]) -> T:
        """Run a lease transaction (oss.ipc.locking builds `fn`)."""
        return await self.write(fn)


# -- helpers run inside transactions (writer or reader thread) -----------------


def _mint_instance(c: Conn, name: str, pool: str | None, token: str, now: float) -> None:
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
    )


def _limits(c: Conn, scope: str, scope_id: str) -> dict[str, Any]:
    r = c.execute(
        "SELECT body FROM limits WHERE scope=? AND scope_id=?", (scope, scope_id)
    ).fetchone()
    return json.loads(r["body"]) if r else {}


def _program_row(c: Conn, program_id: str, account_id: str | None) -> sqlite3.Row:
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


def _program(c: Conn, program_id: str, account_id: str | None) -> dict[str, Any]:
    r = _program_row(c, program_id, account_id)
    d = dict(r)
    for k in ("argv", "env", "resource_policy", "scaling_policy"):
        d[k] = json.loads(d[k])
    d.pop("last_metered")
    d["placements"] = [
        dict(instance=p["instance"], processes=p["processes"])
        for p in c.execute(
            "SELECT instance, processes FROM placements WHERE program_id=? ORDER BY instance",
            (program_id,),
        )
    ]
    return d


def _usage(c: Conn, col: str, val: str) -> lim.Usage:
    """Usage of active programs where `col` (account_id/user_id/id) = val."""
    if col == "id":
        inst = c.execute("SELECT count(*) FROM placements WHERE program_id=?", (val,)).fetchone()[0]
        r = c.execute(
            "SELECT storage_mb, bandwidth_mbps, spent_micros FROM programs WHERE id=?", (val,)
        ).fetchone()
        return lim.Usage(inst, r[0], r[1], r[2])
    inst = c.execute(
        f"SELECT count(DISTINCT instance) FROM placements WHERE {col}=?", (val,)
    ).fetchone()[0]
    r = c.execute(
        f"SELECT coalesce(sum(storage_mb),0), coalesce(sum(bandwidth_mbps),0) FROM programs"
        f" WHERE {col}=? AND state IN ('pending','running','recovering')",
        (val,),
    ).fetchone()
    table = "accounts" if col == "account_id" else "users"
    spent = c.execute(f"SELECT spent_micros FROM {table} WHERE id=?", (val,)).fetchone()[0]
    return lim.Usage(inst, r[0], r[1], spent)


def _as_limits(d: Mapping[str, Any]) -> lim.Limits:
    return lim.Limits(**{k: d.get(k) for k in lim.Limits.__dataclass_fields__})


def _levels(c: Conn, program_id: str) -> list[tuple[lim.Level, lim.Limits, lim.Usage]]:
    """Limits and usage at each level.  A level without any limit gets zero usage
    without querying it: with every limit None, no check can fail there."""
    p = c.execute("SELECT account_id, user_id FROM programs WHERE id=?", (program_id,)).fetchone()
    out = []
    for level, scope, col, sid in (
        (lim.Level.ACCOUNT, "account", "account_id", p[0]),
        (lim.Level.USER, "user", "user_id", p[1]),
        (lim.Level.PROGRAM, "program", "id", program_id),
    ):
        limits_ = _as_limits(_limits(c, scope, sid))
        use = _usage(c, col, sid) if limits_ != _NO_LIMITS else lim.Usage()
        out.append((level, limits_, use))
    return out


_NO_LIMITS = lim.Limits()


def _check_limits(c: Conn, program_id: str, delta: lim.Delta) -> None:
    lim.check(_levels(c, program_id), delta)


def _headroom(c: Conn, program_id: str) -> int:
    """How many more instances the limits allow this program (large if unlimited)."""
    room = 1 << 30
    for _, limits_, use in _levels(c, program_id):
        if limits_.max_instances is not None:
            room = min(room, limits_.max_instances - use.instances)
        if lim.budget_state(use.spent_micros, limits_) is not lim.BudgetState.OK:
            room = 0
    return max(room, 0)


def _candidates(
    c: Conn, program_id: str, policy: scheduler.SelectionPolicy
) -> list[scheduler.Candidate]:
    """Pre-filter in SQL (ready, free slots, hard requirements), capped for speed.

    The program's own instances are always included (locality).
    """
    where = ["state='ready'", "used_slots < slots"]
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
    # CROSS JOIN fixes the loop order (SQLite's rule): the program's few placements
    # outside, instances by primary key inside; otherwise it walks every ready instance.
    icols = ", ".join(f"i.{x.strip()}" for x in cols.split(","))
    own = c.execute(
        f"SELECT {icols} FROM placements p CROSS JOIN instances i ON i.name=p.instance"
        " WHERE p.program_id=? AND i.state='ready'",
        (program_id,),
    ).fetchall()
    seen: dict[str, scheduler.Candidate] = {}
    for r in [*rows, *own]:
        seen[r[0]] = scheduler.Candidate(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])
    return list(seen.values())


def _place(
    c: Conn, program_id: str, processes: int, now: float, avoid: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """Decide (scheduler), check limits, reserve: one atomic step in the caller's transaction."""
    p = c.execute(
        "SELECT account_id, user_id, resource_policy, target_instances FROM programs WHERE id=?",
        (program_id,),
    ).fetchone()
    rp = json.loads(p["resource_policy"])
    policy = scheduler.SelectionPolicy(
        rp.get("instance_type"),
        rp.get("min_price_micros"),
        rp.get("max_price_micros"),
        rp.get("storage"),
        scheduler.Tenancy(rp.get("tenancy", "shared")),
    )
    current = {
        r[0]: r[1]
        for r in c.execute(
            "SELECT instance, processes FROM placements WHERE program_id=?", (program_id,)
        )
    }
    plan = scheduler.place(
        program_id,
        processes,
        policy,
        _candidates(c, program_id, policy),
        current,
        p["target_instances"],
        avoid,
    )
    new = sum(1 for a in plan if a.new_for_program)
    _check_limits(c, program_id, lim.Delta(instances=new))
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
    c.execute(
        "UPDATE programs SET processes=processes+?, state='running', status_reason='running',"
        " updated=? WHERE id=? AND state IN ('pending','running')",
        (processes, now, program_id),
    )
    c.execute(
        "UPDATE programs SET processes=processes+?, updated=? WHERE id=? AND state='recovering'",
        (processes, now, program_id),
    )
    return [dict(instance=a.instance, processes=a.processes) for a in plan]


def _free_slots(c: Conn, instance: str, n: int, program_id: str) -> None:
    c.execute("UPDATE instances SET used_slots=max(used_slots-?, 0) WHERE name=?", (n, instance))
    c.execute(
        "UPDATE instances SET dedicated_to=NULL WHERE name=? AND dedicated_to=? AND"
        " NOT EXISTS (SELECT 1 FROM placements WHERE instance=? AND program_id=?)",
        (instance, program_id, instance, program_id),
    )


def _end(
    c: Conn,
    program_id: str,
    state: str,
    reason: str,
    exit_status: int | None,
    signal: int | None,
    now: float,
) -> None:
    for r in c.execute(
        "SELECT instance, processes FROM placements WHERE program_id=?", (program_id,)
    ).fetchall():
        c.execute(
            "DELETE FROM placements WHERE program_id=? AND instance=?", (program_id, r["instance"])
        )
        _free_slots(c, r["instance"], r["processes"], program_id)
    c.execute(
        "UPDATE programs SET state=?, status_reason=?, exit_status=?, signal=?, processes=0,"
        " updated=? WHERE id=?",
        (state, reason, exit_status, signal, now, program_id),
    )
