"""Resource limits at account, user and program level (pure decisions).

Placement runs `check` (through billing's BudgetCheck) inside the same write
transaction that reserves the resources (oss.compute.programs), so concurrent
submissions are serialised and the invariant "usage <= limit at every level
after every committed placement" holds; this module only decides.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from oss.errors import BudgetExhausted, LimitExceeded


class Level(enum.StrEnum):
    """Where a limit applies."""

    ACCOUNT = "account"
    USER = "user"
    PROGRAM = "program"


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits at one level; None means unlimited.

    `budget_micros` is the soft budget (no scale-up past it);
    `hard_budget_micros` stops the program.
    """

    max_instances: int | None = None
    max_storage_mb: int | None = None
    max_bandwidth_mbps: int | None = None
    budget_micros: int | None = None
    hard_budget_micros: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Current usage at one level."""

    instances: int = 0
    storage_mb: int = 0
    bandwidth_mbps: int = 0
    spent_micros: int = 0


@dataclass(frozen=True, slots=True)
class Delta:
    """What a placement or scale-up adds."""

    instances: int = 0
    storage_mb: int = 0
    bandwidth_mbps: int = 0


class BudgetState(enum.StrEnum):
    """Where spending stands against the budgets."""

    OK = "ok"
    EXHAUSTED = "exhausted"  # no further scale-up
    HARD_STOP = "hard_stop"  # stop the program


def check(levels: Sequence[tuple[Level, Limits, Usage]], delta: Delta) -> None:
    """Raise LimitExceeded/BudgetExhausted if `delta` would break any level's limit."""
    for level, lim, use in levels:
        for resource, limit, now, add in (
            ("instances", lim.max_instances, use.instances, delta.instances),
            ("storage_mb", lim.max_storage_mb, use.storage_mb, delta.storage_mb),
            ("bandwidth_mbps", lim.max_bandwidth_mbps, use.bandwidth_mbps, delta.bandwidth_mbps),
        ):
            if add > 0 and limit is not None and now + add > limit:
                raise LimitExceeded(level.value, resource, limit, now + add)
        state = budget_state(use.spent_micros, lim) if delta.instances > 0 else BudgetState.OK
        if state is not BudgetState.OK:
            kind, budget = (
                ("soft", lim.budget_micros)
                if state is BudgetState.EXHAUSTED
                else ("hard", lim.hard_budget_micros)
            )
            raise BudgetExhausted(
                f"{level.value} {kind} budget of {budget} micros reached (spent {use.spent_micros})"
            )


def budget_state(spent_micros: int, lim: Limits) -> BudgetState:
    """Classify spending against one level's budgets."""
    if lim.hard_budget_micros is not None and spent_micros >= lim.hard_budget_micros:
        return BudgetState.HARD_STOP
    if lim.budget_micros is not None and spent_micros >= lim.budget_micros:
        return BudgetState.EXHAUSTED
    return BudgetState.OK


def worst(states: Sequence[BudgetState]) -> BudgetState:
    """The most severe of several budget states."""
    order = [BudgetState.OK, BudgetState.EXHAUSTED, BudgetState.HARD_STOP]
    return max(states, key=order.index, default=BudgetState.OK)


# -- limits act: what stops a running program (issue 10) -------------------------


@dataclass(frozen=True, slots=True)
class Breach:
    """A running program went past a limit that stops it.

    `resource` is `hard_budget_micros`, `instances`, `storage_mb` or
    `bandwidth_mbps`; `value` is what was spent or measured.
    """

    level: Level
    resource: str
    limit: int
    value: int

    @property
    def state(self) -> str:
        """The program's final state: `stopped_budget` or `stopped_limit`."""
        return "stopped_budget" if self.resource == "hard_budget_micros" else "stopped_limit"

    def message(self) -> str:
        """One line for the user: `program hard budget of 1000 micros reached (spent 1100)`."""
        if self.resource == "hard_budget_micros":
            return (
                f"{self.level.value} hard budget of {self.limit} micros reached"
                f" (spent {self.value})"
            )
        return (
            f"{self.level.value} {_RESOURCE_NAMES[self.resource]} limit of {self.limit}"
            f" exceeded (measured {self.value})"
        )


_RESOURCE_NAMES = {
    "instances": "instances",
    "storage_mb": "storage (MB)",
    "bandwidth_mbps": "bandwidth (Mbit/s)",
}


def breach(
    levels: Sequence[tuple[Level, Limits]], measured: Mapping[Level, Usage]
) -> Breach | None:
    """The first limit a running program is past, or None.

    Levels are examined in order (account, user, program); at each, the hard
    budget first (reached at `spent >= hard`), then instances, storage and
    bandwidth (past when strictly above the limit: placement admits up to it).
    `measured` holds each level's usage as metered (a missing level: none).
    """
    for level, lim in levels:
        use = measured.get(level, Usage())
        if lim.hard_budget_micros is not None and use.spent_micros >= lim.hard_budget_micros:
            return Breach(level, "hard_budget_micros", lim.hard_budget_micros, use.spent_micros)
        for resource, limit, value in (
            ("instances", lim.max_instances, use.instances),
            ("storage_mb", lim.max_storage_mb, use.storage_mb),
            ("bandwidth_mbps", lim.max_bandwidth_mbps, use.bandwidth_mbps),
        ):
            if limit is not None and value > limit:
                return Breach(level, resource, limit, value)
    return None


def soft_reached(levels: Sequence[tuple[Level, Limits, Usage]]) -> tuple[Level, int, int] | None:
    """(level, soft budget, spent) of the first level whose soft budget is reached, or None."""
    for level, lim, use in levels:
        if lim.budget_micros is not None and use.spent_micros >= lim.budget_micros:
            return level, lim.budget_micros, use.spent_micros
    return None
