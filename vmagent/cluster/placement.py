"""Where a newly exec'd program runs (pure decisions, no I/O).

The policy itself is the OSS scheduler's (`oss.compute.scheduler.choose`): one
policy decides at home, in the OSS and for placements asked from an instance.
This class keeps the small memory a coordinator without an OSS needs (counts,
round-robin cursor).

`Placement.choose()` is asked once per remote-eligible execve.  It sees the
instances as values (`InstanceView`) and answers with an instance name.  The
caller tells it when a placed program starts and ends (`started`/`finished`)
so it can balance by what is actually running.

Policies:
- spread: the instance with the fewest running placed programs, ties broken
  round robin (so 6 short children on 3 instances land 2 per instance);
- pack: the first instance (in the given order) with fewer running programs
  than CPUs; when all are full, the least loaded one;
- local: always the home instance (never remote).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from oss.compute import scheduler
from vmagent.errors import AgentError, NoInstances

HOME = "home"  # the name of the machine where dcptrace started the program

POLICIES = scheduler.POLICIES


class UnknownPolicy(AgentError):
    """The placement policy name is not one of spread, pack, local."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown placement {name!r}: choose one of {', '.join(POLICIES)}")
        self.name = name


@dataclass(frozen=True, slots=True)
class InstanceView:
    """What placement knows about one instance."""

    name: str
    cpus: int
    running: int = 0  # placed programs running there now
    load: float = 0.0  # reported run queue (OSS instances); tie-breaker only


class Placement:
    """A placement policy with its own small memory (round-robin cursor, counts)."""

    def __init__(self, policy: str, instances: Sequence[tuple[str, int]]) -> None:
        if policy not in POLICIES:
            raise UnknownPolicy(policy)
        self.policy = policy
        self._order = [name for name, _ in instances]
        self._cpus = dict(instances)
        self._running = {name: 0 for name in self._order}
        self._load = {name: 0.0 for name in self._order}
        self._cursor = 0

    def views(self) -> list[InstanceView]:
        """The instances as placement sees them now."""
        return [
            InstanceView(n, self._cpus[n], self._running[n], self._load[n]) for n in self._order
        ]

    def choose(self) -> str:
        """The instance the next program should run on (HOME for local)."""
        if self.policy == "local":
            return HOME
        if not self._order:
            raise NoInstances("no instances to place a program on")
        slots = [scheduler.Slot(v.name, v.cpus, v.running, v.load) for v in self.views()]
        name, cursor = scheduler.choose(self.policy, slots, self._cursor)
        assert name is not None
        self._cursor = cursor
        return name

    def started(self, name: str) -> None:
        """A placed program began running on `name`."""
        if name in self._running:
            self._running[name] += 1

    def finished(self, name: str) -> None:
        """A placed program on `name` ended."""
        if self._running.get(name, 0) > 0:
            self._running[name] -= 1

    def report_load(self, name: str, runqueue: float) -> None:
        """Record an instance's reported run queue (used to break ties)."""
        if name in self._load:
            self._load[name] = runqueue

    def remove(self, name: str) -> None:
        """Stop placing programs on a failed instance."""
        if name in self._running:
            self._order.remove(name)
            del self._running[name], self._cpus[name], self._load[name]
            self._cursor = 0
