"""The instance's CPU speed, measured once when the agent first registers (issue 12:
the optimizer moves CPU-bound processes to faster instances).

A fixed Python loop runs in `WINDOWS` windows of `WINDOW_SECONDS` of wall time; the
score is the median window's rate over the reference rate (1.0: about this project's
2-core CI host, idle).
Wall time, not CPU time: what a process gets here is what counts, so a throttled
instance (a cgroup CPU quota, a busy host) scores lower.  A window spans more than
one scheduler quota period (100 ms), and the median of several windows keeps a
short unthrottled burst from passing for speed.
Pure-Python work is what most programs DCP runs do; the score compares instances,
not CPUs in general.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

REFERENCE_RATE = 15e6  # loop iterations a second that score 1.0
WINDOWS = 7  # measured windows; the score is their median
WINDOW_SECONDS = 0.15  # wall time of one window (1.5 quota periods)
CHUNK = 5_000  # iterations between looks at the clock


def window_rate(seconds: float, clock: Callable[[], float] = time.monotonic) -> float:
    """Loop iterations per wall second over one window of `seconds` (blocks that long)."""
    done = 0
    start = clock()
    while True:
        x = 0
        for i in range(CHUNK):
            x += i
        done += CHUNK
        took = clock() - start
        if took >= seconds:
            return done / took


def measure(
    windows: int = WINDOWS,
    seconds: float = WINDOW_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """The score: the median window's rate over REFERENCE_RATE (blocks windows x seconds).

    The median, so a burst at either end (a quota set just after the agent started, a
    neighbour's pause) does not decide it."""
    rates = sorted(window_rate(seconds, clock) for _ in range(windows))
    return round(rates[len(rates) // 2] / REFERENCE_RATE, 3)


class CpuScore:
    """The score, measured on first use (off the event loop) and kept."""

    def __init__(self, windows: int = WINDOWS) -> None:
        self.windows = windows
        self._score: float | None = None

    async def once(self) -> float:
        """The instance's score (measured the first time only)."""
        if self._score is None:
            self._score = await asyncio.to_thread(measure, self.windows)
        return self._score
