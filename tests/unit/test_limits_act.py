"""Limits act (issue 10), pure parts: breach, the command queue, the enforcer's order logic."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest

from oss.billing.limits import Breach, Level, Limits, Usage, breach, check
from oss.compute.commands import CommandQueue
from oss.errors import BudgetExhausted
from vmagent.trace.enforce import Enforcer

# -- breach -----------------------------------------------------------------------


def test_no_limit_no_breach() -> None:
    levels = [(lv, Limits()) for lv in Level]
    assert breach(levels, {lv: Usage(99, 99, 99, 99) for lv in Level}) is None


def test_hard_budget_is_reached_at_equality() -> None:
    levels = [(Level.PROGRAM, Limits(hard_budget_micros=1000))]
    assert breach(levels, {Level.PROGRAM: Usage(spent_micros=999)}) is None
    b = breach(levels, {Level.PROGRAM: Usage(spent_micros=1000)})
    assert b == Breach(Level.PROGRAM, "hard_budget_micros", 1000, 1000)
    assert b.state == "stopped_budget"
    assert b.message() == "program hard budget of 1000 micros reached (spent 1000)"


@pytest.mark.parametrize(
    ("lim", "use", "resource", "value"),
    [
        (Limits(max_instances=2), Usage(instances=3), "instances", 3),
        (Limits(max_storage_mb=100), Usage(storage_mb=101), "storage_mb", 101),
        (Limits(max_bandwidth_mbps=10), Usage(bandwidth_mbps=11), "bandwidth_mbps", 11),
    ],
)
def test_resources_breach_strictly_above_their_limit(
    lim: Limits, use: Usage, resource: str, value: int
) -> None:
    at = Usage(**{k: getattr(use, k) - 1 if getattr(use, k) else 0 for k in use.__slots__})
    assert breach([(Level.USER, lim)], {Level.USER: at}) is None
    b = breach([(Level.USER, lim)], {Level.USER: use})
    assert b is not None and (b.level, b.resource, b.value) == (Level.USER, resource, value)
    assert b.state == "stopped_limit" and "exceeded (measured" in b.message()


def test_levels_in_order_and_budget_before_resources() -> None:
    levels = [
        (Level.ACCOUNT, Limits(max_instances=1)),
        (Level.USER, Limits(hard_budget_micros=5)),
    ]
    measured = {Level.ACCOUNT: Usage(instances=2), Level.USER: Usage(spent_micros=9)}
    b = breach(levels, measured)
    assert b is not None and b.level is Level.ACCOUNT and b.resource == "instances"
    both = [(Level.PROGRAM, Limits(max_instances=1, hard_budget_micros=5))]
    b = breach(both, {Level.PROGRAM: Usage(instances=2, spent_micros=5)})
    assert b is not None and b.resource == "hard_budget_micros"


def test_soft_budget_message_names_level_budget_and_spend() -> None:
    with pytest.raises(BudgetExhausted) as ei:
        check([(Level.ACCOUNT, Limits(budget_micros=10), Usage(spent_micros=12))], _delta())
    assert "account soft budget of 10 micros reached (spent 12)" in str(ei.value)


def _delta():  # type: ignore[no-untyped-def]
    from oss.billing.limits import Delta

    return Delta(instances=1)


# -- command queue ----------------------------------------------------------------


def test_commands_reach_only_their_instance_until_done() -> None:
    q = CommandQueue()
    q.minted("prog_a", "n0", ["aa", "bb"])
    q.minted("prog_a", "n1", ["cc"])
    q.minted("prog_b", "n0", ["dd"])
    cmds = q.stop("prog_a", ["n0", "n1"], "stopped: x")
    assert [(c.instance, c.action) for c in cmds] == [
        ("n0", "freeze"),
        ("n0", "kill"),
        ("n1", "freeze"),
        ("n1", "kill"),
    ]
    n0 = q.for_instance("n0", [])
    assert [c.action for c in n0] == ["freeze", "kill"]
    assert all(c.tickets == ("aa", "bb") and c.program == "prog_a" for c in n0)
    assert [c.tickets for c in q.for_instance("n1", [])] == [("cc",), ("cc",)]
    assert q.for_instance("n2", []) == []
    # Repeated until the agent says done; then gone.
    assert q.for_instance("n0", [n0[0].id]) == [n0[1]]
    assert q.for_instance("n0", [n0[1].id]) == []
    # Another program's nonces were not handed out.
    assert q.stop("prog_b", [], "r")[0].tickets == ("dd",)


def test_a_finished_program_forgets_its_nonces_and_a_gone_instance_its_orders() -> None:
    q = CommandQueue()
    q.minted("p", "n0", ["aa"])
    q.forget_program("p")
    assert q.stop("p", ["n0"], "r")[0].tickets == ()
    q.drop_instance("n0")
    assert q.for_instance("n0", []) == []


# -- enforcer ---------------------------------------------------------------------


class FakeGroups:
    """Groups in memory: records what the enforcer asks of the hierarchy."""

    kind = "fake"

    def __init__(self) -> None:
        self.members: dict[Path, set[int]] = {}
        self.frozen: dict[Path, bool] = {}
        self.calls: list[tuple[str, str]] = []

    def make(self, key: str) -> Path:
        p = Path("/fake") / key
        self.members.setdefault(p, set())
        return p

    def add(self, group: Path, pid: int) -> None:
        self.members[group].add(pid)

    def pids(self, group: Path) -> list[int]:
        return sorted(self.members.get(group, ()))

    def set_frozen(self, group: Path, frozen: bool) -> None:
        self.calls.append(("freeze" if frozen else "thaw", group.name))
        self.frozen[group] = frozen

    def is_frozen(self, group: Path) -> bool:
        return self.frozen.get(group, False)

    def remove(self, group: Path) -> None:
        self.calls.append(("remove", group.name))
        self.members.pop(group)


class FakeSession:
    """What the enforcer reads of a session."""

    def __init__(self, pid: int, nonce: str) -> None:
        self.pid = pid
        self.nonce = nonce
        self.sid = os.urandom(16)
        self.status: int | None = None


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


def test_freeze_then_kill_acts_on_the_programs_sessions_only() -> None:
    groups = FakeGroups()
    seen: list[tuple[str, str, str]] = []
    enforcer = Enforcer("n0", groups, on_event=lambda *e: seen.append(e))
    mine, other = _sleeper(), _sleeper()
    try:
        a, b = FakeSession(mine.pid, "aa"), FakeSession(other.pid, "zz")
        enforcer.started(a)  # type: ignore[arg-type]
        enforcer.started(b)  # type: ignore[arg-type]
        cmds = [
            {"id": 1, "program": "p", "action": "freeze", "reason": "r", "tickets": ["aa"]},
            {"id": 2, "program": "p", "action": "kill", "reason": "r", "tickets": ["aa"]},
        ]
        done = asyncio.run(enforcer.carry_out(cmds, [a, b]))  # type: ignore[list-item]
        assert done == [1, 2]
        group = enforcer.key_of(a)  # type: ignore[arg-type]
        # frozen, then (after the SIGKILL) thawed: a frozen task dies only once thawed
        assert groups.calls == [("freeze", group), ("thaw", group)]
        assert mine.wait(10) == -signal.SIGKILL
        assert other.poll() is None
        assert [e.kind for e in enforcer.events] == ["frozen", "killed"]
        assert enforcer.events[1].pids == (mine.pid,)
        assert seen == [("p", "frozen", "frozen by fake: r"), ("p", "killed", "killed by fake: r")]
        # A command seen again (its reply crossed our beat) is acknowledged, not redone.
        assert asyncio.run(enforcer.carry_out(cmds[:1], [a, b])) == [1]  # type: ignore[list-item]
        assert len(enforcer.events) == 2
        a.status = 9
        groups.members[Path("/fake", group)].clear()  # the kernel empties it once reaped
        enforcer.ended(a, 9)  # type: ignore[arg-type]
        assert ("remove", group) in groups.calls
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()


def test_without_a_cgroup_freeze_is_sigstop_and_kill_lands() -> None:
    enforcer = Enforcer("n0", None)
    p = _sleeper()
    try:
        s = FakeSession(p.pid, "aa")
        enforcer.started(s)  # type: ignore[arg-type]
        cmd = {"id": 7, "program": "p", "action": "freeze", "reason": "r", "tickets": ["aa"]}
        asyncio.run(enforcer.carry_out([cmd], [s]))  # type: ignore[list-item]
        _, status = os.waitpid(p.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
        kill = dict(cmd, id=8, action="kill")
        asyncio.run(enforcer.carry_out([kill], [s]))  # type: ignore[list-item]
        assert p.wait(10) == -signal.SIGKILL
        assert enforcer.events[-1].how == "signals"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_malformed_and_unknown_commands_are_skipped() -> None:
    enforcer = Enforcer("n0", None)
    done = asyncio.run(
        enforcer.carry_out(
            [{"id": "x"}, {"id": 3, "program": "p", "action": "explode", "reason": ""}], []
        )
    )
    assert done == [3] and list(enforcer.events) == []


# -- the home's lines ---------------------------------------------------------------


def test_the_home_stop_line_and_the_lost_instance_pattern() -> None:
    from oss.models import StopInfo
    from vmagent.cluster.ossmode import LOST_REASON, stop_line

    stop = StopInfo(level="program", resource="hard_budget_micros", limit=1000, value=1100)
    assert stop_line(stop, "ignored") == (
        "stopped: program hard budget of 1000 micros reached (spent 1100) [level program]"
    )
    storage = StopInfo(level="user", resource="storage_mb", limit=10, value=12)
    assert stop_line(storage, "") == (
        "stopped: user storage (MB) limit of 10 exceeded (measured 12) [level user]"
    )
    assert stop_line(None, "stopped: by hand") == "stopped: by hand"
    m = LOST_REASON.match("instance node2 failed: no heartbeat for over 5s")
    assert m is not None and m[1] == "node2"
    assert LOST_REASON.match("running") is None


def test_the_cgroup_files_each_hierarchy_writes(tmp_path: Path) -> None:
    from vmagent.trace.enforce import FreezerV1, FreezerV2

    v2 = FreezerV2(tmp_path / "v2")
    g = v2.make("p-prog_1")
    (g / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    v2.set_frozen(g, True)
    assert (g / "cgroup.freeze").read_text() == "1\n" and not v2.is_frozen(g)
    (g / "cgroup.events").write_text("populated 1\nfrozen 1\n")  # the kernel's answer
    assert v2.is_frozen(g)
    v2.add(g, 42)
    assert (g / "cgroup.procs").read_text() == "42\n" and v2.pids(g) == [42]
    v1 = FreezerV1(tmp_path / "v1")
    g1 = v1.make("s-ab")
    v1.set_frozen(g1, True)
    assert (g1 / "freezer.state").read_text() == "FROZEN\n" and v1.is_frozen(g1)
    v1.set_frozen(g1, False)
    assert not v1.is_frozen(g1)


class FakeSuspension:
    """Suspends the sessions whose pid is in `able`; remembers what it holds."""

    def __init__(self, able: set[int]) -> None:
        self.able = able
        self.held: set[int] = set()
        self.resumed: list[int] = []

    def holds(self, session: FakeSession) -> bool:
        return session.pid in self.held

    async def suspend(self, session: FakeSession) -> str | None:
        if session.pid not in self.able:
            return "pid holds the device /dev/fuse"
        os.kill(session.pid, signal.SIGKILL)  # what the checkpointer does after its dump
        self.held.add(session.pid)
        return None

    async def resume(self, session: FakeSession) -> str | None:
        self.held.discard(session.pid)
        self.resumed.append(session.pid)
        return None


def test_a_checkpointing_kill_suspends_what_it_can_and_kills_the_rest() -> None:
    groups = FakeGroups()
    seen: list[tuple[str, str, str]] = []
    enforcer = Enforcer("n0", groups, on_event=lambda *e: seen.append(e))
    able, unable = _sleeper(), _sleeper()
    suspension = FakeSuspension({able.pid})
    enforcer.suspension = suspension  # type: ignore[assignment]
    try:
        a, b = FakeSession(able.pid, "aa"), FakeSession(unable.pid, "aa")
        enforcer.started(a)  # type: ignore[arg-type]
        enforcer.started(b)  # type: ignore[arg-type]
        stop = {"program": "p", "reason": "r", "tickets": ["aa"]}
        cmds = [
            dict(stop, id=1, action="freeze"),
            dict(stop, id=2, action="kill", checkpoint=True),
        ]
        asyncio.run(enforcer.carry_out(cmds, [a, b]))  # type: ignore[list-item]
        assert suspension.held == {able.pid}
        assert unable.wait(10) == -signal.SIGKILL
        kinds = [(k, t.split(" (")[0]) for _, k, t in seen]
        assert ("suspended", f"pid {able.pid} checkpointed and stopped") in kinds
        assert ("killed", f"pid {unable.pid} cannot be checkpointed") in kinds
        assert "cannot be checkpointed (pid holds the device /dev/fuse): killed" in seen[2][2]
        # frozen, thawed for the checkpoint, thawed after the kill of the rest
        assert [c for c, _ in groups.calls[:2]] == ["freeze", "freeze"]
        assert groups.calls[2] == ("thaw", enforcer.key_of(a))  # type: ignore[arg-type]
        # a second stop does not touch the suspended one; resume restores it
        again = dict(stop, id=3, action="kill", checkpoint=True)
        asyncio.run(enforcer.carry_out([again], [a]))  # type: ignore[list-item]
        asyncio.run(
            enforcer.carry_out([dict(stop, id=4, action="resume")], [a, b])  # type: ignore[list-item]
        )
        assert suspension.resumed == [able.pid] and not suspension.held
        assert seen[-1] == ("p", "resumed", f"pid {able.pid} restored from its checkpoint")
    finally:
        for p in (able, unable):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_checkpointing_stop_keeps_the_nonces_for_the_resume() -> None:
    q = CommandQueue()
    q.minted("p", "n0", ["aa"])
    stop = q.stop("p", ["n0"], "budget", checkpoint=True)
    assert [(c.action, c.checkpoint) for c in stop] == [("freeze", False), ("kill", True)]
    (resume,) = q.resume("p", [], "resumed by u")
    assert (resume.instance, resume.action, resume.tickets) == ("n0", "resume", ("aa",))
    assert [c.action for c in q.for_instance("n0", [])] == ["freeze", "kill", "resume"]
    plain = q.stop("p", ["n0"], "budget")
    assert not any(c.checkpoint for c in plain) and q.resume("p", [], "r") == []
