"""Where each file of a program lives, and when it moves (pure decisions).

The storage manager keeps every file of a program's namespace on its networked
volume (the home of the namespace: one copy every instance reaches, and what
survives an instance's loss) and places a working copy of it, on the instance
that uses it, in one of three tiers:

    memory  tmpfs on the instance      fastest, smallest
    disk    the instance's local disk  large, survives nothing but a restart
    net     no copy: I/O goes to the networked volume itself

This module decides; `vmagent.storage.dcpfs` carries the decisions out.  Its
inputs are the file's access statistics (what the instance's file system saw)
and the tiers' capacity and use; its outputs are values (`Placement`, `Move`,
`Refusal`) whose `reason` is what the moves log says.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

MiB = 1 << 20


class Tier(enum.StrEnum):
    """A level of the storage hierarchy, fastest first."""

    MEMORY = "memory"
    DISK = "disk"
    NET = "net"


FASTEST_FIRST = (Tier.MEMORY, Tier.DISK, Tier.NET)


@dataclass(frozen=True, slots=True)
class TierSpec:
    """A tier's capacity on one instance (bytes; None: unbounded) and its price."""

    capacity: int | None
    micros_per_gib_second: int  # price of one GiB held for one second, in micro-units


@dataclass(frozen=True, slots=True)
class Policy:
    """The tunables of placement (every field is a documented threshold)."""

    promote_after_reads: int = 3  # opens for reading before a file is promoted to memory
    stream_bytes: int = 8 * MiB  # a sequential write past this bypasses the fast tiers
    largest_in_memory: int = 64 * MiB  # a file above this is never put in memory
    preferred: Tier | None = None  # the client's resource selection policy, if it chose


@dataclass(slots=True)
class Heat:
    """What an instance saw of one file (mutable: the file system updates it)."""

    size: int = 0
    reads: int = 0  # opens for reading
    writes: int = 0  # opens for writing
    last_access: float = 0.0  # monotonic seconds
    tier: Tier = Tier.NET
    open_handles: int = 0

    def as_dict(self) -> dict[str, object]:
        """For the report the instance sends the OSS."""
        return {"size": self.size, "reads": self.reads, "writes": self.writes,
                "tier": str(self.tier), "last_access": round(self.last_access, 3)}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Move:
    """Move `path`'s working copy from one tier to another, for `reason`."""

    path: str
    source: Tier
    target: Tier
    reason: str


def for_write(size_hint: int, policy: Policy, free: Mapping[Tier, int | None]) -> Tier:
    """The tier a file being written starts in (its staging copy).

    The client's preferred tier wins when it has room; otherwise memory if the
    file fits there, else disk, else the net.
    """
    if policy.preferred is not None and _fits(size_hint, free.get(policy.preferred)):
        return policy.preferred
    if size_hint <= policy.largest_in_memory and _fits(size_hint, free.get(Tier.MEMORY)):
        return Tier.MEMORY
    if _fits(size_hint, free.get(Tier.DISK)):
        return Tier.DISK
    return Tier.NET


def streams(offset: int, size: int, sequential: bool, policy: Policy) -> bool:
    """Whether a write handle turns into a stream to the net (bypassing the fast tiers)."""
    if policy.preferred in (Tier.MEMORY, Tier.DISK):
        return False
    return sequential and offset + size > policy.stream_bytes


def after_read_open(
    path: str, heat: Heat, policy: Policy, free: Mapping[Tier, int | None]
) -> Move | None:
    """What an open for reading does to a file's placement (`heat` already counts it).

    Repeated reads promote a file to memory (from the net or from disk) when it
    is small enough for memory; a large file read repeatedly comes to disk.
    """
    if policy.preferred == Tier.NET:
        return None  # the program chose the networked tier: no copies
    if heat.tier == Tier.MEMORY or heat.reads < policy.promote_after_reads:
        if heat.tier == Tier.NET and policy.preferred in (Tier.MEMORY, Tier.DISK):
            return Move(path, Tier.NET, policy.preferred, "preferred by the program's policy")
        return None
    if heat.size <= policy.largest_in_memory and policy.preferred != Tier.DISK:
        return Move(path, heat.tier, Tier.MEMORY, f"promoted: read {heat.reads} times")
    if heat.tier == Tier.NET:
        return Move(
            path, Tier.NET, Tier.DISK, f"promoted: read {heat.reads} times, too large for memory"
        )
    return None


def to_make_room(
    tier: Tier, needed: int, files: Mapping[str, Heat], free: Mapping[Tier, int | None]
) -> list[Move]:
    """Demote least recently used files of `tier` until `needed` bytes are free there.

    Memory demotes to disk when disk has room, else to the net; disk demotes to
    the net (the copy is dropped: the networked volume has the data).  Files
    with open handles stay where they are.  May free less than asked.
    """
    have = free.get(tier)
    if have is None or have >= needed:
        return []
    below = Tier.DISK if tier == Tier.MEMORY else Tier.NET
    room_below = free.get(below) if below != Tier.NET else None
    moves: list[Move] = []
    for path, heat in sorted(files.items(), key=lambda kv: kv[1].last_access):
        if have >= needed:
            break
        if heat.tier != tier or heat.open_handles:
            continue
        target = below
        if target == Tier.DISK and not _fits(heat.size, room_below):
            target = Tier.NET
        elif target == Tier.DISK and room_below is not None:
            room_below -= heat.size
        moves.append(Move(path, tier, target, f"demoted: {tier} full, least recently used"))
        have += heat.size
    return moves


def _fits(size: int, free: int | None) -> bool:
    return free is None or size <= free


# -- limits -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """A write the limits refuse: the errno the program gets and why."""

    errno: int
    reason: str


@dataclass(frozen=True, slots=True)
class StorageLimits:
    """Bytes a program may keep, at the three levels (None: no limit)."""

    account: int | None = None
    user: int | None = None
    program: int | None = None
    volume_capacity: int | None = None  # the networked volume's own size


@dataclass(frozen=True, slots=True)
class StorageUsage:
    """Measured bytes at the three levels (the program's own is part of each)."""

    account: int = 0
    user: int = 0
    program: int = 0
    volume: int = 0


def admit(growth: int, usage: StorageUsage, limits: StorageLimits) -> Refusal | None:
    """Whether `growth` more bytes may be written: None, or the errno the write fails with.

    A limit of the account, user or program gives EDQUOT (the quota is the
    user's); a full networked volume gives ENOSPC (the disk is full).
    """
    if growth <= 0:
        return None
    for level, used, limit in (
        ("program", usage.program, limits.program),
        ("user", usage.user, limits.user),
        ("account", usage.account, limits.account),
    ):
        if limit is not None and used + growth > limit:
            return Refusal(errno.EDQUOT, f"{level} storage limit of {limit} bytes reached")
    if limits.volume_capacity is not None and usage.volume + growth > limits.volume_capacity:
        return Refusal(errno.ENOSPC, "the networked volume is full")
    return None


def usage_by_tier(files: Iterable[Heat]) -> dict[Tier, int]:
    """Bytes held in each tier by these files' working copies."""
    out = {t: 0 for t in FASTEST_FIRST}
    for heat in files:
        out[heat.tier] += heat.size
    return out


@dataclass(slots=True)
class Ledger:
    """Recent moves, for the log (bounded)."""

    moves: list[tuple[float, Move]] = field(default_factory=list)
    limit: int = 1000

    def add(self, when: float, move: Move) -> None:
        """Remember one move (the oldest go first past the bound)."""
        self.moves.append((when, move))
        del self.moves[: -self.limit]
