"""Optimizer moves (issue 12, migrate on decision; pure): which running process of a
program, if any, moves to an instance of a faster type, and why.

Inputs are values the adapter (`oss.compute.moving`) gathers: each running session's
profile (CPU time and run-queue wait over a window, from the agents' usage samples:
`Profiles`), the live instances with their speed (measured by the agent at
registration, or declared by the instance type), load and price, and the program's
goal, policy and budget.  The answer is a `Move` or a `Hold`, each with its reason.

A session is CPU-bound when it wanted a CPU (ran or waited to run) for at least
`busy_min` of the window.  Waiting counts: a process throttled by a slow instance
(a cgroup quota, a noisy neighbour) is runnable, not idle.  Its gain on a target is
the ratio of the instances' effective speeds: speed x the share of a CPU the load
leaves it (the target's load with it added).

Hysteresis, so nothing moves back and forth:
* a session never moves to an instance it has left;
* a move must gain at least `min_gain`;
* a session younger than `min_age`, or profiled for less than `min_observed` on its
  instance, stays;
* at most one move per program at a time, none while any migration of it runs, and
  none within `cooldown` seconds after its last move.

Budget: the rest of the run is expected to last as long as it has run so far (a
process that ran T seconds is expected to run about T more: nothing better is known
without a hint).  The move's extra cost is the faster instance's share of price over
that rest (shortened by the gain) minus what staying would cost; it must fit in the
budget left (the tightest of the program's, its user's and its account's).  Goals:
`fastest` moves whenever it gains and the budget allows; `cost` only when the move
costs nothing more (the faster instance finishes the rest for no more money);
`latency` only a program with one running session (a move never splits a program
that talks through local IPC).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from oss.compute.optimizer import Goal


class Why(enum.StrEnum):
    """The kind of a hold: the service logs a hold once per change of kind."""

    OFF = "off"
    MIGRATING = "migrating"
    COOLDOWN = "cooldown"
    IDLE = "not_cpu_bound"
    YOUNG = "young"
    NO_SPEED = "no_speed"
    NO_GAIN = "no_gain"
    BUDGET = "budget"
    COST = "cost"
    LATENCY = "latency"
    TENANCY = "tenancy"


@dataclass(frozen=True, slots=True)
class Rules:
    """The optimizer's thresholds (the OSS's configuration)."""

    busy_min: float = 0.8  # runnable fraction of the window that makes a session CPU-bound
    min_gain: float = 1.5  # effective speed ratio a move must reach
    min_age: float = 10.0  # s a session must have run
    min_observed: float = 4.0  # s of profile on its current instance
    cooldown: float = 30.0  # s after a program's last move before it may move again

    def __post_init__(self) -> None:
        if not 0 < self.busy_min <= 1:
            raise ValueError("busy_min must be in (0, 1]")
        if self.min_gain <= 1:
            raise ValueError("min_gain must be above 1")
        for name in ("min_age", "min_observed", "cooldown"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


@dataclass(frozen=True, slots=True)
class Busy:
    """What a session did over its profile window on one instance."""

    cpu_s: float  # CPU time of its processes
    wait_s: float  # time they were runnable but not running (run queue, throttling)
    span_s: float  # the window the figures cover

    @property
    def fraction(self) -> float:
        """How much of the window it wanted a CPU (1.0: all of it; above: several)."""
        return (self.cpu_s + self.wait_s) / self.span_s if self.span_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Session:
    """A running session of the program (CRIU moves its whole tree)."""

    instance: str
    pid: int  # the program's pid of the session's root
    argv: str
    age_s: float
    busy: Busy | None  # None: not profiled on this instance yet
    left: frozenset[str] = frozenset()  # instances it moved away from


@dataclass(frozen=True, slots=True)
class Place:
    """A live instance as a source or target of a move."""

    name: str
    instance_type: str | None
    speed: float | None  # relative CPU speed (None: unknown: never compared)
    price_micros_per_s: int
    slots: int
    free_slots: int
    cpus: int
    runqueue: float
    can_take: bool = True  # ready, has an exec key, checkpoints, not draining

    @property
    def rate(self) -> float:
        """What one process costs here a second (a shared instance's share of price)."""
        return self.price_micros_per_s / max(self.slots, 1)

    def effective(self, joining: bool) -> float:
        """Speed x the share of a CPU its load leaves one process (`joining`: one more)."""
        assert self.speed is not None
        queue = self.runqueue + (1.0 if joining else 0.0)
        return self.speed * min(1.0, max(self.cpus, 1) / max(queue, 1.0))


@dataclass(frozen=True, slots=True)
class Program:
    """What the decision knows about one program."""

    id: str
    goal: Goal
    moves: bool  # the policy lets the optimizer move its processes
    sessions: tuple[Session, ...]
    budget_left_micros: int | None  # None: no budget at any level
    migrating: bool  # a migration of it is running (ours or requested)
    last_move_at: float | None
    instance_type: str | None = None  # its resource policy's required type
    min_price_micros: int | None = None
    max_price_micros: int | None = None
    dedicated: bool = False


@dataclass(frozen=True, slots=True)
class Move:
    """Move session `pid` from `source` to `target`."""

    program: str
    pid: int
    source: str
    target: str
    gain: float
    extra_micros: float  # expected extra spend over the rest of the run (may be < 0)
    reason: str


@dataclass(frozen=True, slots=True)
class Hold:
    """Nothing moves, and why."""

    program: str
    why: Why
    reason: str


def decide(p: Program, places: Mapping[str, Place], now: float, rules: Rules) -> Move | Hold:
    """The program's next move, or why it holds (see the module's docstring)."""
    if not p.moves:
        return Hold(p.id, Why.OFF, "moves are off by its policy")
    if p.migrating:
        return Hold(p.id, Why.MIGRATING, "a migration of it is running")
    if p.last_move_at is not None and now - p.last_move_at < rules.cooldown:
        return Hold(
            p.id,
            Why.COOLDOWN,
            f"moved {now - p.last_move_at:.0f} s ago (cooldown {rules.cooldown:g} s)",
        )
    if p.dedicated:
        return Hold(p.id, Why.TENANCY, "dedicated tenancy: its instances are its own")
    if p.goal is Goal.LATENCY and len(p.sessions) > 1:
        return Hold(p.id, Why.LATENCY, "latency goal: a move would split its processes")
    bound = [s for s in p.sessions if s.busy is not None and s.busy.fraction >= rules.busy_min]
    if not bound:
        busiest = max((s.busy.fraction for s in p.sessions if s.busy is not None), default=0.0)
        return Hold(
            p.id,
            Why.IDLE,
            f"no CPU-bound process (busiest {busiest:.0%} of a CPU, needs {rules.busy_min:.0%})",
        )
    ready = [
        s
        for s in bound
        if s.age_s >= rules.min_age and s.busy is not None and s.busy.span_s >= rules.min_observed
    ]
    if not ready:
        return Hold(
            p.id,
            Why.YOUNG,
            f"its CPU-bound processes are younger than {rules.min_age:g} s or profiled for"
            f" less than {rules.min_observed:g} s",
        )
    best: tuple[float, float, str, Session, Place] | None = None
    best_gain = 0.0
    held: Hold | None = None
    for s in ready:
        here = places.get(s.instance)
        if here is None or here.speed is None:
            held = held or Hold(p.id, Why.NO_SPEED, f"the speed of {s.instance} is unknown")
            continue
        for t in places.values():
            if not _eligible(p, s, t):
                continue
            assert t.speed is not None
            gain = t.effective(joining=True) / here.effective(joining=False)
            best_gain = max(best_gain, gain)
            if gain < rules.min_gain:
                continue
            rest = s.age_s  # expected: as long again as it has run
            extra = rest * (t.rate / gain - here.rate)
            if p.goal is Goal.COST and extra > 0:
                held = Hold(
                    p.id,
                    Why.COST,
                    f"cost goal: pid {s.pid} on {t.name} would run {gain:.1f}x faster but cost"
                    f" {extra:.0f} micros more",
                )
                continue
            if p.budget_left_micros is not None and extra > p.budget_left_micros:
                held = Hold(
                    p.id,
                    Why.BUDGET,
                    f"budget: pid {s.pid} on {t.name} would run {gain:.1f}x faster but cost"
                    f" ~{extra:.0f} micros more over its expected rest ({rest:.0f} s), and"
                    f" {p.budget_left_micros} are left",
                )
                continue
            key = (gain, -extra, t.name, s, t)
            if best is None or key[:2] > best[:2] or (key[:2] == best[:2] and t.name < best[2]):
                best = key
    if best is None:
        if held is not None:
            return held
        return Hold(
            p.id,
            Why.NO_GAIN,
            f"no instance would run its CPU-bound process {rules.min_gain:g}x faster"
            f" (best {best_gain:.2f}x)",
        )
    gain, neg_extra, _name, s, t = best
    here = places[s.instance]
    assert s.busy is not None
    return Move(
        p.id,
        s.pid,
        s.instance,
        t.name,
        gain,
        -neg_extra,
        f"CPU-bound ({s.busy.fraction:.0%} of a CPU over {s.busy.span_s:.0f} s) on"
        f" {s.instance} (speed {here.speed:.2f}); {t.name} (speed {t.speed:.2f}) runs it"
        f" {gain:.1f}x faster; expected extra cost {max(-neg_extra, 0):.0f} micros"
        + ("" if p.budget_left_micros is None else f" of {p.budget_left_micros} left"),
    )


def _eligible(p: Program, s: Session, t: Place) -> bool:
    """Could session `s` move to `t` at all (before any gain)?"""
    return (
        t.name != s.instance
        and t.name not in s.left
        and t.can_take
        and t.free_slots > 0
        and t.speed is not None
        and (p.instance_type is None or t.instance_type == p.instance_type)
        and (p.min_price_micros is None or t.price_micros_per_s >= p.min_price_micros)
        and (p.max_price_micros is None or t.price_micros_per_s <= p.max_price_micros)
    )


# -- profiles: CPU and wait over a window, from usage samples ---------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One usage sample of a process: when, and its CPU and wait totals so far."""

    at: float
    cpu_us: int
    wait_us: int


@dataclass
class _Track:
    session: int
    seen: float = 0.0  # when the last sample arrived (the OSS's clock)
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))


