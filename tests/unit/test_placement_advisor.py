"""The cost model's adapter (vmagent.cluster.advisor): chains, learning, notes (fakes only)."""

from __future__ import annotations

from pathlib import Path

from oss.compute.costmodel import Site, Why
from vmagent.cluster.advisor import PROFILES, Advisor, load_history, save_history


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def advisor(clock: Clock, notes: list[str], load: float = 8.0) -> Advisor:
    sites = [Site("node0", 4, 0.0, "vm0"), Site("node1", 4, 0.0, "vm1")]
    return Advisor(
        "home", others=lambda: sites, note=notes.append, cpus=2, machine="laptop",
        load=lambda: load, clock=clock,
    )  # fmt: skip


def test_env_running_python_is_a_chain_that_stays() -> None:
    clock, notes = Clock(), []
    a = advisor(clock, notes)
    assert a.decide(10, b"/usr/bin/env", [b"env", b"python3", b"x.py"]).kind == Why.UNKNOWN
    a.execed(10, ["env", "python3", "x.py"])
    v = a.decide(10, b"/usr/bin/python3", [b"python3", b"x.py"])
    assert (v.placed, v.kind) == (False, Why.CHAIN)


def test_a_failed_exec_is_no_chain() -> None:
    clock, notes = Clock(), []
    a = advisor(clock, notes)
    a.decide(11, b"/usr/local/bin/cc", [b"cc", b"-c", b"a.c"])  # ENOENT: no exec event
    assert a.decide(11, b"/usr/bin/cc", [b"cc", b"-c", b"a.c"]).kind == Why.UNKNOWN


def test_run_times_are_learned_and_a_long_program_on_a_busy_home_is_placed() -> None:
    clock, notes = Clock(), []
    a = advisor(clock, notes)
    a.decide(12, b"/bin/sim", [b"sim", b"in.dat"])
    a.execed(12, ["sim", "in.dat"])
    clock.now += 5.0
    a.exited(12)
    v = a.decide(13, b"/bin/sim", [b"sim", b"other.dat"])
    assert (v.placed, v.where, v.kind) == (True, "node0", Why.LONG)
    a.decide(14, b"/bin/true", [b"true"])
    a.execed(14, ["true"])
    clock.now += 0.001
    a.exited(14)
    assert a.decide(15, b"/bin/true", [b"true"]).kind == Why.SHORT


def test_a_run_still_going_long_makes_its_siblings_long() -> None:
    clock, notes = Clock(), []
    a = advisor(clock, notes)
    a.decide(20, b"/bin/sim", [b"sim", b"1.dat"])
    a.execed(20, ["sim", "1.dat"])
    clock.now += 2.0
    assert a.decide(21, b"/bin/sim", [b"sim", b"2.dat"]).placed


def test_each_shape_and_verdict_is_noted_once_and_counted() -> None:
    clock, notes = Clock(), []
    a = advisor(clock, notes)
    for pid in range(30, 40):
        a.decide(pid, b"/bin/cc", [b"cc", b"-c", f"{pid}.c".encode()])
    assert len(notes) == 1 and "never ran before" in notes[0]
    assert a.counts == {Why.UNKNOWN: 10}
    assert a.summary() == "placement on home: 10 execs decided (unknown 10)"


def test_run_times_are_kept_for_the_next_run_readable_only_by_their_user(tmp_path: Path) -> None:
    clock, notes = Clock(), []
    a = advisor(clock, notes)
    a.decide(40, b"/bin/sim", [b"sim", b"x.dat"])
    a.execed(40, ["sim", "x.dat"])
    clock.now += 3.0
    a.exited(40)
    path = tmp_path / PROFILES
    save_history(path, a.history)
    assert path.stat().st_mode & 0o777 == 0o600
    again = load_history(path)
    assert again.get("sim *.dat") == a.history.get("sim *.dat")
    path.write_text("{not json")
    assert load_history(path).profiles == {}
    assert load_history(tmp_path / "missing.json").profiles == {}
    # The run's recorder may not have made the state directory yet: made here, private.
    save_history(tmp_path / "no-such-dir" / PROFILES, a.history)
    assert (tmp_path / "no-such-dir").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "no-such-dir" / PROFILES).stat().st_mode & 0o777 == 0o600


def test_execs_are_stopped_only_when_one_may_be_placed_or_decisions_are_shown() -> None:
    import logging

    local = [Site(f"node{i}", 2, 0.0, "laptop") for i in range(3)]
    shared = Advisor("home", others=lambda: local, machine="laptop", cpus=2)
    assert not shared.may_place()
    remote = Advisor("home", others=lambda: [*local, Site("vm", 2, 0.0, "vm0")], machine="laptop")
    assert remote.may_place() and remote.needs_execs()
    assert Advisor("node1").may_place()  # the OSS knows the instances
    placement = logging.getLogger("dcp.placement")
    old = placement.level
    try:
        placement.setLevel(logging.WARNING)
        assert not shared.needs_execs()
        placement.setLevel(logging.INFO)  # --trace / -v: every decision is shown
        assert shared.needs_execs()
    finally:
        placement.setLevel(old)
