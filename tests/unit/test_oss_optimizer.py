"""Autoscaling decisions (pure): every decision has a reason."""

from __future__ import annotations

from typing import Any

import pytest

from oss.compute.optimizer import Action, Goal, ProgramLoad, decide


def load(**kw: Any) -> ProgramLoad:
    base: dict[str, Any] = dict(
        processes=8,
        instances=1,
        cpus=2,
        cpu_percent=50.0,
        runqueue=1.0,
        budget_left_fraction=None,
        limit_headroom=10,
    )
    base.update(kw)
    return ProgramLoad(**base)  # type: ignore[arg-type]


def test_fastest_scales_up_when_saturated() -> None:
    d = decide(Goal.FASTEST, load(cpu_percent=95), 1, 1, 4)
    assert d.action is Action.UP and d.target == 2 and "saturated" in d.reason


@pytest.mark.parametrize(
    ("kw", "hi", "why"),
    [
        ({"limit_headroom": 0}, 4, "limits"),
        ({"budget_left_fraction": 0.0}, 4, "budget"),
        ({}, 1, "policy maximum"),
        ({"processes": 1}, 4, "no more processes"),
    ],
)
def test_saturated_but_held_says_why(kw: dict[str, object], hi: int, why: str) -> None:
    d = decide(Goal.FASTEST, load(cpu_percent=95, **kw), 1, 1, hi)
    assert d.action is Action.HOLD and d.target == 1 and why in d.reason


def test_fastest_scales_down_when_idle() -> None:
    d = decide(Goal.FASTEST, load(cpu_percent=5, runqueue=0.0), 3, 1, 4)
    assert d.action is Action.DOWN and d.target == 2 and "idle" in d.reason


def test_latency_packs_unless_heavily_saturated() -> None:
    assert decide(Goal.LATENCY, load(cpu_percent=50), 2, 1, 4).action is Action.DOWN
    assert decide(Goal.LATENCY, load(cpu_percent=85, runqueue=3), 1, 1, 4).action is Action.HOLD
    d = decide(Goal.LATENCY, load(cpu_percent=99, runqueue=5), 1, 1, 4)
    assert d.action is Action.UP


def test_cost_needs_budget_and_deep_queue() -> None:
    assert decide(Goal.COST, load(cpu_percent=99, runqueue=3), 1, 1, 4).action is Action.HOLD
    up = decide(Goal.COST, load(cpu_percent=99, runqueue=5, budget_left_fraction=0.9), 1, 1, 4)
    assert up.action is Action.UP
    poor = decide(Goal.COST, load(cpu_percent=99, runqueue=5, budget_left_fraction=0.3), 1, 1, 4)
    assert poor.action is Action.HOLD


def test_policy_bounds_win() -> None:
    assert decide(Goal.FASTEST, load(), 0, 2, 4).target == 2
    assert decide(Goal.COST, load(), 9, 1, 4).target == 4


@pytest.mark.parametrize("goal", list(Goal))
def test_every_decision_within_bounds_with_reason(goal: Goal) -> None:
    for cpu in (0.0, 50.0, 99.0):
        for rq in (0.0, 1.0, 10.0):
            for cur in range(1, 5):
                d = decide(goal, load(cpu_percent=cpu, runqueue=rq), cur, 1, 4)
                assert 1 <= d.target <= 4 and d.reason
                assert abs(d.target - cur) <= 1