MAX_SAMPLES = 64  # per process: a window of samples a second apart fits


class Profiles:
    """Per process, its recent usage samples; per session, its `Busy` over a window.

    Fed by the agents' reports (every usage row is a process's totals on its
    instance); forgets a process not sampled within the window (it ended or moved).
    """

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        # (program, instance, pid, started) -> track
        self._tracks: dict[tuple[str, str, int, float], _Track] = {}

    def observe(
        self,
        program: str,
        instance: str,
        session: int,
        pid: int,
        started: float,
        sample: Sample,
        seen: float,
    ) -> None:
        """A process's totals at `sample.at` (its instance's clock), arrived at `seen`
        (the OSS's: staleness never compares the two clocks).  An older or repeated
        sample is ignored."""
        key = (program, instance, pid, started)
        t = self._tracks.get(key)
        if t is None:
            t = self._tracks[key] = _Track(session)
        if t.samples and sample.at <= t.samples[-1].at:
            return
        t.seen = seen
        t.samples.append(sample)
        while len(t.samples) > 2 and t.samples[1].at <= sample.at - self.window:
            t.samples.popleft()

    def busy(self, now: float) -> dict[tuple[str, str, int], Busy]:
        """{(program, instance, session): Busy} of every session sampled lately."""
        sums: dict[tuple[str, str, int], list[float]] = {}
        for key, t in list(self._tracks.items()):
            if not t.samples or t.seen < now - self.window:
                del self._tracks[key]  # ended, or moved away: its figures are stale
                continue
            first, last = t.samples[0], t.samples[-1]
            span = last.at - first.at
            if span <= 0:
                continue
            acc = sums.setdefault((key[0], key[1], t.session), [0.0, 0.0, 0.0])
            acc[0] += max(0, last.cpu_us - first.cpu_us) / 1e6
            acc[1] += max(0, last.wait_us - first.wait_us) / 1e6
            acc[2] = max(acc[2], span)
        return {k: Busy(cpu, wait, span) for k, (cpu, wait, span) in sums.items()}

    def programs(self) -> set[str]:
        """Programs with a process sampled (not yet forgotten)."""
        return {k[0] for k in self._tracks}

    def forget(self, programs: Iterable[str]) -> None:
        """Drop the tracks of these programs (they ended)."""
        gone = set(programs)
        for key in [k for k in self._tracks if k[0] in gone]:
            del self._tracks[key]
