"""Failover from checkpoints (issue 12): the OSS's store and decisions, the home's
hand-off of restorations, the agent's forgiving inbox, `--checkpoint-every`'s value.

Fakes stand in for the body stream (readexactly/readany, as aiohttp's) and the
instances' addresses; the store writes real files in a temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from oss import models as m
from oss.compute.commands import CommandQueue
from oss.compute.failover import END, CheckpointStore, Failover, choose_target
from oss.errors import Conflict, Forbidden, InvalidRequest, PayloadTooLarge
from tracer.cli import _seconds
from tracer.errors import UsageError
from vmagent.checkpoint.periodic import ForgivingInbox
from vmagent.cluster.ossmode import follow_restorations
from vmagent.exec import protocol as P

PROGRAM = "prog_0123456789abcdef"
SESSION = "ab" * 16


class Body:
    """A request body as aiohttp's StreamReader gives it, in pieces."""

    def __init__(self, data: bytes, piece: int = 7000) -> None:
        self.data = data
        self.piece = piece

    async def readexactly(self, n: int) -> bytes:
        if len(self.data) < n:
            raise asyncio.IncompleteReadError(self.data, n)
        out, self.data = self.data[:n], self.data[n:]
        return out

    async def readany(self) -> bytes:
        out, self.data = self.data[: self.piece], self.data[self.piece :]
        return out


def checkpoint(
    images: bytes = b"x" * 50_000, *, whole: bool = True, pid: int = 4242, key: str = "k"
) -> bytes:
    meta = {
        "session": SESSION, "program_id": PROGRAM, "pid": pid, "nonce": "n1", "key": key,
        "request": {"argv": [b"python3".hex()]}, "taken": 1000.0,
    }  # fmt: skip
    head = json.dumps(meta).encode()
    return struct.pack(">I", len(head)) + head + images + (END if whole else b"")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_complete_checkpoint_is_stored_private_and_replaces_the_last(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    first = run(store.receive(PROGRAM, SESSION, "node0", Body(checkpoint(pid=1))))
    assert first.path.read_bytes() == checkpoint(pid=1)
    assert first.path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "checkpoints").stat().st_mode & 0o777 == 0o700
    assert first.path.parent.stat().st_mode & 0o777 == 0o700
    second = run(store.receive(PROGRAM, SESSION, "node0", Body(checkpoint(pid=2))))
    assert second.path == first.path and second.path.read_bytes() == checkpoint(pid=2)
    assert store.index[(PROGRAM, SESSION)].pid == 2
    assert [p.name for p in first.path.parent.iterdir()] == [f"{SESSION}.ckpt"]


def test_a_cut_checkpoint_never_replaces_the_last_good_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    good = run(store.receive(PROGRAM, SESSION, "node0", Body(checkpoint(pid=1))))
    with pytest.raises(InvalidRequest, match="ends early"):
        run(store.receive(PROGRAM, SESSION, "node0", Body(checkpoint(pid=2, whole=False))))
    with pytest.raises(asyncio.IncompleteReadError):
        run(store.receive(PROGRAM, SESSION, "node0", Body(checkpoint(pid=2)[:10])))
    assert good.path.read_bytes() == checkpoint(pid=1)
    assert store.index[(PROGRAM, SESSION)].pid == 1
    assert [p.name for p in good.path.parent.iterdir()] == [f"{SESSION}.ckpt"]


def test_a_checkpoint_past_the_cap_or_malformed_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, cap=10_000)
    with pytest.raises(PayloadTooLarge):
        run(store.receive(PROGRAM, SESSION, "node0", Body(checkpoint(b"y" * 20_000))))
    with pytest.raises(InvalidRequest, match="session id"):
        run(store.receive(PROGRAM, "../../etc", "node0", Body(checkpoint())))
    with pytest.raises(InvalidRequest, match="program id"):
        run(store.receive("../x", SESSION, "node0", Body(checkpoint())))
    other = checkpoint().replace(PROGRAM.encode(), b"prog_ffffffffffffffff")
    with pytest.raises(InvalidRequest, match="description"):
        run(store.receive(PROGRAM, SESSION, "node0", Body(other)))
    assert store.index == {}


def test_the_replacement_is_the_least_loaded_instance_not_tried() -> None:
    assert choose_target({"a", "b", "c"}, {"a": 2, "b": 1}, {"c"}) == "b"
    assert choose_target({"a", "b"}, {}, set()) == "a"
    assert choose_target({"a"}, {}, {"a"}) == ""


