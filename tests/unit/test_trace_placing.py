"""An instance tracer places execs as the home does, with grants from its agent (fakes)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tracer.coordinator import Allow, Complete, Decision, ProcessEvent, Rewrite, SyscallCall
from vmagent.cluster.coordinator import Ident
from vmagent.exec import tickets
from vmagent.exec.view import View
from vmagent.trace import channel, placer
from vmagent.trace.placing import ChannelAsk, Grant, PlacingCoordinator


class AllowAll:
    def interception(self) -> frozenset[str]:
        return frozenset()

    def on_syscall(self, call: SyscallCall) -> Decision:
        return Allow()

    def on_result(self, call: SyscallCall, result: int, output: bytes | None) -> Complete | None:
        return None

    def on_process(self, event: ProcessEvent) -> None:
        pass

    def instance_of(self, pid: int) -> str:
        return "local"


def execve(pid: int, path: bytes, argv: tuple[bytes, ...]) -> SyscallCall:
    return SyscallCall(pid, pid, 59, "execve", (0,) * 6, {0: path}, {}, argv)


class Asks:
    def __init__(self, grants: list[Grant | None]) -> None:
        self.grants = grants
        self.asked: list[tuple[Ident, int, list[str]]] = []

    def __call__(self, ident: Ident, pid: int, avoid: list[str]) -> Grant | None:
        self.asked.append((ident, pid, list(avoid)))
        return self.grants.pop(0)


@pytest.fixture(autouse=True)
def _tickets_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_the_program_s_own_exec_stays_and_the_next_becomes_a_deputy() -> None:
    ask = Asks([Grant("node2", "10.0.0.12:7070", "v3.ticket"), None])
    c = PlacingCoordinator(AllowAll(), ask, creds=lambda pid: (7, 8, (8,)))
    view = View.of("prog_1", {"/mnt/v": "/srv/d"})
    c.bind(view, "node1")
    assert isinstance(c.on_syscall(execve(5, b"/bin/sh", (b"sh",))), Allow)  # P's own exec
    assert ask.asked == []
    placed = c.on_syscall(execve(6, b"/bin/true", (b"true", b"x")))
    assert isinstance(placed, Rewrite)
    argv = placed.args[1]
    assert isinstance(argv, tuple)
    text = [a.decode() for a in argv]
    assert text[text.index("--instance") + 1] == "node2"
    assert text[text.index("--agent") + 1] == "10.0.0.12:7070"
    assert text[text.index("--view") + 1] == view.hex()
    assert text[text.index("--parent") + 1] == "node1:6"
    assert text[-3:] == ["/bin/true", "true", "x"]
    ident, pid, avoid = ask.asked[0]
    assert (ident.uid, ident.gid, ident.groups, pid, avoid) == (7, 8, (8,), 6, [])
    assert ident.digest == tickets.exec_digest(b"/bin/true", (b"true", b"x"))
    # No grant: the exec runs here; spread asks with the instance granted last.
    assert isinstance(c.on_syscall(execve(7, b"/bin/true", (b"true",))), Allow)
    assert ask.asked[1][2] == ["node2"]
    c.close()


@pytest.mark.parametrize("view", [View("prog_1", placement="local"), View("")])
def test_placement_local_or_a_run_without_an_oss_never_asks(view: View) -> None:
    ask = Asks([])
    c = PlacingCoordinator(AllowAll(), ask, creds=lambda pid: (7, 8, ()))
    c.bind(view, "node1")
    c.on_syscall(execve(5, b"/bin/sh", (b"sh",)))
    assert isinstance(c.on_syscall(execve(6, b"/bin/true", (b"true",))), Allow)
    assert ask.asked == []
    c.close()


def test_under_auto_an_instance_keeps_short_and_chained_execs_without_asking() -> None:
    """The cost model on an instance: an exec never seen, or a chain (env -> python3),
    runs where it is and its agent is never asked; a long one on a busy instance is."""
    from oss.compute.costmodel import Profile
    from tracer.coordinator import ProcessExec

    ask = Asks([Grant("node2", "10.0.0.12:7070", "v3.ticket")])
    c = PlacingCoordinator(AllowAll(), ask, creds=lambda pid: (7, 8, ()))
    c.bind(View.of("prog_1", {}, "auto"), "node1")
    assert c.advisor is not None
    c.on_syscall(execve(5, b"/bin/sh", (b"sh",)))  # P's own exec
    c.on_process(ProcessExec(5, ("sh",)))
    assert isinstance(c.on_syscall(execve(6, b"/usr/bin/env", (b"env", b"python3"))), Allow)
    c.on_process(ProcessExec(6, ("env", "python3")))
    assert isinstance(c.on_syscall(execve(6, b"/usr/bin/python3", (b"python3",))), Allow)
    assert ask.asked == []
    assert c.advisor.counts == {"unknown": 1, "chain": 1}
    c.advisor.history.profiles["true *"] = Profile(3, 30.0)  # known to run long
    c.advisor.load = lambda: 64.0  # a busy instance
    assert isinstance(c.on_syscall(execve(7, b"/bin/true", (b"true", b"x"))), Rewrite)
    assert len(ask.asked) == 1
    c.close()


# -- ChannelAsk: T's placement question over a real socket pair -------------------------

IDENT = Ident(1000, 1000, (1000,), "d" * 64)


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def test_a_grant_answers_the_question_and_a_command_meanwhile_is_kept() -> None:
    t, agent = _pair()
    kept: list[bytes] = []
    ask = ChannelAsk(lambda: t, timeout=5, keep=kept.append)
    detach = channel.encode(b"detach", pid=7)
    agent.send(placer.home_record(0, "a late answer to an earlier question"))
    agent.send(detach)
    agent.send(placer.grant_record(1, "node1", "10.0.0.2:7000", "tkt"))
    assert ask(IDENT, 42, ["node0"]) == Grant("node1", "10.0.0.2:7000", "tkt")
    assert kept == [detach]
    asked = channel.decode(agent.recv(65536))
    assert asked[b"op"] == placer.OP_PLACE and asked[b"req"] == b"1" and asked[b"pid"] == b"42"


def test_a_refusal_a_gone_agent_and_silence_each_run_the_exec_here(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t, agent = _pair()
    ask = ChannelAsk(lambda: t, timeout=0.2)
    agent.send(placer.home_record(1, "no instance has room"))
    assert ask(IDENT, 42, []) is None
    assert ask(IDENT, 42, []) is None  # nobody answers req 2 in time
    for _ in range(2):
        agent.recv(65536)  # questions 1 and 2

    def hang_up() -> None:  # once question 3 arrives, while T waits for its answer
        agent.recv(65536)
        agent.close()

    threading.Thread(target=hang_up).start()
    assert ask(IDENT, 42, []) is None
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "an exec runs on this instance: no instance has room",
        "an exec runs on this instance: no answer from the agent in 0 s",
        "an exec runs on this instance: the agent is gone",
    ], said
