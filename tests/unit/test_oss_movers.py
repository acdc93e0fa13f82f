"""oss.compute.movers: the optimizer's move decisions (issue 12, migrate on decision)."""

from __future__ import annotations

import dataclasses

import pytest

from oss.compute.movers import (
    Busy,
    Goal,
    Hold,
    Move,
    Place,
    Profiles,
    Program,
    Rules,
    Sample,
    Session,
    Why,
    decide,
)

RULES = Rules(busy_min=0.8, min_gain=1.5, min_age=10, min_observed=4, cooldown=30)
NOW = 1000.0


def place(name: str, speed: float | None, price: int = 100, **kw: object) -> Place:
    base = dict(
        name=name, instance_type=name, speed=speed, price_micros_per_s=price, slots=4,
        free_slots=4, cpus=2, runqueue=0.0,
    )  # fmt: skip
    base.update(kw)
    return Place(**base)  # type: ignore[arg-type]


SLOW = place("slow", 0.2, price=40)
FAST = place("fast", 1.0, price=100)
PLACES = {p.name: p for p in (SLOW, FAST)}
CPU_BOUND = Busy(cpu_s=1.0, wait_s=8.0, span_s=9.0)  # throttled: it waits, but wants a CPU


def program(*sessions: Session, **kw: object) -> Program:
    base: dict[str, object] = dict(
        id="p1", goal=Goal.FASTEST, moves=True, sessions=sessions or (session(),),
        budget_left_micros=None, migrating=False, last_move_at=None,
    )  # fmt: skip
    base.update(kw)
    return Program(**base)  # type: ignore[arg-type]


def session(**kw: object) -> Session:
    base: dict[str, object] = dict(
        instance="slow", pid=4242, argv="python work.py", age_s=20.0, busy=CPU_BOUND
    )
    base.update(kw)
    return Session(**base)  # type: ignore[arg-type]


def test_a_cpu_bound_process_on_a_slow_instance_moves_to_a_faster_one_with_its_reason() -> None:
    d = decide(program(), PLACES, NOW, RULES)
    assert isinstance(d, Move), d
    assert (d.pid, d.source, d.target) == (4242, "slow", "fast")
    assert d.gain == pytest.approx(5.0)
    assert "CPU-bound (100% of a CPU over 9 s) on slow" in d.reason
    assert "fast (speed 1.00) runs it 5.0x faster" in d.reason


def test_it_holds_when_the_move_does_not_pay() -> None:
    # Not CPU-bound: mostly asleep.
    idle = program(session(busy=Busy(cpu_s=1.0, wait_s=0.5, span_s=9.0)))
    d = decide(idle, PLACES, NOW, RULES)
    assert isinstance(d, Hold) and d.why is Why.IDLE, d
    assert "busiest 17% of a CPU" in d.reason
    # Faster, but not by the minimum gain.
    near = {"slow": dataclasses.replace(SLOW, speed=0.8), "fast": FAST}
    d = decide(program(), near, NOW, RULES)
    assert isinstance(d, Hold) and d.why is Why.NO_GAIN and "best 1.25x" in d.reason, d
    # The fast instance is loaded: one more process gets a fifth of its speed there.
    busy_fast = {"slow": SLOW, "fast": dataclasses.replace(FAST, runqueue=9.0)}
    d = decide(program(), busy_fast, NOW, RULES)
    assert isinstance(d, Hold) and d.why is Why.NO_GAIN, d
    # Already on the fastest instance.
    d = decide(program(session(instance="fast")), PLACES, NOW, RULES)
    assert isinstance(d, Hold) and d.why is Why.NO_GAIN, d
    # A target of unknown speed is never compared; a full or draining one never taken.
    for other in (
        dataclasses.replace(FAST, speed=None),
        dataclasses.replace(FAST, free_slots=0),
        dataclasses.replace(FAST, can_take=False),
    ):
        d = decide(program(), {"slow": SLOW, "fast": other}, NOW, RULES)
        assert isinstance(d, Hold), (other, d)


def test_hysteresis_age_profile_back_and_forth_cooldown_and_one_at_a_time() -> None:
    young = decide(program(session(age_s=5.0)), PLACES, NOW, RULES)
    assert isinstance(young, Hold) and young.why is Why.YOUNG, young
    short = decide(program(session(busy=Busy(2.0, 0.0, 2.0))), PLACES, NOW, RULES)
    assert isinstance(short, Hold) and short.why is Why.YOUNG, short
    # It left the fast instance once: it never goes back there.
    back = decide(program(session(left=frozenset({"fast"}))), PLACES, NOW, RULES)
    assert isinstance(back, Hold) and back.why is Why.NO_GAIN, back
    running = decide(program(migrating=True), PLACES, NOW, RULES)
    assert isinstance(running, Hold) and running.why is Why.MIGRATING, running
    recent = decide(program(last_move_at=NOW - 10), PLACES, NOW, RULES)
    assert isinstance(recent, Hold) and recent.why is Why.COOLDOWN, recent
    assert "moved 10 s ago (cooldown 30 s)" in recent.reason
    later = decide(program(last_move_at=NOW - 31), PLACES, NOW, RULES)
    assert isinstance(later, Move), later
    # Two CPU-bound sessions: one move, the one that gains most.
    two = program(session(pid=1), session(pid=2, instance="mid"))
    mid = place("mid", 0.5, price=60)
    d = decide(two, {**PLACES, "mid": mid}, NOW, RULES)
    assert isinstance(d, Move) and d.pid == 1 and d.target == "fast", d


