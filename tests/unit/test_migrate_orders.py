"""Migration orders (issue 12): which sessions a request moves, the OSS's ticket as the
target checks it, the command queue, and the agent's handling of a `migrate` command
(a fake migrator and OSS: no CRIU, no network)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oss.compute.commands import CommandQueue
from oss.compute.migrations import mint_ticket, sessions_to_move
from oss.errors import MigrationFailed, NotFound
from vmagent.checkpoint.criu import CriuUnavailable
from vmagent.checkpoint.migrate import MigrationRefused, MigrationTickets
from vmagent.checkpoint.orders import OUTCOME, TICKET, MigrateOrders


def _row(instance: str, pid: int, session: int | None, state: str = "running") -> dict[str, Any]:
    return {"instance": instance, "pid": pid, "session_pid": session, "state": state,
            "argv": '["x"]'}  # fmt: skip


ROWS = [
    _row("n0", 100, 100),
    _row("n0", 101, 100),  # a child of session 100
    _row("n1", 200, 200),
    _row("n0", 300, 300, "exited"),
]


def test_a_pid_moves_its_whole_session() -> None:
    (ref,) = sessions_to_move(ROWS, 101, "n2")
    assert (ref.instance, ref.pid) == ("n0", 100)


def test_without_a_pid_every_running_session_not_on_the_target_moves() -> None:
    assert [(r.instance, r.pid) for r in sessions_to_move(ROWS, None, "n1")] == [("n0", 100)]
    assert len(sessions_to_move(ROWS, None, "n2")) == 2


def test_a_pid_that_does_not_run_or_already_runs_there_is_refused() -> None:
    with pytest.raises(NotFound, match="no running process 300"):
        sessions_to_move(ROWS, 300, "n2")
    with pytest.raises(MigrationFailed, match="already runs on n1"):
        sessions_to_move(ROWS, 200, "n1")
    with pytest.raises(MigrationFailed, match="no running process on an instance"):
        sessions_to_move([_row("n0", 1, 1, "exited")], None, "n1")


def test_the_oss_ticket_is_what_the_target_checks_with_its_exec_key() -> None:
    ticket = mint_ticket("k" * 64, "n1", "ab" * 16)
    target = MigrationTickets("instance-token", "n1", exec_key="k" * 64)
    assert target.check(ticket, burn=True) == "ab" * 16
    with pytest.raises(MigrationRefused, match="already used"):
        target.check(ticket, burn=True)
    with pytest.raises(MigrationRefused, match="not valid for n2"):
        MigrationTickets("t", "n2", exec_key="k" * 64).check(ticket, burn=False)


def test_a_migrate_command_goes_to_its_source_only_until_cancelled() -> None:
    q = CommandQueue()
    cmd = q.migrate("n0", "prog", 100, "n1", "127.0.0.1:9")
    assert q.for_instance("n1", []) == []
    assert q.for_instance("n0", []) == [cmd]
    assert q.pending("n0", cmd.id) == cmd and q.pending("n1", cmd.id) is None
    q.cancel("n0", cmd.id)
    assert q.for_instance("n0", []) == []


class FakeSession:
    def __init__(self, program_id: str, pid: int) -> None:
        self.program_id = program_id
        self.pid = pid
        self.sid = bytes([pid % 256]) * 16
        self.status: int | None = None
        self.moved = False


class FakeMigrator:
    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[tuple[int, str, str, str]] = []
        self.error = error

    async def migrate(self, session: Any, to: str, instance: str, ticket: str) -> dict[str, Any]:
        self.calls.append((session.pid, to, instance, ticket))
        if self.error is not None:
            raise self.error
        return {"pid": session.pid, "freeze_ms": 12.5, "image_bytes": 4096}


def _run(migrator: FakeMigrator, commands: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    posted: list[tuple[str, Any]] = []

    async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        posted.append((path, body))
        return {"ticket": "T"} if path == TICKET else {"ok": True}

    async def go() -> None:
        sessions = [FakeSession("prog", 100), FakeSession("other", 200)]
        orders = MigrateOrders(migrator, lambda: sessions, post)  # type: ignore[arg-type]
        orders.on_commands(commands)
        orders.on_commands(commands)  # a reply that carried them again: no second move
        await asyncio.gather(*orders._tasks)
        await orders.close()

    asyncio.run(go())
    return posted


MIGRATE = {"id": 7, "program": "prog", "action": "migrate", "reason": "", "pid": 100,
           "to": "n1", "address": "127.0.0.1:9"}  # fmt: skip


def test_the_agent_asks_the_ticket_moves_the_session_and_reports_once() -> None:
    m = FakeMigrator()
    posted = _run(m, [{"id": 1, "program": "prog", "action": "freeze", "reason": ""}, MIGRATE])
    assert m.calls == [(100, "127.0.0.1:9", "n1", "T")]
    assert posted == [
        (TICKET, {"command": 7, "session": (bytes([100]) * 16).hex()}),
        (OUTCOME, {"command": 7, "ok": True, "pid": 100, "freeze_ms": 12.5, "image_bytes": 4096}),
    ]


def test_a_refused_move_is_reported_with_its_line() -> None:
    m = FakeMigrator(CriuUnavailable("/bin/false check failed"))
    posted = _run(m, [MIGRATE])
    assert posted[-1] == (
        OUTCOME,
        {"command": 7, "ok": False, "error": "checkpoint unavailable: /bin/false check failed"},
    )


def test_an_order_for_a_session_not_here_is_refused_without_a_ticket() -> None:
    m = FakeMigrator()
    posted = _run(m, [dict(MIGRATE, pid=200)])  # pid 200 is another program's
    assert m.calls == []
    assert posted == [
        (OUTCOME, {"command": 7, "ok": False, "error": "no running session of pid 200 here"})
    ]


def test_a_move_under_way_outlives_its_ticket_but_no_replay_does() -> None:
    now = [1000.0]
    target = MigrationTickets("instance-token", "n1", clock=lambda: now[0], exec_key="k" * 64)
    ticket = mint_ticket("k" * 64, "n1", "ab" * 16)  # minted with the wall clock's now
    now[0] = 1e12  # long after: expired
    with pytest.raises(MigrationRefused, match="expired"):
        target.check(ticket, burn=False)
    # Its pre-copy rounds are staged at the target: the final upload still goes through,
    # once; the same ticket again is a replay even while a move is under way.
    assert target.check(ticket, burn=True, in_progress=True) == "ab" * 16
    with pytest.raises(MigrationRefused, match="already used"):
        target.check(ticket, burn=True, in_progress=True)
