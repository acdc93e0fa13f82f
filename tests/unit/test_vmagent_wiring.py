"""The clustered coordinator's exec decisions, with a fake inner coordinator."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tracer.coordinator import (
    Allow,
    Complete,
    Decision,
    ProcessEvent,
    ProcessExited,
    Rewrite,
    SyscallCall,
)
from vmagent.cluster.coordinator import AT_FDCWD, ClusterCoordinator, Target
from vmagent.cluster.placement import Placement
from vmagent.exec.remote import DEPUTY_SCRIPT

TARGETS = [Target("n0", "10.0.0.10:7070", "t0", 2), Target("n1", "10.0.0.11:7070", "t1", 2)]


class FakeInner:
    """Implements the Coordinator protocol: intercepts `openat`, records events."""

    def __init__(self, complete_exec: bool = False) -> None:
        self.events: list[ProcessEvent] = []
        self.calls: list[str] = []
        self.complete_exec = complete_exec

    def interception(self) -> frozenset[str]:
        return frozenset({"openat"} | ({"execve"} if self.complete_exec else set()))

    def on_syscall(self, call: SyscallCall) -> Decision:
        self.calls.append(call.name)
        if call.name == "execve":
            return Complete(-2)
        return Allow()

    def on_result(self, call: SyscallCall, result: int, output: bytes | None) -> Complete | None:
        return None

    def on_process(self, event: ProcessEvent) -> None:
        self.events.append(event)

    def instance_of(self, pid: int) -> str:
        return "local"


def execve(pid: int, path: bytes, argv: tuple[bytes, ...], base: bytes = b"/") -> SyscallCall:
    bases = {} if path.startswith(b"/") else {0: base}
    return SyscallCall(pid, pid, 59, "execve", (0,) * 6, {0: path}, bases, argv)


def fake_creds(pid: int) -> tuple[int, int, tuple[int, ...]]:
    """The tracee's ids, as /proc would give them (the pids here are made up)."""
    return 1000, 1000, (1000,)


@pytest.fixture(autouse=True)
def _tickets_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ticket files of the coordinators made here land in the test's tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def coordinator(policy: str = "spread", inner: FakeInner | None = None) -> ClusterCoordinator:
    c = ClusterCoordinator(
        inner or FakeInner(), TARGETS, Placement(policy, [("n0", 2), ("n1", 2)]), creds=fake_creds
    )
    c.on_syscall(execve(1, b"/bin/sh", (b"sh",)))  # the tracer's own start of the program
    return c


def test_interception_adds_exec_calls() -> None:
    assert coordinator().interception() == {"openat", "execve", "execveat"}


def test_first_exec_stays_home_then_execs_are_placed() -> None:
    c = ClusterCoordinator(FakeInner(), TARGETS, Placement("spread", [("n0", 2), ("n1", 2)]))
    assert isinstance(c.on_syscall(execve(1, b"/bin/sh", (b"sh",))), Allow)
    d = c.on_syscall(execve(2, b"/bin/echo", (b"echo", b"hi")))
    assert isinstance(d, Rewrite)
    assert set(d.args) == {0, 1}  # envp (arg 2) untouched
    assert d.args[0] == os.fsencode(os.path.realpath(os.sys.executable))
    argv = d.args[1]
    assert isinstance(argv, tuple)
    assert argv[3] == DEPUTY_SCRIPT.encode()
    assert argv[argv.index(b"--agent") + 1] == b"10.0.0.10:7070"
    assert argv[argv.index(b"--") :] == (b"--", b"/bin/echo", b"echo", b"hi")
    assert c.instance_of(2) == "n0" and c.instance_of(1) == "local"


def test_spread_alternates_and_exit_frees_the_slot() -> None:
    c = coordinator()
    names = []
    for pid in (10, 11, 12):
        d = c.on_syscall(execve(pid, b"/bin/true", (b"true",)))
        assert isinstance(d, Rewrite)
        names.append(c.instance_of(pid))
    assert names == ["n0", "n1", "n0"]
    c.on_process(ProcessExited(11, 0, None))
    c.on_process(ProcessExited(12, 0, None))
    assert [v.running for v in c.placement.views()] == [1, 0]
    assert isinstance(c.inner, FakeInner) and len(c.inner.events) == 2


def test_local_policy_never_rewrites() -> None:
    c = coordinator("local")
    assert isinstance(c.on_syscall(execve(5, b"/bin/true", (b"true",))), Allow)


