"""Internal locking service: leases with fencing tokens (never exposed to clients).

A lease on a name is held by one holder until it expires or is released.
Each new grant of a name increments its fencing token; a resource guarded by
a lease accepts a write only with the current token (`validate`), so a holder
that lost its lease (paused, partitioned) cannot clobber the new holder's
work.  Leases persist in SQLite, so fencing tokens never go backwards across
restarts.  Clients (account tokens) cannot reach it: only instances, with their
own tokens, through /v1/agents/leases/* (the holder is always the calling instance).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from oss.db.store import Conn, Store
from oss.errors import LeaseError


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease."""

    name: str
    holder: str
    fencing: int
    expires: float


class LockService:
    """Leases over the OSS store."""

    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock

    async def acquire(self, name: str, holder: str, ttl: float) -> Lease:
        """Grant (or extend, for the same holder) the lease; LeaseError if held by another."""
        now = self._clock()

        def op(c: Conn) -> Lease:
            r = c.execute(
                "SELECT holder, fencing, expires FROM leases WHERE name=?", (name,)
            ).fetchone()
            if r is None:
                fencing = 1
            elif r["holder"] == holder and r["expires"] > now:
                fencing = r["fencing"]  # renewal keeps the token
            elif r["holder"] is not None and r["expires"] > now:
                raise LeaseError(f"{name} held by {r['holder']}", name=name, holder=r["holder"])
            else:
                fencing = r["fencing"] + 1
            c.execute(
                "INSERT OR REPLACE INTO leases VALUES(?,?,?,?)", (name, holder, fencing, now + ttl)
            )
            return Lease(name, holder, fencing, now + ttl)

        return await self._store.write(op)

    async def release(self, lease: Lease) -> None:
        """Give the lease up (no-op if it already passed to someone else)."""
        await self.release_token(lease.name, lease.holder, lease.fencing)

    async def release_token(self, name: str, holder: str, fencing: int) -> None:
        """Give up `holder`'s lease on `name` with this fencing token (no-op otherwise)."""

        def op(c: Conn) -> None:
            c.execute(
                "UPDATE leases SET holder=NULL, expires=0 WHERE name=? AND holder=? AND fencing=?",
                (name, holder, fencing),
            )

        await self._store.write(op)

    async def validate(self, name: str, fencing: int) -> None:
        """LeaseError unless `fencing` is the current, unexpired token for `name`."""
        now = self._clock()

        def op(c: Conn) -> None:
            r = c.execute(
                "SELECT holder, fencing, expires FROM leases WHERE name=?", (name,)
            ).fetchone()
            if r is None or r["fencing"] != fencing or r["holder"] is None or r["expires"] <= now:
                raise LeaseError(f"stale fencing token {fencing} for {name}", name=name)

        await self._store.write(op)