def make_failover(tmp_path: Path, ready: dict[str, str]) -> tuple[Failover, CommandQueue, list]:
    said: list[str] = []
    queue = CommandQueue()

    async def targets() -> dict[str, str]:
        return dict(ready)

    async def program_log(program: str, text: str) -> None:
        said.append(text)

    f = Failover(
        CheckpointStore(tmp_path), queue, targets, lambda n: n != "nocriu",
        lambda *a, **k: None, program_log, clock=lambda: 2000.0,
    )  # fmt: skip
    return f, queue, said


def test_checkpoints_come_only_from_the_instance_that_holds_the_session(tmp_path: Path) -> None:
    f, queue, _said = make_failover(tmp_path, {})
    with pytest.raises(Forbidden):  # no policy
        run(f.receive("node0", PROGRAM, SESSION, Body(checkpoint())))
    f.want(PROGRAM, 1.0)
    f.granted(PROGRAM, ["node0", "node1"])
    f.granted(PROGRAM, ["node0"])  # told once
    orders = [c for i in ("node0", "node1") for c in queue.for_instance(i, [])]
    assert [(c.instance, c.action, c.every) for c in orders] == [
        ("node0", "checkpoint", 1.0), ("node1", "checkpoint", 1.0),
    ]  # fmt: skip
    with pytest.raises(Forbidden):  # never placed there
        run(f.receive("node2", PROGRAM, SESSION, Body(checkpoint())))
    run(f.receive("node0", PROGRAM, SESSION, Body(checkpoint())))
    with pytest.raises(Conflict, match="held by node0"):
        run(f.receive("node1", PROGRAM, SESSION, Body(checkpoint(pid=9))))
    assert f.store.index[(PROGRAM, SESSION)].pid == 4242


def test_a_lost_instance_s_checkpointed_session_is_restored_and_the_instance_fenced(
    tmp_path: Path,
) -> None:
    f, queue, said = make_failover(tmp_path, {"node1": "10.0.0.2:1", "nocriu": "10.0.0.3:1"})
    f.want(PROGRAM, 1.0)
    f.granted(PROGRAM, ["node0"])
    queue.for_instance("node0", [c.id for c in queue.for_instance("node0", [])])
    run(f.receive("node0", PROGRAM, SESSION, Body(checkpoint())))
    planned = f.plan(["node0"], {"node0": {PROGRAM, "prog_other"}})
    assert [p.stored.session for p in planned] == [SESSION]
    assert [r.instance for r in f.of_program(PROGRAM)] == [""]  # under way
    run(f.dispatch())
    (order,) = [c for c in queue.for_instance("node1", []) if c.action == "restore"]
    assert (order.program, order.session) == (PROGRAM, SESSION)
    assert queue.for_instance("nocriu", []) == []  # its CRIU does not work
    assert f.serving("node1", PROGRAM, SESSION) == f.store.index[(PROGRAM, SESSION)].path
    with pytest.raises(Exception, match="no restore"):
        f.serving("nocriu", PROGRAM, SESSION)
    ok = m.RestoreOutcome(command=order.id, ok=True, pid=4242, salt="ab12", restore_ms=30)
    run(f.outcome("node1", ok))
    (done,) = f.of_program(PROGRAM)
    assert (done.instance, done.address, done.salt, done.lost) == (
        "node1", "10.0.0.2:1", "ab12", "node0",
    )  # fmt: skip
    assert any("restored: pid 4242" in s for s in said)
    assert f.holder[(PROGRAM, SESSION)] == "node1"  # its checkpoints now come from there
    # node0 comes back: a kill of each program it held, matched by program.
    assert f.fence("node0") == [PROGRAM, "prog_other"]
    kills = queue.for_instance("node0", [])
    assert {(c.program, c.action, c.tickets) for c in kills} == {
        (PROGRAM, "kill", ()), ("prog_other", "kill", ()),
    }  # fmt: skip
    assert f.fence("node0") == []
    f.forget(PROGRAM)
    assert not (tmp_path / PROGRAM).exists() and f.of_program(PROGRAM) == []


def test_a_failed_restore_tries_another_instance(tmp_path: Path) -> None:
    f, queue, said = make_failover(tmp_path, {"node1": "a:1", "node2": "b:1"})
    f.want(PROGRAM, 1.0)
    f.granted(PROGRAM, ["node0"])
    run(f.receive("node0", PROGRAM, SESSION, Body(checkpoint())))
    f.plan(["node0"], {})
    run(f.dispatch())
    (first,) = [c for c in queue.for_instance("node1", []) if c.action == "restore"]
    run(f.outcome("node1", m.RestoreOutcome(command=first.id, ok=False, error="pids in use")))
    assert any("failed: pids in use" in s for s in said)
    run(f.dispatch())
    (second,) = [c for c in queue.for_instance("node2", []) if c.action == "restore"]
    assert second.session == SESSION