def test_the_budget_bounds_a_move_and_the_policy_can_turn_moves_off() -> None:
    # Expected rest = its age (20 s); at 5x on fast: 4 s x 100/4 - 20 s x 40/4 = -100: cheaper.
    assert isinstance(decide(program(budget_left_micros=0), PLACES, NOW, RULES), Move)
    pricey = {"slow": SLOW, "fast": dataclasses.replace(FAST, price_micros_per_s=4000)}
    # 4 s x 1000 - 20 s x 10 = 3800 micros more.
    d = decide(program(budget_left_micros=3000), pricey, NOW, RULES)
    assert isinstance(d, Hold) and d.why is Why.BUDGET, d
    assert "~3800 micros more" in d.reason and "3000 are left" in d.reason
    d = decide(program(budget_left_micros=4000), pricey, NOW, RULES)
    assert isinstance(d, Move) and d.extra_micros == pytest.approx(3800), d
    assert isinstance(decide(program(budget_left_micros=None), pricey, NOW, RULES), Move)
    # The cost goal moves only when it costs nothing more.
    d = decide(program(goal=Goal.COST), pricey, NOW, RULES)
    assert isinstance(d, Hold) and d.why is Why.COST, d
    assert isinstance(decide(program(goal=Goal.COST), PLACES, NOW, RULES), Move)
    off = decide(program(moves=False), PLACES, NOW, RULES)
    assert isinstance(off, Hold) and off.why is Why.OFF and "off by its policy" in off.reason


def test_resource_policy_latency_and_tenancy_limit_where_it_may_go() -> None:
    d = decide(program(instance_type="slow"), PLACES, NOW, RULES)
    assert isinstance(d, Hold) and d.why is Why.NO_GAIN, d
    d = decide(program(max_price_micros=50), PLACES, NOW, RULES)
    assert isinstance(d, Hold), d
    d = decide(program(session(pid=1), session(pid=2), goal=Goal.LATENCY), PLACES, NOW, RULES)
    assert isinstance(d, Hold) and d.why is Why.LATENCY, d
    assert isinstance(decide(program(goal=Goal.LATENCY), PLACES, NOW, RULES), Move)
    d = decide(program(dedicated=True), PLACES, NOW, RULES)
    assert isinstance(d, Hold) and d.why is Why.TENANCY, d


def test_rules_are_checked() -> None:
    for bad in (dict(busy_min=0), dict(min_gain=1.0), dict(cooldown=-1)):
        with pytest.raises(ValueError):
            Rules(**bad)  # type: ignore[arg-type]


def test_profiles_sum_a_session_s_processes_over_the_window_and_forget_stale_ones() -> None:
    prof = Profiles(window=10.0)
    for t in range(0, 21):  # 20 s: the window keeps the last 10
        at = 100.0 + t
        # the root waits (a shell); its child computes, throttled to a fifth of a CPU, and
        # its instance's clock is 500 s behind the OSS's (only the OSS's says stale)
        prof.observe("p1", "slow", 7, 7, 1.0, Sample(at, 1000, 0), at)
        prof.observe("p1", "slow", 7, 8, 2.0, Sample(at - 500, t * 200_000, t * 800_000), at)
    prof.observe("p1", "slow", 7, 8, 2.0, Sample(-395.0, 0, 0), 121.0)  # late: ignored
    got = prof.busy(120.0)
    b = got[("p1", "slow", 7)]
    assert b.span_s == pytest.approx(10.0, abs=1.0)
    assert b.fraction == pytest.approx(1.0)
    assert b.cpu_s == pytest.approx(b.span_s * 0.2)
    assert prof.programs() == {"p1"}
    assert prof.busy(200.0) == {} and prof.programs() == set()  # nothing sampled lately
    prof.observe("p2", "fast", 3, 3, 1.0, Sample(300.0, 0, 0), 300.0)
    prof.observe("p2", "fast", 3, 3, 1.0, Sample(301.0, 1_000_000, 0), 301.0)
    prof.forget(["p2"])
    assert prof.busy(301.0) == {}
