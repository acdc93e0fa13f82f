"""Instance pools: types, the Provider protocol, and fill decisions.

A pool keeps `warm_target` idle instances of one instance type ready (pending
or registered but running nothing), never more than `max_size` live instances
in all.  Failed instances no longer count as live, so the next reconcile
replaces them.  Providers (local, libvirt) live in oss/compute/providers and implement
`Provider`; the pool manager adapter is `PoolManager` in oss.compute.pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class InstanceType:
    """A kind of instance: its size and its price per second (micro-units)."""

    name: str
    cpus: int
    memory_mb: int
    price_micros_per_s: int
    storage: str | None = None


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


@dataclass(frozen=True, slots=True)
class FillPlan:
    """What to do to a pool."""

    create: int
    destroy: tuple[str, ...]


def fill_plan(p: PoolState) -> FillPlan:
    """Keep `warm_target` idle-or-pending instances, within `max_size` live ones."""
    warm = len(p.idle) + p.pending
    if warm < p.warm_target:
        return FillPlan(max(0, min(p.warm_target - warm, p.max_size - p.live)), ())
    surplus = warm - p.warm_target
    # Only registered idle instances are destroyed; newest go first.
    doomed = tuple(reversed(p.idle))[: min(surplus, len(p.idle))]
    over = max(0, p.live - p.max_size)
    if over > len(doomed):
        doomed = tuple(reversed(p.idle))[: min(over, len(p.idle))]
    return FillPlan(0, doomed)
