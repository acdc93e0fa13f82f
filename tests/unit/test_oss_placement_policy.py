"""The program's placement policy in the OSS scheduler (spread, pack, local).

The cases of tests/unit/test_vmagent_placement.py, ported to the pure functions
both sides now use (`scheduler.choose`, `scheduler.place_by_policy`), plus parity:
the local coordinator's `Placement` and the OSS choose the same instances.
"""

from __future__ import annotations

from collections import Counter

import pytest

from oss.compute import scheduler as S
from oss.errors import NoCapacity
from vmagent.cluster.placement import Placement

ANY = S.SelectionPolicy()


def cand(name: str, cpus: int = 2, used: int = 0, slots: int = 8) -> S.Candidate:
    return S.Candidate(name, None, cpus, 0, None, slots, used, None)


def run(policy: str, cpus: list[tuple[str, int]], n: int, finish: bool = False) -> list[str]:
    """n processes placed by the OSS, one by one, with the home's recency hint."""
    current: dict[str, int] = {}
    recent: list[str] = []
    got = []
    for _ in range(n):
        cands = [cand(name, c, used=current.get(name, 0)) for name, c in cpus]
        (a,) = S.place_by_policy("p", policy, ANY, cands, current, recent)
        got.append(a.instance)
        if policy == "spread":  # what the home sends (OssPlacement)
            recent = [a.instance, *(x for x in recent if x != a.instance)]
        if not finish:
            current[a.instance] = current.get(a.instance, 0) + 1
    return got


THREE = [("i0", 2), ("i1", 2), ("i2", 2)]


def test_spread_six_short_children_land_two_per_instance() -> None:
    assert Counter(run("spread", THREE, 6)) == {"i0": 2, "i1": 2, "i2": 2}


def test_spread_round_robins_when_programs_finish_at_once() -> None:
    assert run("spread", THREE, 6, finish=True) == ["i0", "i1", "i2", "i0", "i1", "i2"]


def test_spread_prefers_the_fewest_of_the_program_s_processes() -> None:
    slots = [S.Slot("i0", 2, 3), S.Slot("i1", 2, 1), S.Slot("i2", 2, 0)]
    assert S.choose("spread", slots)[0] == "i2"
    slots[2] = S.Slot("i2", 2, 1)
    assert S.choose("spread", slots)[0] == "i1"


def test_spread_breaks_ties_by_load() -> None:
    slots = [S.Slot("i0", 2, 0, 3.0), S.Slot("i1", 2, 0, 0.5), S.Slot("i2", 2, 0, 1.0)]
    assert S.choose("spread", slots)[0] == "i1"


def test_pack_fills_first_instance_up_to_its_cpus() -> None:
    got = run("pack", [("a", 2), ("b", 1), ("c", 4)], 7)
    assert got == ["a", "a", "b", "c", "c", "c", "c"]


def test_local_places_nothing() -> None:
    assert S.choose("local", [S.Slot("i0", 2)]) == (None, 0)
    with pytest.raises(NoCapacity):
        S.place_by_policy("p", "local", ANY, [cand("i0")], {})


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="choose one of auto, spread, pack, local"):
        S.choose("random", [S.Slot("i0", 2)])


def test_full_and_ineligible_instances_are_skipped() -> None:
    cands = [cand("a", used=8), cand("b"), S.Candidate("c", None, 2, 0, None, 8, 0, "other")]
    (a,) = S.place_by_policy("p", "spread", ANY, cands, {})
    assert a.instance == "b" and a.new_for_program
    with pytest.raises(NoCapacity):
        S.place_by_policy("p", "spread", ANY, [cand("a", used=8)], {})


def test_the_asking_instance_comes_last_among_equals() -> None:
    (a,) = S.place_by_policy("p", "spread", ANY, [cand("a"), cand("b")], {}, ["a"])
    assert a.instance == "b"


@pytest.mark.parametrize("policy", ["spread", "pack"])
@pytest.mark.parametrize("finish", [False, True])
def test_home_and_oss_choose_alike(policy: str, finish: bool) -> None:
    cpus = [("a", 2), ("b", 1), ("c", 3)]
    home = Placement(policy, cpus)
    got = []
    for _ in range(9):
        name = home.choose()
        home.started(name)
        if finish:
            home.finished(name)
        got.append(name)
    assert got == run(policy, cpus, 9, finish)
