"""Signals for pids forked on instances (issue 11 item 7): the OSS orders, the agents deliver."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from typing import Any

from oss.compute.commands import CommandQueue
from vmagent.trace.pidspace import base_for
from vmagent.trace.signals import Signaller, descends, forked_elsewhere


def test_the_oss_orders_every_instance_of_the_program_once() -> None:
    queue = CommandQueue()
    sent = queue.signal(["node2", "node0", "node2"], "prog-1", 3 * (1 << 22) + 77, 15)
    assert [(c.instance, c.action, c.pid, c.signal) for c in sent] == [
        ("node0", "signal", 3 * (1 << 22) + 77, 15),
        ("node2", "signal", 3 * (1 << 22) + 77, 15),
    ]
    assert [c.id for c in queue.for_instance("node2", [])] == [sent[1].id]


@dataclass
class FakeRequest:
    view: Any = None


@dataclass
class FakeSession:
    """What `Signaller.deliver` reads of a session."""

    pid: int
    program_id: str = "prog-1"
    pid_base: int = 0
    status: int | None = None
    request: FakeRequest = field(default_factory=FakeRequest)


def test_an_order_reaches_only_a_process_of_the_program_s_session() -> None:
    root = subprocess.Popen(["sleep", "30"])  # a session's root (its tree: itself)
    other = subprocess.Popen(["sleep", "30"])  # a process of the instance, not of it
    try:
        session = FakeSession(root.pid)
        signaller = Signaller("node3", None, lambda: [session])
        base = base_for("node3")
        assert forked_elsewhere(base + other.pid) and not forked_elsewhere(other.pid)
        assert descends(root.pid, root.pid) and not descends(other.pid, root.pid)
        cmd = {"action": "signal", "program": "prog-1", "pid": base + other.pid, "signal": 15}
        signaller.on_commands([{**cmd, "id": 1}])
        signaller.on_commands([{**cmd, "id": 2, "pid": base + root.pid, "program": "prog-2"}])
        signaller.on_commands([{**cmd, "id": 1, "pid": base + root.pid}])  # 1 again: done
        assert other.poll() is None and root.poll() is None  # none is the program's
        signaller.on_commands([{**cmd, "id": 3, "pid": base + root.pid}])
        assert root.wait(10) == -signal.SIGTERM
        assert other.poll() is None
    finally:
        for p in (root, other):
            p.kill()
            p.wait()
