"""Instance pools: types, the Provider protocol, and fill decisions.

A pool keeps `warm_target` idle instances of one instance type ready (pending
or registered but running nothing), never more than `max_size` live instances
in all.  Failed instances no longer count as live, so the next reconcile
replaces them.  Providers (local, libvirt) live in oss/compute/providers and implement
`Provider`; the pool manager adapter is `PoolManager` in oss.compute.pools.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class InstanceType:
    """A kind of instance: its size and its price per second (micro-units)."""

    name: str
    cpus: int
    memory_mb: int
    price_micros_per_s: int
    storage: str | None = None
    # Relative CPU speed the type declares (issue 12: the optimizer's fallback where an
    # instance's agent measured none; 1.0 = vmagent.cpuscore's reference).
    speed: float | None = None


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a new instance needs to join: its name, its bearer token, the OSS URL.

    Providers pass these to the guest: the name and URL openly (kernel command line
    `dcp.oss=URL dcp.instance=NAME`), the token only by a channel no other user can
    read (libvirt: a root-only config disk; local agents: a 0600 file or an fd),
    never on a command line.
    """

    instance: str
    token: str
    oss_url: str | None


class Provider(Protocol):
    """Creates and destroys compute instances (local processes, libvirt VMs, ...)."""

    async def create(
        self, name: str, instance_type: InstanceType, credentials: Credentials
    ) -> None:
        """Start instance `name`; it registers itself with the OSS when up."""
        ...

    async def destroy(self, name: str) -> None:
        """Stop instance `name` and release its resources (idempotent)."""
        ...


@dataclass(frozen=True, slots=True)
class PoolState:
    """One pool as the fill decision sees it."""

    name: str
    warm_target: int
    max_size: int
    live: int  # pending + ready instances
    idle: tuple[str, ...]  # ready instances running nothing, oldest first
    pending: int  # created, not yet registered
    # Autoscaling (issue 10): since when each idle instance has run nothing (a missing
    # one: long enough), how long an idle instance is kept beyond the warm target, and
    # how many processes one instance of the pool's type takes.
    idle_since: Mapping[str, float] = field(default_factory=dict)
    idle_grace: float = 0.0
    slots_per_instance: int = 1
    failed: tuple[str, ...] = ()  # failed instances not yet destroyed through the provider


@dataclass(frozen=True, slots=True)
class PoolDemand:
    """What the pool's users want beyond what they have.

    `waiting`: placements refused for want of capacity in the last window (and
    processes of pending/recovering programs); `wanted_width`: instances the
    pool's running programs' optimizer targets ask for beyond those they use.
    """

    waiting: int = 0
    wanted_width: int = 0


@dataclass(frozen=True, slots=True)
class FillPlan:
    """What to do to a pool, and why (one OSS log line per decision)."""

    create: int
    destroy: tuple[str, ...]
    reason: str = field(default="", compare=False)


def fill_plan(p: PoolState, demand: PoolDemand = PoolDemand(), now: float = 0.0) -> FillPlan:
    """Keep `warm_target` idle-or-pending instances plus what demand needs, within `max_size`.

    Creates `min(max_size - live, wanted)`; releases idle instances beyond the warm
    target and the demand once idle past `idle_grace` (newest first), and idle
    ones over `max_size` at once.
    """
    per = max(1, p.slots_per_instance)
    needed = math.ceil(demand.waiting / per) + demand.wanted_width
    warm = len(p.idle) + p.pending
    want = p.warm_target + needed
    if warm < want:
        n = max(0, min(want - warm, p.max_size - p.live))
        if n == 0:
            return FillPlan(0, ())
        why = [f"warm target {p.warm_target}"] if warm < p.warm_target else []
        if demand.waiting:
            why.append(f"{demand.waiting} placements waited")
        if demand.wanted_width:
            why.append(f"target width {demand.wanted_width}")
        why.append(f"max {p.max_size}")
        return FillPlan(n, (), f"pool {p.name}: create {n}: {', '.join(why)}")
    surplus = warm - want
    # Only registered idle instances are released; newest go first, once idle long enough.
    ripe = tuple(
        name for name in reversed(p.idle) if now - p.idle_since.get(name, -math.inf) >= p.idle_grace
    )
    doomed = ripe[: min(surplus, len(ripe))]
    over = max(0, p.live - p.max_size)
    if over > len(doomed):
        doomed = tuple(reversed(p.idle))[: min(over, len(p.idle))]
    if not doomed:
        return FillPlan(0, ())
    idle_for = ", ".join(
        f"{name}: idle {now - p.idle_since[name]:.0f} s" if name in p.idle_since else name
        for name in doomed
    )
    return FillPlan(0, doomed, f"pool {p.name}: release {idle_for}")


# -- a failing provider: creates one at a time, spaced ever wider ------------------

BACKOFF_CAP = 60.0  # seconds


@dataclass(frozen=True, slots=True)
class Backoff:
    """A pool's failed creates in a row and when the next may be tried.

    After n failures the pool waits `min(base * 2**n, 60 s)` and then tries one
    instance at a time until a create succeeds.
    """

    failures: int = 0
    next_try: float = 0.0
    error: str = ""

    def allowed(self, now: float) -> int | None:
        """How many creates may start now (None: no limit)."""
        if self.failures == 0:
            return None
        return 1 if now >= self.next_try else 0

    def failed(self, now: float, base: float, error: str) -> Backoff:
        """One more failure at `now`."""
        n = self.failures + 1
        return Backoff(n, now + backoff_wait(n, base), error)


def backoff_wait(failures: int, base: float) -> float:
    """Seconds to wait after `failures` failed creates in a row."""
    return min(base * 2**failures, BACKOFF_CAP)
