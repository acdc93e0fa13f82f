"""Home or placed: the placement cost model (pure decisions, no I/O; issue 15).

A placement that costs more than the work it moves is a loss.  `decide` weighs,
for one exec, what is known from profiling against what a placement costs:

* the program's profile: how long this program, by path and argv shape
  (`shape`), ran before (`History`: this run's exits, seeded from the OSS's
  process records);
* the measured cost of one remote placement (`Costs.placement_s`);
* the load of every site: the one the exec happens on (`here`: the home or the
  instance that started it) and the instances it could go to.  Sites on the same
  machine (`Site.machine`) share its cores: moving work between them never
  gains anything (the local instances of `dcptrace --instances N`).

Rules, in order (every verdict carries its reason):

1. an exec chain (a process that already ran a program execs another: env ->
   python3, `sh -c 'exec ...'`) stays where it runs;
2. a program never seen stays (unknown is short until it shows otherwise:
   most execs of builds and scripts are);
3. a program whose expected time is under `Costs.min_ratio` placements stays;
4. a long one stays while `here` has a free core; otherwise it goes to the
   site where it is expected to finish first, if that beats staying by more
   than one placement (completion time = placement + expected time x
   oversubscription of the site's cores).

The spread / pack policies (`oss.compute.scheduler.choose`) do not ask this
module: a user who asks for spread gets spread.  `auto` (the default) asks.
"""

from __future__ import annotations

import os.path
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

MAX_SHAPE_WORDS = 12  # argv words that shape a program's key (the rest are ignored)
MAX_OPTION_CHARS = 24


def shape(path: str, argv: Sequence[str]) -> str:
    """The key under which a program's run times are kept: its path and argv shape.

    Options stay as written (the value after `=` dropped, long ones cut);
    operands become their kind (`*.c`, `*`): `cc -c -O2 a.c -o a.o` and
    `cc -c -O2 b.c -o b.o` share a shape, `cc a.o b.o -o app` does not.
    A word repeated next to itself counts once (`cat *` for any number of files).
    """
    words: list[str] = [os.path.basename(path) or path]
    for arg in argv[1 : MAX_SHAPE_WORDS + 1]:
        if arg.startswith("-") and len(arg) > 1:
            word = arg.split("=", 1)[0][:MAX_OPTION_CHARS]
        else:
            ext = os.path.splitext(os.path.basename(arg))[1]
            word = f"*{ext[:8]}" if ext and ext[1:].isalnum() else "*"
        if words[-1] == word:
            continue  # `cat *` for any number of files, one `-plugin-opt` for many
        words.append(word)
    return " ".join(words)


@dataclass(frozen=True, slots=True)
class Profile:
    """What is known of one shape: how many runs, their smoothed wall time."""

    runs: int
    seconds: float


SMOOTHING = 0.3  # weight of the newest run in the smoothed time


@dataclass(slots=True)
class History:
    """Run times by shape (in memory; a pure container, no I/O)."""

    profiles: dict[str, Profile] = field(default_factory=dict)

    def get(self, key: str) -> Profile | None:
        """The profile of `key`, None if never seen."""
        return self.profiles.get(key)

    def observe(self, key: str, seconds: float) -> Profile:
        """One more run of `key` that took `seconds` (wall)."""
        old = self.profiles.get(key)
        seconds = max(seconds, 0.0)
        new = (
            Profile(1, seconds)
            if old is None
            else Profile(old.runs + 1, old.seconds + SMOOTHING * (seconds - old.seconds))
        )
        self.profiles[key] = new
        return new

    def dump(self, limit: int = 2000) -> dict[str, list[float]]:
        """The profiles as JSON data (the most run shapes first, at most `limit`)."""
        ranked = sorted(self.profiles.items(), key=lambda kv: -kv[1].runs)[:limit]
        return {k: [p.runs, round(p.seconds, 6)] for k, p in ranked}

    @classmethod
    def load(cls, data: object) -> History:
        """Profiles from `dump`'s data; what does not fit is left out."""
        h = cls()
        if isinstance(data, dict):
            for k, v in data.items():
                if (
                    isinstance(k, str)
                    and isinstance(v, list)
                    and len(v) == 2
                    and all(isinstance(x, int | float) and x >= 0 for x in v)
                ):
                    h.profiles[k] = Profile(int(v[0]), float(v[1]))
        return h

    @classmethod
    def from_records(cls, records: Iterable[tuple[str, Sequence[str], float]]) -> History:
        """A history from past runs: (path, argv, wall seconds), oldest first."""
        h = cls()
        for path, argv, seconds in records:
            h.observe(shape(path, argv), seconds)
        return h


