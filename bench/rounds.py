"""What the whole-process benchmarks share: time a command, run cases in interleaved rounds.

Cases run round by round (every case once per round, in order) so that load from
other work on the machine hits all of them alike.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]

K = TypeVar("K", bound=Hashable)

# argv, its working directory, and a command run (untimed) before each try, or None
Case = tuple[Sequence[str], Path, Sequence[str] | None]


def timed(argv: Sequence[str], cwd: Path) -> float:
    """Wall seconds of `argv` run to its end in `cwd`; exits naming it if it failed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    done = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, timeout=900)
    took = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{list(argv)} failed: {done.stderr.decode(errors='replace')[-2000:]}")
    return took


def interleaved(
    cases: Mapping[K, Case], rounds: int, progress: bool = False
) -> dict[K, list[float]]:
    """Each case's wall seconds, one per round."""
    times: dict[K, list[float]] = {k: [] for k in cases}
    for r in range(rounds):
        for key, (argv, cwd, before) in cases.items():
            if before:
                subprocess.run(list(before), cwd=cwd, capture_output=True, check=True)
            times[key].append(timed(argv, cwd))
        if progress:
            print(f"round {r + 1} done", flush=True)
    return times


def spread(t: Sequence[float]) -> str:
    """min / median / max seconds of one case."""
    return (
        f"min {min(t):6.2f} s  median {statistics.median(t):6.2f} s  max {max(t):6.2f} s"
        f"  ({len(t)} runs)"
    )