def test_home_hears_restorations_under_way_then_each_done_once() -> None:
    restoring: list[set[str]] = []
    restored: list[str] = []
    news = [{"nonce": "a", "instance": ""}, {"nonce": "b", "instance": "node1"}]
    seen = follow_restorations(news, set(), restoring.append, lambda r: restored.append(r["nonce"]))
    seen = follow_restorations(news, seen, restoring.append, lambda r: restored.append(r["nonce"]))
    assert restoring == [{"a"}, {"a"}] and restored == ["b"] and seen == {"b"}


def test_a_restored_session_takes_the_deputy_s_frames_from_wherever_they_continue() -> None:
    inbox = ForgivingInbox(5)
    assert inbox.accept(9, 10) and inbox.last == 9  # input after the checkpoint: lost
    assert not inbox.accept(9, 10)  # a replay
    with pytest.raises(P.FrameError):
        inbox.accept(12, 10)  # only the first frame may jump


@pytest.mark.parametrize("text", ["x", "0", "-1", "nan", "inf", "86401", ""])
def test_checkpoint_every_must_be_a_positive_number(text: str) -> None:
    with pytest.raises(UsageError, match="--checkpoint-every: expected a positive number"):
        _seconds(text)
    assert _seconds("0.5") == 0.5


def test_a_migrated_session_is_checkpointed_from_its_target(tmp_path: Path) -> None:
    f, queue, _said = make_failover(tmp_path, {})
    f.want(PROGRAM, 1.0)
    f.granted(PROGRAM, ["node0"])
    run(f.receive("node0", PROGRAM, SESSION, Body(checkpoint())))
    f.migrated(PROGRAM, "node0", "node1", 4242)
    assert [c.action for c in queue.for_instance("node1", [])] == ["checkpoint"]
    run(f.receive("node1", PROGRAM, SESSION, Body(checkpoint(pid=4242))))
    with pytest.raises(Conflict):
        run(f.receive("node0", PROGRAM, SESSION, Body(checkpoint())))


def test_an_ended_session_s_checkpoint_goes_only_at_its_holder_s_word(tmp_path: Path) -> None:
    f, _queue, _said = make_failover(tmp_path, {})
    f.want(PROGRAM, 1.0)
    f.granted(PROGRAM, ["node0"])
    stored = run(f.receive("node0", PROGRAM, SESSION, Body(checkpoint())))
    assert not f.ended("node1", PROGRAM, SESSION) and stored.path.exists()
    assert f.ended("node0", PROGRAM, SESSION)
    assert not stored.path.exists() and f.store.index == {}


def test_a_restore_failed_on_every_instance_is_given_up_at_once(tmp_path: Path) -> None:
    """Issue 12: not after the 600 s wait for a replacement: the home hears why."""
    f, queue, said = make_failover(tmp_path, {"node1": "a:1"})
    f.want(PROGRAM, 1.0)
    f.granted(PROGRAM, ["node0"])
    run(f.receive("node0", PROGRAM, SESSION, Body(checkpoint())))
    f.plan(["node0"], {})
    run(f.dispatch())
    (order,) = [c for c in queue.for_instance("node1", []) if c.action == "restore"]
    run(f.outcome("node1", m.RestoreOutcome(command=order.id, ok=False, error="criu said no")))
    run(f.dispatch())  # the clock stands still: only the failures decide
    (given_up,) = f.of_program(PROGRAM)
    assert given_up.instance == "" and given_up.error == "its restore failed on node1: criu said no"
    assert f.planned == [] and any("not restored: its restore failed on node1" in s for s in said)
    # The home hands it on once, as done, and never as under way.
    restoring: list[set[str]] = []
    ended: list[str] = []
    news = [r.model_dump(mode="json") for r in f.of_program(PROGRAM)]
    seen = follow_restorations(news, set(), restoring.append, lambda r: ended.append(r["error"]))
    follow_restorations(news, seen, restoring.append, lambda r: ended.append(r["error"]))
    assert restoring == [] and ended == [given_up.error]


KEY = b"a-session-key-that-stays-in-its-file"


def stored_failover(tmp_path: Path, ready: dict[str, str]) -> tuple[Failover, Any, list[str]]:
    """A Failover whose state is rows of a real OSS store in `tmp_path`."""
    from oss.db.store import Store
    from oss.schema import VERSIONS

    f, _queue, said = make_failover(tmp_path / "checkpoints", ready)
    f.saved = Store(tmp_path / "data", VERSIONS)
    return f, f.saved, said