@dataclass(frozen=True, slots=True)
class Site:
    """Somewhere a process can run, as the model sees it now."""

    name: str
    cpus: int
    busy: float  # runnable work there now (run queue, or this run's processes there)
    machine: str = ""  # sites with the same non-empty machine share its cores

    @property
    def free(self) -> float:
        """Idle cores (negative: oversubscribed)."""
        return self.cpus - self.busy


@dataclass(frozen=True, slots=True)
class Costs:
    """What a placement costs and how much it must be worth."""

    placement_s: float = 0.030  # one remote placement, start to running (measured: ~26 ms)
    min_ratio: float = 10.0  # a program must be expected to run this many placements


@dataclass(frozen=True, slots=True)
class Exec:
    """One exec the model decides on."""

    key: str  # `shape(path, argv)`
    chain: bool = False  # the process already ran a program (no fork in between)


class Why:
    """The verdict kinds (the first word of every reason)."""

    CHAIN = "chain"
    UNKNOWN = "unknown"
    SHORT = "short"
    FREE = "free"
    SHARED = "shared"
    NO_GAIN = "no-gain"
    LONG = "long"


@dataclass(frozen=True, slots=True)
class Verdict:
    """Where the exec runs (`where` is `here`'s name when it stays) and why."""

    where: str
    placed: bool
    kind: str  # one of `Why`
    reason: str


def finish_time(expected: float, site: Site, costs: Costs, remote: bool) -> float:
    """Expected completion of a run of `expected` seconds started on `site` now."""
    share = max(1.0, (site.busy + 1.0) / max(site.cpus, 1))
    return (costs.placement_s if remote else 0.0) + expected * share


def decide(
    ex: Exec,
    profile: Profile | None,
    here: Site,
    others: Sequence[Site] | None,
    costs: Costs = Costs(),
) -> Verdict:
    """Home (here) or placed, and where, for one exec.

    `others` None: the instances are not known here (an instance tracer, an OSS
    client); a long program on a busy `here` is then placed with `where` "" and the
    OSS picks the instance (`rank`).
    """
    stay = here.name
    if ex.chain:
        return Verdict(stay, False, Why.CHAIN, f"exec chain: stays on {stay}, which started it")
    if profile is None:
        return Verdict(stay, False, Why.UNKNOWN, f"{ex.key!r} never ran before: stays on {stay}")
    ms, cost_ms = profile.seconds * 1000, costs.placement_s * 1000
    if profile.seconds < costs.min_ratio * costs.placement_s:
        return Verdict(
            stay,
            False,
            Why.SHORT,
            f"short: {ex.key!r} ran {ms:.0f} ms ({profile.runs} runs), "
            f"a placement costs {cost_ms:.0f} ms: stays on {stay}",
        )
    if here.free >= 1:
        return Verdict(
            stay,
            False,
            Why.FREE,
            f"long ({ms:.0f} ms) but {stay} has a free core "
            f"({here.busy:.1f} busy of {here.cpus}): stays",
        )
    t_here = finish_time(profile.seconds, here, costs, remote=False)
    if others is None:
        return Verdict(
            "",
            True,
            Why.LONG,
            f"long ({ms:.0f} ms), {stay} busy ({here.busy:.1f} of {here.cpus} cpus): "
            "placed where the OSS expects it to finish first",
        )
    best: tuple[float, str] | None = None
    shared = 0
    for s in others:
        if s.name == here.name:
            continue
        if s.machine and s.machine == here.machine:
            shared += 1
            continue
        t = finish_time(profile.seconds, s, costs, remote=True)
        if best is None or (t, s.name) < best:
            best = (t, s.name)
    if best is None or best[0] + costs.placement_s >= t_here:
        if best is None and shared:
            return Verdict(
                stay,
                False,
                Why.SHARED,
                f"long ({ms:.0f} ms), {stay} busy, but every instance shares {stay}'s cores: stays",
            )
        elsewhere = f"{best[0] * 1000:.0f} ms on {best[1]}" if best else "no other instance"
        return Verdict(
            stay,
            False,
            Why.NO_GAIN,
            f"long ({ms:.0f} ms): {t_here * 1000:.0f} ms here, {elsewhere}: stays on {stay}",
        )
    t_there, name = best
    return Verdict(
        name,
        True,
        Why.LONG,
        f"long ({ms:.0f} ms), {stay} busy ({here.busy:.1f} of {here.cpus} cpus): "
        f"{t_there * 1000:.0f} ms on {name} vs {t_here * 1000:.0f} ms here",
    )


def rank(sites: Sequence[Site], running: Mapping[str, int]) -> list[str]:
    """Instances by expected finish of one more process, best first (the OSS's `auto`).

    `running` counts the program's processes already on each (a tie-breaker).
    """
    return [
        s.name
        for s in sorted(
            sites,
            key=lambda s: ((s.busy + 1.0) / max(s.cpus, 1), running.get(s.name, 0), s.name),
        )
    ]
