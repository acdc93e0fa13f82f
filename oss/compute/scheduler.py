"""Placement of a program's processes on instances (pure decisions, no I/O).

The store hands in the candidate instances (already pre-filtered in SQL for
speed); `place` decides where each new process goes.  Rules:

* Requirements filter: instance type, price range, tenancy (a dedicated
  program only uses instances that are empty or already dedicated to it; a
  shared program only uses instances not dedicated to anyone).
* Storage is a preference: matching instances sort first, others still qualify.
* Width: while the program runs on fewer instances than its target width
  (set by the optimizer), a process goes to a new instance (spread); after
  that, it goes next to its siblings (locality heuristic: pack onto instances
  the program already uses, most free slots first), and only spills over to a
  new instance when those are full.
* Among new instances: preferred storage, then lowest price, then least
  loaded, then name (deterministic).
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from oss.compute import costmodel
from oss.errors import NoCapacity


class Tenancy(enum.StrEnum):
    """Whether a program shares its instances with other programs."""

    SHARED = "shared"
    DEDICATED = "dedicated"


@dataclass(frozen=True, slots=True)
class SelectionPolicy:
    """A client's resource selection policy (all fields optional)."""

    instance_type: str | None = None
    min_price_micros: int | None = None
    max_price_micros: int | None = None
    storage: str | None = None  # preferred storage kind ("local", "network", ...)
    tenancy: Tenancy = Tenancy.SHARED


@dataclass(frozen=True, slots=True)
class Candidate:
    """An instance that could take processes."""

    name: str
    instance_type: str | None
    cpus: int
    price_micros_per_s: int
    storage: str | None
    slots: int
    used_slots: int
    dedicated_to: str | None
    runqueue: float = 0.0

    @property
    def free(self) -> int:
        """Free process slots."""
        return self.slots - self.used_slots


@dataclass(frozen=True, slots=True)
class Assignment:
    """`processes` processes of the program go to `instance`."""

    instance: str
    processes: int
    new_for_program: bool  # the program did not use this instance before


def eligible(c: Candidate, policy: SelectionPolicy, program: str) -> bool:
    """Does the candidate meet the policy's hard requirements for this program?"""
    if policy.instance_type is not None and c.instance_type != policy.instance_type:
        return False
    if policy.min_price_micros is not None and c.price_micros_per_s < policy.min_price_micros:
        return False
    if policy.max_price_micros is not None and c.price_micros_per_s > policy.max_price_micros:
        return False
    if policy.tenancy is Tenancy.DEDICATED:
        return c.dedicated_to == program or (c.dedicated_to is None and c.used_slots == 0)
    return c.dedicated_to is None


def _new_instance_key(
    c: Candidate, policy: SelectionPolicy, avoid: Collection[str] = ()
) -> tuple[int, int, float, bool, float, str]:
    storage_miss = 0 if policy.storage is None or c.storage == policy.storage else 1
    load = c.used_slots / max(c.slots, 1)
    return (storage_miss, c.price_micros_per_s, load, c.name in avoid, c.runqueue, c.name)


def place(
    program: str,
    processes: int,
    policy: SelectionPolicy,
    candidates: Sequence[Candidate],
    current: Mapping[str, int],
    target_instances: int,
    avoid: Collection[str] = (),
) -> list[Assignment]:
    """Place `processes` new processes; raise NoCapacity if any cannot be placed.

    `current` maps the instances the program already uses to its process count
    there.  The result is all-or-nothing.  `avoid` is a soft hint: among new
    instances that are otherwise equal (storage, price, load), those come last.
    """
    if processes < 1:
        raise ValueError("processes must be >= 1")
    free: dict[str, int] = {}
    fresh: list[Candidate] = []
    # The hot loop: `eligible` inlined (same rules), since it runs over every candidate.
    itype, lo, hi = policy.instance_type, policy.min_price_micros, policy.max_price_micros
    dedicated = policy.tenancy is Tenancy.DEDICATED
    for c in candidates:
        f = c.slots - c.used_slots
        if f <= 0 or (itype is not None and c.instance_type != itype):
            continue
        if (lo is not None and c.price_micros_per_s < lo) or (
            hi is not None and c.price_micros_per_s > hi
        ):
            continue
        if dedicated:
            if c.dedicated_to != program and (c.dedicated_to is not None or c.used_slots):
                continue
        elif c.dedicated_to is not None:
            continue
        free[c.name] = f
        if c.name not in current:
            fresh.append(c)
    used = set(current)
    out: dict[str, int] = {}
    # At most `processes` new instances are ever needed: a partial selection, not a sort.
    new_ranked = heapq.nsmallest(
        processes, fresh, key=lambda c: _new_instance_key(c, policy, avoid)
    )
    new_iter = iter(new_ranked)
    width = len(used)
    for _ in range(processes):
        choice: str | None = None
        if width < target_instances:
            choice = _next_new(new_iter, free)
            if choice is not None:
                width += 1
        if choice is None:
            # Locality: siblings first, the one with the most free slots.
            siblings = [n for n in (used | set(out)) if free.get(n, 0) > 0]
            if siblings:
                choice = max(siblings, key=lambda n: (free[n], n))
        if choice is None:
            choice = _next_new(new_iter, free)
            if choice is not None:
                width += 1
        if choice is None:
            raise NoCapacity(
                f"program {program}: only {sum(out.values())} of {processes} processes fit"
            )
        free[choice] -= 1
        out[choice] = out.get(choice, 0) + 1
        used.add(choice)
    return [Assignment(n, k, n not in current) for n, k in sorted(out.items())]


