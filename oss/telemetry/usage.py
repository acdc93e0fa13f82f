"""Measured usage (pure): what one reported process row adds to a program's counters.

Agents report each process's totals so far (`UsageRow`), as often as they like: a
live sample every second, the final figures at its exit, the same batch again after
a lost reply.  The OSS keeps the highest value of every counter per process, and the
increment a row brings is what it adds above the stored one: a replayed or reordered
row adds nothing, and no figure ever goes down.  `maxrss_kb` is a peak, not a sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# The counters of a process row that only grow (summed across processes).
COUNTERS = ("cpu_us", "rchar", "wchar", "rbytes", "wbytes", "net_rx", "net_tx")


@dataclass(frozen=True, slots=True)
class Figures:
    """A process's totals (or an increment of them)."""

    cpu_us: int = 0
    rchar: int = 0
    wchar: int = 0
    rbytes: int = 0
    wbytes: int = 0
    net_rx: int = 0
    net_tx: int = 0
    maxrss_kb: int = 0
    syscalls: Mapping[str, int] = field(default_factory=dict)

    @property
    def net_bytes(self) -> int:
        """Bytes in and out."""
        return self.net_rx + self.net_tx

    def empty(self) -> bool:
        """Nothing to add."""
        return not any(getattr(self, k) for k in COUNTERS) and not any(self.syscalls.values())


@dataclass(frozen=True, slots=True)
class Merge:
    """The stored totals after a row, and the increment the row brought."""

    totals: Figures
    delta: Figures


def merge(stored: Figures | None, row: Figures) -> Merge:
    """Fold a reported row into the stored totals of the same process."""
    old = stored or Figures()
    up = {k: max(getattr(old, k), getattr(row, k)) for k in COUNTERS}
    calls = dict(old.syscalls)
    for k, v in row.syscalls.items():
        calls[k] = max(calls.get(k, 0), v)
    totals = Figures(**up, maxrss_kb=max(old.maxrss_kb, row.maxrss_kb), syscalls=calls)
    delta = Figures(
        **{k: up[k] - getattr(old, k) for k in COUNTERS},
        maxrss_kb=totals.maxrss_kb,
        syscalls={
            k: v - old.syscalls.get(k, 0) for k, v in calls.items() if v > old.syscalls.get(k, 0)
        },
    )
    return Merge(totals, delta)


def fresh(seq: int, last: int | None) -> bool:
    """Whether batch `seq` of an instance is new (the OSS holds up to `last`)."""
    return last is None or seq > last
