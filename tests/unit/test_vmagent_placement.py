"""Placement policies: spread, pack, local."""

from __future__ import annotations

from collections import Counter

import pytest

from vmagent.cluster.placement import HOME, Placement, UnknownPolicy
from vmagent.errors import NoInstances

THREE = [("i0", 2), ("i1", 2), ("i2", 2)]


def test_spread_six_short_children_land_two_per_instance() -> None:
    p = Placement("spread", THREE)
    got = []
    for _ in range(6):
        name = p.choose()
        p.started(name)
        got.append(name)
    assert Counter(got) == {"i0": 2, "i1": 2, "i2": 2}


def test_spread_round_robins_when_programs_finish_at_once() -> None:
    p = Placement("spread", THREE)
    got = []
    for _ in range(6):
        name = p.choose()
        p.started(name)
        p.finished(name)
        got.append(name)
    assert got == ["i0", "i1", "i2", "i0", "i1", "i2"]


def test_spread_prefers_the_least_running() -> None:
    p = Placement("spread", THREE)
    for _ in range(3):
        p.started("i0")
    p.started("i1")
    assert p.choose() == "i2"
    p.started("i2")
    assert p.choose() == "i1"


def test_spread_breaks_ties_by_reported_load() -> None:
    p = Placement("spread", THREE)
    p.report_load("i0", 3.0)
    p.report_load("i1", 0.5)
    p.report_load("i2", 1.0)
    assert p.choose() == "i1"


def test_pack_fills_first_instance_up_to_its_cpus() -> None:
    p = Placement("pack", [("a", 2), ("b", 1), ("c", 4)])
    got = []
    for _ in range(7):
        name = p.choose()
        p.started(name)
        got.append(name)
    assert got == ["a", "a", "b", "c", "c", "c", "c"]
    # All full: the least loaded (fewest running) takes the next one.
    assert p.choose() in {"a", "b"}
    p.finished("a")
    p.finished("a")
    assert p.choose() == "a"


def test_local_never_places_remotely() -> None:
    p = Placement("local", THREE)
    assert {p.choose() for _ in range(10)} == {HOME}


def test_unknown_policy_is_a_typed_error() -> None:
    with pytest.raises(UnknownPolicy, match="choose one of auto, spread, pack, local"):
        Placement("random", THREE)


def test_no_instances_is_a_typed_error() -> None:
    with pytest.raises(NoInstances):
        Placement("spread", []).choose()


def test_removed_instance_is_never_chosen() -> None:
    p = Placement("spread", THREE)
    p.remove("i1")
    assert {p.choose() for _ in range(6)} == {"i0", "i2"}
    assert [v.name for v in p.views()] == ["i0", "i2"]


def test_finished_never_goes_negative() -> None:
    p = Placement("spread", THREE)
    p.finished("i0")
    assert [v.running for v in p.views()] == [0, 0, 0]