def test_unplaceable_execs_stay_home(tmp_path: Path) -> None:
    c = coordinator()
    script = tmp_path / "noshebang"
    script.write_text("echo hi\n")
    script.chmod(0o755)
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    for path in (b"/no/such", os.fsencode(tmp_path), os.fsencode(script), os.fsencode(plain)):
        assert isinstance(c.on_syscall(execve(7, path, (b"x",))), Allow), path
    assert c.placed == 0


def test_relative_path_is_checked_in_the_callers_directory_and_kept_relative() -> None:
    c = coordinator()
    d = c.on_syscall(execve(8, b"true", (b"true",), base=b"/bin"))
    assert isinstance(d, Rewrite)
    argv = d.args[1]
    assert isinstance(argv, tuple) and argv[argv.index(b"--") + 1] == b"true"  # $0 as given
    assert isinstance(c.on_syscall(execve(8, b"true", (b"true",), base=b"/etc")), Allow)


def test_execveat_relative_to_a_directory_descriptor_is_joined() -> None:
    c = coordinator()
    call = SyscallCall(
        9, 9, 322, "execveat", (5, 0, 0, 0, 0, 0), {1: b"true"}, {1: b"/bin"}, (b"t",)
    )
    d = c.on_syscall(call)
    assert isinstance(d, Rewrite)
    argv = d.args[2]
    assert isinstance(argv, tuple) and argv[argv.index(b"--") + 1] == b"/bin/true"


def test_execveat_rewrites_all_but_envp() -> None:
    c = coordinator()
    call = SyscallCall(9, 9, 322, "execveat", (5, 0, 0, 0, 0, 0), {1: b"/bin/true"}, {}, (b"t",))
    d = c.on_syscall(call)
    assert isinstance(d, Rewrite) and set(d.args) == {0, 1, 2, 4}
    assert d.args[0] == AT_FDCWD and d.args[4] == 0
    fexec = SyscallCall(9, 9, 322, "execveat", (5, 0, 0, 0, 0x1000, 0), {1: b""}, {}, (b"t",))
    assert isinstance(c.on_syscall(fexec), Allow)


def test_inner_completion_wins_and_other_calls_are_delegated() -> None:
    inner = FakeInner(complete_exec=True)
    c = ClusterCoordinator(inner, TARGETS, Placement("spread", [("n0", 2), ("n1", 2)]))
    assert c.on_syscall(execve(1, b"/bin/true", (b"true",))) == Complete(-2)
    openat = SyscallCall(1, 1, 257, "openat", (0,) * 6, {1: b"/etc/hosts"})
    assert isinstance(c.on_syscall(openat), Allow)
    assert inner.calls == ["execve", "openat"]


def test_clustered_reports_bad_options_as_tracer_usage_errors(monkeypatch: object) -> None:
    import pytest

    from tracer.compose import clustered
    from tracer.errors import UsageError

    with pytest.raises(UsageError, match="unknown placement"):
        with clustered(FakeInner(), 2, "random", None):
            pass
    monkeypatch.delenv("DCP_TOKEN", raising=False)  # type: ignore[attr-defined]
    with pytest.raises(UsageError, match="DCP_TOKEN"):
        with clustered(FakeInner(), 0, "spread", "http://127.0.0.1:1"):
            pass


def test_a_deputys_loss_note_is_collected_when_it_exits() -> None:
    """A deputy that lost data leaves `<ticket file>.lost`; the run learns of it."""
    c = coordinator()
    for pid in (20, 21):
        d = c.on_syscall(execve(pid, b"/bin/cat", (b"cat",)))
        assert isinstance(d, Rewrite)
    argv = d.args[1]
    assert isinstance(argv, tuple)
    ticket_file = os.fsdecode(argv[argv.index(b"--ticket-file") + 1])
    Path(ticket_file + ".lost").write_text("cat on instance n1: timed out")
    c.on_process(ProcessExited(20, 0, None))  # the other deputy: no note
    assert c.lost == []
    c.on_process(ProcessExited(21, 255, None))
    assert c.lost == ["cat on instance n1: timed out"]
    assert not Path(ticket_file + ".lost").exists()
    c.close()


def test_a_zero_exit_becomes_a_failure_when_a_placed_process_lost_data() -> None:
    from tracer.cli import LOST_STATUS, _fail_on_loss

    c = coordinator()
    assert _fail_on_loss("exit 0", [c]) == "exit 0"
    c.lost.append("cat on instance n1: timed out")
    assert _fail_on_loss("exit 0", [c]) == f"exit {LOST_STATUS}"
    assert _fail_on_loss("exit 3", [c]) == "exit 3"  # already a failure: kept
    assert _fail_on_loss("pid 7", [c]) == "pid 7"
    assert _fail_on_loss("exit 0", []) == "exit 0"
