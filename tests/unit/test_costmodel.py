"""The placement cost model (oss.compute.costmodel): pure decisions, one rule per test."""

from __future__ import annotations

from oss.compute.costmodel import (
    Costs,
    Exec,
    History,
    Profile,
    Site,
    Why,
    decide,
    rank,
    shape,
)

COSTS = Costs(placement_s=0.030, min_ratio=10.0)
IDLE = [Site("node0", 4, 0.0, "vm0"), Site("node1", 4, 1.0, "vm1")]
BUSY_HOME = Site("home", 2, 6.0, "laptop")


def test_compiles_of_different_files_share_a_shape_and_a_link_does_not() -> None:
    a = shape("/usr/bin/cc", ["cc", "-c", "-O2", "a.c", "-o", "a.o"])
    b = shape("/usr/bin/cc", ["cc", "-c", "-O2", "src/b.c", "-o", "b.o"])
    link = shape("/usr/bin/cc", ["cc", "a.o", "b.o", "c.o", "-o", "app"])
    assert a == b == "cc -c -O2 *.c -o *.o"
    assert link == "cc *.o -o *"
    assert shape("/usr/bin/python3", ["python3", "--opt=1", "x.py"]) == "python3 --opt *.py"


def test_history_smooths_run_times_and_seeds_from_records() -> None:
    h = History.from_records([("/bin/sleep", ["sleep", "1"], 1.0)])
    assert h.get("sleep *") == Profile(1, 1.0)
    p = h.observe("sleep *", 2.0)
    assert p.runs == 2 and 1.0 < p.seconds < 2.0
    assert h.get("true") is None


def test_an_exec_chain_stays_where_it_runs_even_when_long() -> None:
    v = decide(Exec("python3 *.py", chain=True), Profile(5, 60.0), BUSY_HOME, IDLE, COSTS)
    assert (v.placed, v.where, v.kind) == (False, "home", Why.CHAIN)


def test_a_program_never_seen_stays() -> None:
    v = decide(Exec("cc -c *.c"), None, BUSY_HOME, IDLE, COSTS)
    assert (v.placed, v.kind) == (False, Why.UNKNOWN)


def test_a_short_program_stays_even_when_home_is_busy() -> None:
    v = decide(Exec("true"), Profile(100, 0.002), BUSY_HOME, IDLE, COSTS)
    assert (v.placed, v.kind) == (False, Why.SHORT)
    assert "2 ms" in v.reason and "30 ms" in v.reason


def test_a_long_program_stays_while_home_has_a_free_core() -> None:
    v = decide(Exec("sim *"), Profile(3, 20.0), Site("home", 8, 2.0), IDLE, COSTS)
    assert (v.placed, v.kind) == (False, Why.FREE)


def test_a_long_program_goes_to_the_instance_where_it_ends_first() -> None:
    v = decide(Exec("sim *"), Profile(3, 20.0), BUSY_HOME, IDLE, COSTS)
    assert (v.placed, v.where, v.kind) == (True, "node0", Why.LONG)


def test_instances_on_the_home_machine_never_take_work_from_it() -> None:
    local = [Site(f"node{i}", 2, 0.0, "laptop") for i in range(3)]
    v = decide(Exec("sim *"), Profile(3, 20.0), BUSY_HOME, local, COSTS)
    assert (v.placed, v.kind) == (False, Why.SHARED)


def test_no_gain_when_every_instance_is_as_busy_as_home() -> None:
    busy = [Site("node0", 2, 6.0, "vm0")]
    v = decide(Exec("sim *"), Profile(3, 20.0), BUSY_HOME, busy, COSTS)
    assert (v.placed, v.kind) == (False, Why.NO_GAIN)


def test_a_run_just_long_enough_to_pay_for_its_placement_is_placed() -> None:
    # 10 placements' worth on a home 4x oversubscribed: placing wins.
    v = decide(Exec("job"), Profile(1, 0.300), BUSY_HOME, IDLE, COSTS)
    assert v.placed
    # Just under the threshold: stays, however busy home is.
    v = decide(Exec("job"), Profile(1, 0.299), BUSY_HOME, IDLE, COSTS)
    assert not v.placed


def test_parallel_long_runs_spread_as_instances_fill() -> None:
    sites = {s.name: s for s in IDLE}
    where = []
    for _ in range(6):
        v = decide(Exec("sim *"), Profile(3, 20.0), BUSY_HOME, list(sites.values()), COSTS)
        assert v.placed
        where.append(v.where)
        s = sites[v.where]
        sites[v.where] = Site(s.name, s.cpus, s.busy + 1, s.machine)
    assert set(where) == {"node0", "node1"}
    assert where.count("node0") == 4 and where.count("node1") == 2  # node1 had 1 busy


def test_the_oss_ranks_instances_by_expected_finish() -> None:
    sites = [Site("a", 2, 2.0), Site("b", 8, 2.0), Site("c", 2, 0.0)]
    assert rank(sites, {}) == ["b", "c", "a"]
    assert rank([Site("a", 2, 0.0), Site("b", 2, 0.0)], {"a": 3}) == ["b", "a"]


def test_without_known_instances_a_long_run_on_a_busy_site_asks_the_oss() -> None:
    v = decide(Exec("sim *"), Profile(3, 20.0), BUSY_HOME, None, COSTS)
    assert (v.placed, v.where, v.kind) == (True, "", Why.LONG)
    v = decide(Exec("cc"), Profile(3, 0.01), BUSY_HOME, None, COSTS)
    assert not v.placed


def test_profiles_survive_a_dump_and_bad_data_is_left_out() -> None:
    h = History()
    h.observe("cc -c *.c", 0.1)
    h.observe("cc -c *.c", 0.1)
    h.observe("sim *", 20.0)
    again = History.load(h.dump())
    assert again.profiles == h.profiles
    assert list(h.dump(limit=1)) == ["cc -c *.c"]  # the most run first
    bad = History.load({"a": [1, -2], "b": "x", "c": [1, 2, 3], "d": [2, 0.5], 3: [1, 1]})
    assert bad.profiles == {"d": Profile(2, 0.5)}
    assert History.load(["not", "a", "dict"]).profiles == {}
