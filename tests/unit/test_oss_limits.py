"""Limit and budget decisions (pure)."""

from __future__ import annotations

import pytest

from oss.billing.limits import BudgetState, Delta, Level, Limits, Usage, budget_state, check, worst
from oss.errors import BudgetExhausted, LimitExceeded


def test_unlimited_passes() -> None:
    check([(Level.ACCOUNT, Limits(), Usage(100, 100, 100, 100))], Delta(5, 5, 5))


@pytest.mark.parametrize(
    ("lim", "use", "delta", "resource"),
    [
        (Limits(max_instances=3), Usage(instances=3), Delta(instances=1), "instances"),
        (Limits(max_storage_mb=100), Usage(storage_mb=60), Delta(storage_mb=41), "storage_mb"),
        (Limits(max_bandwidth_mbps=10), Usage(), Delta(bandwidth_mbps=11), "bandwidth_mbps"),
    ],
)
def test_each_resource(lim: Limits, use: Usage, delta: Delta, resource: str) -> None:
    with pytest.raises(LimitExceeded) as ei:
        check([(Level.USER, lim, use)], delta)
    assert ei.value.fields["resource"] == resource and ei.value.fields["level"] == "user"


def test_exactly_at_limit_is_allowed() -> None:
    check(
        [(Level.PROGRAM, Limits(max_instances=3, max_storage_mb=100), Usage(2, 60))], Delta(1, 40)
    )


def test_first_violated_level_reported() -> None:
    levels = [
        (Level.ACCOUNT, Limits(max_instances=10), Usage(instances=5)),
        (Level.USER, Limits(max_instances=5), Usage(instances=5)),
        (Level.PROGRAM, Limits(max_instances=0), Usage()),
    ]
    with pytest.raises(LimitExceeded) as ei:
        check(levels, Delta(instances=1))
    assert ei.value.fields["level"] == "user" and "limit is 5" in str(ei.value)


def test_zero_delta_never_fails_even_over_limit() -> None:
    check([(Level.ACCOUNT, Limits(max_instances=1), Usage(instances=4))], Delta())


def test_budget_blocks_only_scale_up() -> None:
    lv = [(Level.ACCOUNT, Limits(budget_micros=100), Usage(spent_micros=100))]
    with pytest.raises(BudgetExhausted):
        check(lv, Delta(instances=1))
    check(lv, Delta(storage_mb=1))


def test_budget_states() -> None:
    lim = Limits(budget_micros=100, hard_budget_micros=200)
    assert budget_state(99, lim) is BudgetState.OK
    assert budget_state(100, lim) is BudgetState.EXHAUSTED
    assert budget_state(200, lim) is BudgetState.HARD_STOP
    assert budget_state(10**9, Limits()) is BudgetState.OK
    assert (
        worst([BudgetState.OK, BudgetState.HARD_STOP, BudgetState.EXHAUSTED])
        is BudgetState.HARD_STOP
    )
    assert worst([]) is BudgetState.OK
