"""vmagent.cpuscore: the CPU score an agent measures at registration (issue 12)."""

from __future__ import annotations

import pytest

from vmagent.cpuscore import CHUNK, REFERENCE_RATE, measure


class SteppingClock:
    """Advances `fast` a look for the first `burst` looks, `slow` a look after that."""

    def __init__(self, burst: int, fast: float, slow: float) -> None:
        self.t, self.looks = 0.0, 0
        self.burst, self.fast, self.slow = burst, fast, slow

    def __call__(self) -> float:
        self.looks += 1
        self.t += self.fast if self.looks <= self.burst else self.slow
        return self.t


def test_the_score_is_the_median_window_so_a_burst_at_the_start_does_not_count() -> None:
    # The first window runs unthrottled (a quota set just after the agent started):
    # ten times the rate of the six windows after it.
    clock = SteppingClock(burst=151, fast=0.001, slow=0.01)
    score = measure(windows=7, seconds=0.15, clock=clock)
    assert score == pytest.approx(CHUNK / 0.01 / REFERENCE_RATE, abs=0.002)  # 3 decimals
    steady = measure(windows=7, seconds=0.15, clock=SteppingClock(0, 0.005, 0.005))
    assert steady == pytest.approx(2 * score, abs=0.002)
