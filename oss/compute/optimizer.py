"""Autoscaling decisions (pure): from metrics and the scaling policy, a target width.

Every decision carries its reason; the service logs it in the program's log
and the OSS log.  Goals:

* fastest: finish fastest within limits: widen while the program's instances
  are saturated and it has more processes than instances; narrow when idle.
* latency: lowest latency: keep the program packed (co-located processes talk
  through local IPC); widen only on heavy saturation.
* cost: lowest cost: stay at the minimum width; widen only when runqueues are
  far beyond the CPUs and at least half the budget is left; narrow eagerly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Goal(enum.StrEnum):
    """What the client optimises for."""

    FASTEST = "fastest"
    LATENCY = "latency"
    COST = "cost"


class Action(enum.StrEnum):
    """What the optimizer decided."""

    UP = "scale_up"
    DOWN = "scale_down"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class ProgramLoad:
    """What the optimizer knows about one program."""

    processes: int
    instances: int  # instances the program currently uses
    cpus: int  # CPUs across those instances
    cpu_percent: float  # mean CPU utilisation across those instances
    runqueue: float  # summed run-queue length across those instances
    budget_left_fraction: float | None  # None: no budget
    limit_headroom: int  # more instances allowed by limits (0 = none)


@dataclass(frozen=True, slots=True)
class Decision:
    """A target width and why."""

    action: Action
    target: int
    reason: str


def decide(goal: Goal, load: ProgramLoad, current_target: int, lo: int, hi: int) -> Decision:
    """Decide the program's target instance count within [lo, hi] and limits."""
    sat = load.cpu_percent >= 80.0 or load.runqueue > load.cpus
    idle = load.cpu_percent < 20.0 and load.runqueue < max(load.cpus, 1) / 4
    can_widen = (
        current_target < hi
        and load.limit_headroom > 0
        and load.processes > load.instances
        and (load.budget_left_fraction is None or load.budget_left_fraction > 0)
    )
    if current_target < lo:
        return Decision(Action.UP, lo, f"below the policy minimum of {lo} instances")
    if current_target > hi:
        return Decision(Action.DOWN, hi, f"above the policy maximum of {hi} instances")
    if goal is Goal.FASTEST:
        if sat and can_widen:
            return Decision(
                Action.UP,
                current_target + 1,
                f"saturated (cpu {load.cpu_percent:.0f}%, runqueue {load.runqueue:.1f} "
                f"on {load.cpus} cpus) with {load.processes} processes on {load.instances} "
                "instances",
            )
        if idle and current_target > lo:
            return Decision(Action.DOWN, current_target - 1, f"idle (cpu {load.cpu_percent:.0f}%)")
    elif goal is Goal.LATENCY:
        if load.cpu_percent >= 95.0 and load.runqueue > 2 * load.cpus and can_widen:
            return Decision(
                Action.UP, current_target + 1, "heavily saturated; packing costs more than IPC"
            )
        if current_target > lo and not sat:
            return Decision(Action.DOWN, current_target - 1, "pack processes for lower latency")
    else:
        budget_ok = load.budget_left_fraction is None or load.budget_left_fraction >= 0.5
        if load.runqueue > 2 * load.cpus and can_widen and budget_ok:
            return Decision(
                Action.UP, current_target + 1, "runqueue over twice the cpus, budget allows"
            )
        if current_target > lo and not sat:
            return Decision(
                Action.DOWN, current_target - 1, "lowest cost: narrow when not saturated"
            )
    if sat and not can_widen:
        why = (
            "limits"
            if load.limit_headroom <= 0
            else "budget"
            if load.budget_left_fraction is not None and load.budget_left_fraction <= 0
            else "policy maximum"
            if current_target >= hi
            else "no more processes than instances"
        )
        return Decision(Action.HOLD, current_target, f"saturated but held by {why}")
    return Decision(Action.HOLD, current_target, "within bounds")