def test_the_failover_state_outlives_the_oss(tmp_path: Path) -> None:
    """Issue 12: a restarted OSS still takes the program's checkpoints, knows which
    instance holds each session, and restores a session of an instance it had
    declared lost before it stopped; its home's restorations are there too."""

    async def before() -> None:
        f, store, _said = stored_failover(tmp_path, {})
        await store.open()
        f.want(PROGRAM, 2.0)
        f.granted(PROGRAM, ["node0", "node1"])
        f.capability("node0", True)
        f.capability("nocriu", False)
        await f.receive("node0", PROGRAM, SESSION, Body(checkpoint(pid=7, key=KEY.decode())))
        await f.receive("node0", PROGRAM, "cd" * 16, Body(checkpoint(pid=8).replace(
            SESSION.encode(), b"cd" * 16)))  # fmt: skip
        f.migrated(PROGRAM, "node0", "node2", 8)
        f.plan(["node0"], {"node0": {"prog_other"}})
        await f.flush()
        await store.close()
        # The session's key is in its checkpoint file only, never in a row.
        assert KEY in f.store.index[(PROGRAM, SESSION)].path.read_bytes()
        assert not [p for p in (tmp_path / "data").iterdir() if KEY in p.read_bytes()]

    async def after() -> None:
        f, store, _said = stored_failover(tmp_path, {"node1": "a:1"})
        await store.open()
        assert await f.load({"node1", "node2"}) == {"node0"}
        assert f.every == {PROGRAM: 2.0}
        assert f.ordered[PROGRAM] == {"node0", "node1", "node2"}
        assert f.holder == {(PROGRAM, SESSION): "node0", (PROGRAM, "cd" * 16): "node2"}
        assert f.store.index[(PROGRAM, SESSION)].pid == 7
        assert f.fenced == {"node0": {PROGRAM, "prog_other"}}
        # node0 was lost before the stop: its session is restored now.
        assert [(p.stored.session, p.lost) for p in f.planned] == [(SESSION, "node0")]
        await f.dispatch()
        (order,) = [c for c in f.commands.for_instance("node1", []) if c.action == "restore"]
        await f.outcome("node1", m.RestoreOutcome(command=order.id, ok=True, pid=7, salt="5a"))
        # The node2 holder's checkpoints are still taken.
        await f.receive("node2", PROGRAM, "cd" * 16, Body(checkpoint(pid=8).replace(
            SESSION.encode(), b"cd" * 16)))  # fmt: skip
        await f.flush()
        await store.close()
        g, store, _said = stored_failover(tmp_path, {})
        await store.open()
        await g.load({"node1", "node2"})
        assert g.planned == [] and g.holder[(PROGRAM, SESSION)] == "node1"
        assert [(r.instance, r.salt) for r in g.of_program(PROGRAM)] == [("node1", "5a")]
        g.forget(PROGRAM)
        await g.flush()
        await store.close()
        h, store, _said = stored_failover(tmp_path, {})
        await store.open()
        await h.load(set())
        assert h.every == {} and h.store.index == {} and h.of_program(PROGRAM) == []
        await store.close()

    run(before())
    run(after())


def test_a_checkpoint_row_without_its_whole_file_is_no_checkpoint(tmp_path: Path) -> None:
    """Issue 12: at start only rows whose file is whole stay; files no row names and
    cut uploads go."""
    other = "cd" * 16

    async def before() -> None:
        f, store, _said = stored_failover(tmp_path, {})
        await store.open()
        f.want(PROGRAM, 1.0)
        f.granted(PROGRAM, ["node0"])
        await f.receive("node0", PROGRAM, SESSION, Body(checkpoint()))
        await f.receive("node0", PROGRAM, other, Body(checkpoint().replace(
            SESSION.encode(), other.encode())))  # fmt: skip
        await f.flush()
        await store.close()

    run(before())
    where = tmp_path / "checkpoints" / PROGRAM
    cut = where / f"{other}.ckpt"
    cut.write_bytes(cut.read_bytes()[:-3])  # the end record is not whole
    orphan = where / f"{'ef' * 16}.ckpt"
    orphan.write_bytes(checkpoint())
    (where / f"{SESSION}.part9-1").write_bytes(b"half")

    async def after() -> None:
        f, store, _said = stored_failover(tmp_path, {})
        await store.open()
        await f.load(set())
        assert set(f.store.index) == {(PROGRAM, SESSION)}
        assert sorted(p.name for p in where.iterdir()) == [f"{SESSION}.ckpt"]
        assert where.stat().st_mode & 0o777 == 0o700
        rows = await store.read(lambda c: c.execute(
            "SELECT session FROM failover_checkpoints").fetchall())  # fmt: skip
        assert [r[0] for r in rows] == [SESSION]
        await store.close()

    run(after())
