"""The cost model's adapter in a tracer: what it knows of each exec, and what it learns.

`Advisor` sits in a coordinator that places execs (`ClusterCoordinator` at home,
`vmagent.trace.placing.PlacingCoordinator` on an instance) under `--placement auto`.
For each placeable exec it builds the model's inputs (`oss.compute.costmodel`):
the program's shape, whether the process already ran a program (an exec chain),
its profile (this run's past runs of that shape, or a run of it still going that
already ran long), the load here (runnable tasks on this machine) and of the
instances it knows; it logs the verdict (logger `dcp.placement`, INFO: shown by
`dcptrace --trace` or `-v`) and tells `note` (the OSS log) the first verdict of
each kind per shape.  It learns each program's wall time from the tracer's
process events (exec to exit, or to the next exec of the same process); the
run times are kept between runs in the local OSS state (`PROFILES`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from oss.compute.costmodel import Costs, Exec, History, Profile, Site, Verdict, decide, shape

log = logging.getLogger("dcp.placement")

MAX_NOTES = 200  # OSS log lines per run from one advisor (first verdict per shape and kind)


def machine_id() -> str:
    """This machine's boot id: sites with the same id share their cores."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def runnable() -> float:
    """Tasks runnable on this machine now (procs_running in /proc/stat, less the reader)."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"procs_running"):
                    return max(0.0, float(line.split()[1]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


PROFILES = "placement-profiles.json"  # in the local OSS state directory


def load_history(path: Path | None) -> History:
    """Run times of earlier runs kept in `path` (empty if none or unreadable)."""
    if path is None:
        return History()
    try:
        return History.load(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.debug("placement profiles in %s not read: %s", path, exc)
        return History()


def save_history(path: Path, history: History) -> None:
    """Keep the run times for the next runs (0600, replaced whole, in the local OSS
    state's directory, which only its user can read: made 0700 here if the run's
    recorder has not made it yet)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(history.dump(), f)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("placement profiles not kept in %s: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


class Advisor:
    """Asks the cost model about each exec; learns run times from process events."""

    def __init__(
        self,
        here: str,
        *,
        others: Callable[[], Sequence[Site]] | None = None,
        history: History | None = None,
        costs: Costs | None = None,
        note: Callable[[str], None] | None = None,
        cpus: int | None = None,
        machine: str | None = None,
        load: Callable[[], float] = runnable,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.here = here
        self.cpus = cpus or os.cpu_count() or 1
        self.machine = machine_id() if machine is None else machine
        self.history = history or History()
        self.costs = costs or Costs()
        self._others = others
        self._note = note
        self.load = load  # runnable work here now (a fake in tests)
        self._clock = clock
        self._pending: dict[int, str] = {}  # pid -> shape of the exec asked about
        self._running: dict[int, tuple[str, float]] = {}  # pid -> (shape, exec time)
        self._noted: set[tuple[str, str]] = set()
        self.counts: dict[str, int] = {}  # verdict kind -> how many

    def may_place(self) -> bool:
        """Can any exec be worth placing?  Not when every instance shares this machine's
        cores (the local instances of `--instances N`): the model keeps all home."""
        if self._others is None:
            return True
        return any(not s.machine or s.machine != self.machine for s in self._others())

    def needs_execs(self) -> bool:
        """Must the tracer stop each exec for a decision?  Only when one may be placed,
        or when the decisions are shown (`--trace`, `-v`): otherwise execs run unstopped
        and the run costs what plain dcptrace costs."""
        return self.may_place() or log.isEnabledFor(logging.INFO)

    def decide(self, pid: int, path: bytes, argv: Sequence[bytes]) -> Verdict:
        """The verdict for `pid` exec'ing `path` with `argv` (logged)."""
        key = shape(os.fsdecode(path), [os.fsdecode(a) for a in argv])
        self._pending[pid] = key
        profile = self.history.get(key) or self._still_running(key)
        long = profile is not None and profile.seconds >= self.costs.min_ratio * (
            self.costs.placement_s
        )
        # The load is read only when it matters (a long program): most execs are short.
        here = Site(self.here, self.cpus, self.load() if long else 0.0, self.machine)
        others = self._others() if long and self._others is not None else None
        if long and self._others is not None and others is None:
            others = []
        verdict = decide(Exec(key, pid in self._running), profile, here, others, self.costs)
        self.counts[verdict.kind] = self.counts.get(verdict.kind, 0) + 1
        log.info("pid %d: %s", pid, verdict.reason)
        if self._note is not None and len(self._noted) < MAX_NOTES:
            mark = (key, verdict.kind)
            if mark not in self._noted:
                self._noted.add(mark)
                self._note(f"placement on {self.here}: {verdict.reason}")
        return verdict

    def _still_running(self, key: str) -> Profile | None:
        """A run of `key` still going gives a lower bound on how long it runs."""
        now = self._clock()
        started = [t for k, t in self._running.values() if k == key]
        if not started:
            return None
        ran = now - min(started)
        return Profile(0, ran) if ran >= self.costs.min_ratio * self.costs.placement_s else None

    def placement_took(self, seconds: float) -> None:
        """One placement's measured cost (smoothed into `costs.placement_s`)."""
        old = self.costs.placement_s
        self.costs = Costs(old + 0.2 * (seconds - old), self.costs.min_ratio)

    def execed(self, pid: int, argv: Sequence[str]) -> None:
        """`pid` now runs a new program (the tracer saw the exec succeed)."""
        now = self._clock()
        before = self._running.get(pid)
        if before is not None:
            self.history.observe(before[0], now - before[1])
        key = self._pending.pop(pid, None)
        if key is None:
            key = shape(argv[0] if argv else "?", list(argv))
        self._running[pid] = (key, now)

    def exited(self, pid: int) -> None:
        """`pid` ended: its program's run time is learned."""
        self._pending.pop(pid, None)
        before = self._running.pop(pid, None)
        if before is not None:
            self.history.observe(before[0], self._clock() - before[1])

    def summary(self) -> str:
        """One line: how many execs got each verdict."""
        parts = ", ".join(f"{k} {n}" for k, n in sorted(self.counts.items()))
        return f"placement on {self.here}: {sum(self.counts.values())} execs decided ({parts})"
