"""Placement decisions (pure)."""

from __future__ import annotations

import pytest

from oss.compute.scheduler import Assignment, Candidate, SelectionPolicy, Tenancy, eligible, place
from oss.errors import NoCapacity


def c(
    name: str,
    price: int = 10,
    slots: int = 4,
    used: int = 0,
    itype: str = "t",
    storage: str | None = None,
    ded: str | None = None,
) -> Candidate:
    return Candidate(name, itype, slots // 4 or 1, price, storage, slots, used, ded)


def test_packs_next_to_siblings_without_policy() -> None:
    cands = [c("a", used=1), c("b")]
    out = place("p", 2, SelectionPolicy(), cands, {"a": 1}, target_instances=1)
    assert out == [Assignment("a", 2, False)]


def test_spills_to_cheapest_least_loaded_new_instance() -> None:
    cands = [c("a", used=3), c("b", price=20), c("c", price=5, used=2), c("d", price=5)]
    out = place("p", 3, SelectionPolicy(), cands, {"a": 3}, target_instances=1)
    # a has 1 free; then the cheapest new one, least loaded first: d.
    assert out == [Assignment("a", 1, False), Assignment("d", 2, True)]


def test_target_width_spreads_first() -> None:
    cands = [c("a"), c("b"), c("c")]
    out = place("p", 3, SelectionPolicy(), cands, {}, target_instances=3)
    assert sorted(a.instance for a in out) == ["a", "b", "c"]
    assert all(a.processes == 1 and a.new_for_program for a in out)


def test_requirements_filter() -> None:
    cands = [c("cheap", price=1), c("mid", price=50, itype="m"), c("dear", price=500)]
    pol = SelectionPolicy(min_price_micros=10, max_price_micros=100)
    assert [a.instance for a in place("p", 1, pol, cands, {}, 1)] == ["mid"]
    pol = SelectionPolicy(instance_type="t", min_price_micros=100)
    assert [a.instance for a in place("p", 1, pol, cands, {}, 1)] == ["dear"]


def test_storage_is_a_preference_not_a_requirement() -> None:
    cands = [c("net", price=1, storage="network"), c("loc", price=9, storage="local")]
    assert place("p", 1, SelectionPolicy(storage="local"), cands, {}, 1)[0].instance == "loc"
    only = [c("net", storage="network")]
    assert place("p", 1, SelectionPolicy(storage="local"), only, {}, 1)[0].instance == "net"


def test_dedicated_and_shared_tenancy() -> None:
    ded = SelectionPolicy(tenancy=Tenancy.DEDICATED)
    assert not eligible(c("x", used=1), ded, "p")  # busy with someone else
    assert eligible(c("x", used=1, ded="p"), ded, "p")  # already mine
    assert not eligible(c("x", ded="q"), ded, "p")
    assert not eligible(c("x", ded="q"), SelectionPolicy(), "p")  # shared avoids dedicated
    assert eligible(c("x", used=3), SelectionPolicy(), "p")


def test_no_capacity_is_all_or_nothing() -> None:
    with pytest.raises(NoCapacity, match="3 of 4"):
        place("p", 4, SelectionPolicy(), [c("a", slots=3)], {}, 1)
    with pytest.raises(NoCapacity):
        place("p", 1, SelectionPolicy(), [], {}, 1)
    with pytest.raises(ValueError):
        place("p", 0, SelectionPolicy(), [c("a")], {}, 1)


def test_deterministic() -> None:
    cands = [c(n) for n in "zyxw"]
    a = place("p", 5, SelectionPolicy(), cands, {}, 2)
    b = place("p", 5, SelectionPolicy(), list(reversed(cands)), {}, 2)
    assert a == b and sum(x.processes for x in a) == 5


def test_inlined_filter_agrees_with_eligible() -> None:
    import itertools

    pols = [
        SelectionPolicy(),
        SelectionPolicy(tenancy=Tenancy.DEDICATED),
        SelectionPolicy(instance_type="m", max_price_micros=20),
        SelectionPolicy(min_price_micros=15, tenancy=Tenancy.DEDICATED),
    ]
    cands = [
        c(f"x{i}", price=p, used=u, itype=t, ded=d)
        for i, (p, u, t, d) in enumerate(
            itertools.product((10, 20, 30), (0, 2), ("t", "m"), (None, "p", "q"))
        )
    ]
    for pol in pols:
        want = {x.name for x in cands if x.free > 0 and eligible(x, pol, "p")}
        got: set[str] = set()
        for x in cands:
            try:
                got |= {a.instance for a in place("p", 1, pol, [x], {}, 1)}
            except NoCapacity:
                pass
        assert got == want, pol
