"""The instance's CPU speed, measured once when the agent first registers (issue 12:
the optimizer moves CPU-bound processes to faster instances).

A fixed Python loop runs for `MEASURE_SECONDS` of wall time; the score is the rate
it reached over the reference rate (1.0: about this project's 2-core CI host, idle).
Wall time, not CPU time: what a process gets here is what counts, so a throttled
instance (a cgroup CPU quota, a busy host) scores lower.  The window spans several
scheduler quota periods (100 ms), so a short unthrottled burst cannot pass for speed.
Pure-Python work is what most programs DCP runs do; the score compares instances,
not CPUs in general.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

REFERENCE_RATE = 15e6  # loop iterations a second that score 1.0
MEASURE_SECONDS = 0.6  # wall time of one measurement
CHUNK = 20_000  # iterations between looks at the clock


def measure(seconds: float = MEASURE_SECONDS, clock: Callable[[], float] = time.monotonic) -> float:
    """The score: loop iterations per wall second over REFERENCE_RATE (blocks `seconds`)."""
    done = 0
    start = clock()
    while True:
        x = 0
        for i in range(CHUNK):
            x += i
        done += CHUNK
        took = clock() - start
        if took >= seconds:
            return round(done / took / REFERENCE_RATE, 3)


class CpuScore:
    """The score, measured on first use (off the event loop) and kept."""

    def __init__(self, seconds: float = MEASURE_SECONDS) -> None:
        self.seconds = seconds
        self._score: float | None = None

    async def once(self) -> float:
        """The instance's score (measured the first time only)."""
        if self._score is None:
            self._score = await asyncio.to_thread(measure, self.seconds)
        return self._score
