"""Autoscaling decisions (pure): fill plans with demand and idle grace, provider back-off."""

from __future__ import annotations

from oss.compute.pool import Backoff, FillPlan, PoolDemand, PoolState, backoff_wait, fill_plan


def pool(
    live: int,
    idle: tuple[str, ...] = (),
    *,
    warm: int = 1,
    max_size: int = 3,
    since: dict[str, float] | None = None,
    grace: float = 30.0,
    slots: int = 2,
) -> PoolState:
    return PoolState(
        "p", warm, max_size, live, idle, 0, idle_since=since or {}, idle_grace=grace,
        slots_per_instance=slots,
    )  # fmt: skip


def test_waiting_placements_create_up_to_max_with_the_reason() -> None:
    # One busy instance, 4 placements refused: 2 instances of 2 slots each, plus the warm one
    # would make 3 more, but the pool stops at max 3.
    plan = fill_plan(pool(1), PoolDemand(waiting=4), now=100.0)
    assert plan == FillPlan(2, ())
    assert plan.reason == "pool p: create 2: warm target 1, 4 placements waited, max 3"
    plan = fill_plan(pool(1), PoolDemand(waiting=1, wanted_width=1), now=100.0)
    assert plan.create == 2 and "target width 1" in plan.reason
    assert fill_plan(pool(3), PoolDemand(waiting=6)) == FillPlan(0, ())  # at max


def test_idle_instances_go_only_after_the_grace_and_beyond_warm_and_need() -> None:
    since = {"a": 0.0, "b": 10.0, "c": 20.0}
    st = pool(3, ("a", "b", "c"), since=since, grace=30.0)
    assert fill_plan(st, now=29.0) == FillPlan(0, ())  # none idle 30 s yet
    plan = fill_plan(st, now=35.0)  # a idle 35 s goes; b (25 s) and c (15 s) are kept
    assert plan == FillPlan(0, ("a",)) and plan.reason == "pool p: release a: idle 35 s"
    assert fill_plan(st, now=45.0) == FillPlan(0, ("b", "a"))  # 2 beyond the warm one
    assert fill_plan(st, now=60.0) == FillPlan(0, ("c", "b"))  # newest first
    # Demand keeps idle instances warm.
    assert fill_plan(st, PoolDemand(waiting=3), now=60.0) == FillPlan(0, ())


def test_over_max_goes_at_once() -> None:
    st = pool(4, ("a", "b"), since={"a": 99.0, "b": 99.0}, max_size=3, warm=2)
    assert fill_plan(st, now=100.0).destroy == ("b",)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0


def test_backoff_spaces_creates_one_at_a_time() -> None:
    clock, b = Clock(), Backoff()
    assert b.allowed(clock.now) is None  # healthy: no limit
    tries = []
    for _ in range(7):  # a provider that always fails: try when allowed, else wait a second
        while b.allowed(clock.now) == 0:
            clock.now += 1
        assert b.allowed(clock.now) in (None, 1)
        tries.append(clock.now)
        b = b.failed(clock.now, base=1.0, error="boom")
    gaps = [round(y - x) for x, y in zip(tries, tries[1:], strict=False)]
    assert gaps == [2, 4, 8, 16, 32, 60]  # min(2**n, 60) after n failures
    assert b.failures == 7 and b.error == "boom"
    assert backoff_wait(3, 1.0) == 8 and backoff_wait(10, 1.0) == 60