def _next_new(it: object, free: Mapping[str, int]) -> str | None:
    for c in it:  # type: ignore[attr-defined]
        if free.get(c.name, 0) > 0:
            return str(c.name)
    return None


# -- the program's placement policy (issue 10: one policy for home and instances) ----

POLICIES = ("auto", "spread", "pack", "local")


@dataclass(frozen=True, slots=True)
class Slot:
    """One instance as a placement policy sees it, for one program."""

    name: str
    cpus: int
    running: int = 0  # this program's processes there now
    load: float = 0.0  # a tie-breaker only (reported run queue, or used/slots)


def choose(policy: str, slots: Sequence[Slot], start: int = 0) -> tuple[str | None, int]:
    """(instance for the next process or None, the next `start`) under `policy`.

    - spread: the fewest of the program's processes, then the lowest load, equal
      candidates taken in turn from `start` (6 short children on 3 instances land
      2 per instance; sequential ones alternate);
    - pack: the first instance (in the given order) with fewer of the program's
      processes than CPUs; when all are full, as spread;
    - local: None (the process runs where it is);
    - auto: the cost model (`oss.compute.costmodel`) decided the process is worth
      placing; it goes where it is expected to finish first (the lowest load per
      CPU, then the fewest of the program's processes), equal ones in turn.

    The local coordinator (`vmagent.cluster.placement.Placement`) keeps `start`
    as its round-robin cursor; the OSS orders the candidates with the instance
    the caller avoids last and starts at 0.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown placement {policy!r}: choose one of {', '.join(POLICIES)}")
    if policy == "local" or not slots:
        return None, start
    if policy == "auto":
        order = costmodel.rank(
            [costmodel.Site(s.name, s.cpus, s.load * max(s.cpus, 1)) for s in slots],
            {s.name: s.running for s in slots},
        )
        at = [s.name for s in slots].index(order[0])
        return order[0], (at + 1) % len(slots)
    if policy == "pack":
        for s in slots:
            if s.running < s.cpus:
                return s.name, start
    count = len(slots)
    best: Slot | None = None
    best_at = 0
    for i in range(count):
        at = (start + i) % count
        s = slots[at]
        if best is None or (s.running, s.load) < (best.running, best.load):
            best, best_at = s, at
    assert best is not None
    return best.name, (best_at + 1) % count


def place_by_policy(
    program: str,
    policy_name: str,
    policy: SelectionPolicy,
    candidates: Sequence[Candidate],
    current: Mapping[str, int],
    avoid: Collection[str] = (),
) -> list[Assignment]:
    """One process of a program placed by its placement policy (spread, pack, local).

    Hard requirements as `place`; candidates without a free slot are skipped.
    `avoid` (the instance asking, the ones used last, most recent first) come
    last among equals, the most recent last of all: sequential processes go
    round the instances.  NoCapacity when nothing fits, or for `local` (the
    process stays where it is).
    """
    recent = {n: len(avoid) - i for i, n in enumerate(avoid)}
    fits = [c for c in candidates if c.free > 0 and eligible(c, policy, program)]
    fits.sort(key=lambda c: (recent.get(c.name, 0), c.name))
    slots = [
        Slot(c.name, c.cpus, current.get(c.name, 0), c.used_slots / max(c.slots, 1)) for c in fits
    ]
    name, _ = choose(policy_name, slots)
    if name is None:
        raise NoCapacity(f"program {program}: placement {policy_name} places nothing here")
    return [Assignment(name, 1, name not in current)]
