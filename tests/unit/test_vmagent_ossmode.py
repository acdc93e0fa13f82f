"""`dcptrace --oss` pieces without a network: exec keys, tickets, config, the coordinator."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

from oss.compute import exectickets, scheduler
from oss.models import AgentRegister, PlacementRequest
from tracer.coordinator import (
    Allow,
    Complete,
    Decision,
    ProcessEvent,
    ProcessExited,
    Rewrite,
    SyscallCall,
)
from vmagent.cluster.coordinator import Ident
from vmagent.cluster.ossmode import Grant, OssCannotRun, OssCoordinator, OssModeConfig, OssModeError
from vmagent.config import AgentConfig
from vmagent.errors import AuthError
from vmagent.exec import tickets
from vmagent.load import Load
from vmagent.osslink import OssLink

KEY = "ab" * 32


class FakeInner:
    """Implements the Coordinator protocol: allows everything, records events."""

    def __init__(self) -> None:
        self.events: list[ProcessEvent] = []

    def interception(self) -> frozenset[str]:
        return frozenset()

    def on_syscall(self, call: SyscallCall) -> Decision:
        return Allow()

    def on_result(self, call: SyscallCall, result: int, output: bytes | None) -> Complete | None:
        return None

    def on_process(self, event: ProcessEvent) -> None:
        self.events.append(event)

    def instance_of(self, pid: int) -> str:
        return "local"


def execve(pid: int, path: bytes, argv: tuple[bytes, ...]) -> SyscallCall:
    return SyscallCall(pid, pid, 59, "execve", (0,) * 6, {0: path}, {}, argv)


# -- tickets and keys --------------------------------------------------------------------


IDS = {"uid": 1000, "gid": 1000, "digest": "ab" * 32}


def test_tickets_mac_d_with_the_token_or_an_exec_key_are_accepted_once() -> None:
    check = tickets.TicketCheck("tok", "n1", exec_key=KEY)
    by_token = tickets.mint("tok", "n1", **IDS)
    by_key = exectickets.mint(KEY, "n1", **IDS)  # the OSS's minting, same format
    check.verify(by_token)
    check.verify(by_key)
    for t in (by_token, by_key):
        with pytest.raises(AuthError, match="already used"):
            check.verify(t)


def test_tickets_with_another_key_instance_or_expiry_are_refused() -> None:
    check = tickets.TicketCheck("tok", "n1", clock=lambda: 1000.0, exec_key=KEY, started=0.0)
    with pytest.raises(AuthError, match="not valid"):
        check.verify(exectickets.mint("cd" * 32, "n1", now=1000.0, **IDS))
    with pytest.raises(AuthError, match="not valid"):
        check.verify(exectickets.mint(KEY, "n2", now=1000.0, **IDS))
    with pytest.raises(AuthError, match="expired"):
        check.verify(exectickets.mint(KEY, "n1", ttl=10, now=900.0, **IDS))
    with pytest.raises(AuthError, match="malformed"):
        check.verify("v1.x")
    # Without an exec key (stand-alone agent) only the token's tickets count.
    with pytest.raises(AuthError, match="exec key this agent does not have"):
        tickets.TicketCheck("tok", "n1").verify(exectickets.mint(KEY, "n1", **IDS))


def test_the_register_body_carries_the_exec_key_only_when_there_is_one() -> None:
    def sample() -> Load:
        return Load(0.0, 0, 0.0, 0)

    with_key = OssLink("http://o", "n1", "tok", "1.2.3.4:7070", sample, 512, exec_key=KEY)
    body = with_key.register_body()
    assert body["exec_key"] == KEY and body["instance"] == "n1"
    assert with_key.register_body()["exec_key"] == KEY  # a re-registration sends the same key
    AgentRegister.model_validate(body)  # what the OSS accepts
    without = OssLink("http://o", "n1", "tok", "1.2.3.4:7070", sample, 512).register_body()
    assert "exec_key" not in without
    AgentRegister.model_validate(without)


def test_keys_stay_out_of_reprs_and_bad_keys_are_rejected() -> None:
    base = {"instance": "n1", "address": "a:1", "hostname": "h", "cpus": 1, "memory_mb": 1}
    assert KEY not in repr(AgentRegister.model_validate({**base, "exec_key": KEY}))
    cfg = AgentConfig(instance="n1", token="tok", listen_host="h", listen_port=0, exec_key=KEY)
    assert KEY not in repr(cfg)
    for bad in ("", "abc", "G" * 64, "a" * 257):
        with pytest.raises(ValidationError):
            AgentRegister.model_validate({**base, "exec_key": bad})
    with pytest.raises(ValidationError):
        PlacementRequest.model_validate({"avoid": ["no spaces allowed"]})


def test_avoid_orders_only_otherwise_equal_new_instances() -> None:
    def cand(name: str, price: int = 1) -> scheduler.Candidate:
        return scheduler.Candidate(name, None, 1, price, None, 4, 0, None)

    pol = scheduler.SelectionPolicy()
    (a,) = scheduler.place("p", 1, pol, [cand("x1"), cand("x2")], {}, 1, avoid={"x1"})
    assert a.instance == "x2"
    (a,) = scheduler.place("p", 1, pol, [cand("x1"), cand("x2", price=2)], {}, 1, avoid={"x1"})
    assert a.instance == "x1"  # a hint: it never beats a cheaper instance
    (a,) = scheduler.place("p", 1, pol, [cand("x1")], {}, 1, avoid={"x1"})
    assert a.instance == "x1"  # nor leaves a process without a place


# -- configuration -----------------------------------------------------------------------


def test_config_needs_a_token_a_url_a_policy_and_a_sane_timeout() -> None:
    env = {"DCP_TOKEN": " dcp_tok \n"}
    cfg = OssModeConfig.load("http://o:1/", "spread", env)
    assert (cfg.url, cfg.token, cfg.timeout) == ("http://o:1", "dcp_tok", 10.0)
    assert "dcp_tok" not in repr(cfg)
    with pytest.raises(OssModeError, match="DCP_TOKEN"):
        OssModeConfig.load("http://o:1", "spread", {})
    with pytest.raises(OssModeError, match="DCP_TOKEN"):
        OssModeConfig.load("http://o:1", "spread", {"DCP_TOKEN": "  "})
    with pytest.raises(OssModeError, match="http"):
        OssModeConfig.load("o:1", "spread", env)
    with pytest.raises(OssModeError, match="unknown placement"):
        OssModeConfig.load("http://o:1", "wide", env)
    for bad in ("0", "-1", "x", "1e9"):
        with pytest.raises(OssModeError, match="DCP_OSS_TIMEOUT"):
            OssModeConfig.load("http://o:1", "pack", {**env, "DCP_OSS_TIMEOUT": bad})
    assert (
        OssModeConfig.load("http://o:1", "pack", {**env, "DCP_OSS_TIMEOUT": "2.5"}).timeout == 2.5
    )


# -- the coordinator, against a fake OSS -------------------------------------------------


class FakeLink:
    """Implements ProgramLink: grants round robin over two instances, records calls."""

    def __init__(self, grant: bool = True) -> None:
        self.grant = grant
        self.calls: list[tuple[object, ...]] = []
        self.idents: list[Ident] = []
        self.n = 0

    def submit(self, argv: Sequence[str], cwd: str) -> None:
        self.calls.append(("submit", tuple(argv), cwd))

    def place(self, avoid: Sequence[str], ident: Ident) -> Grant | None:
        self.calls.append(("place", tuple(avoid)))
        self.idents.append(ident)
        if not self.grant:
            return None
        self.n += 1
        name = f"x{self.n % 2}"
        return Grant(name, f"10.0.0.{self.n % 2}:7070", f"ticket-{self.n}")

    def release(self, instance: str) -> None:
        self.calls.append(("release", instance))

    def finish(self, exit_status: int | None, signal: int | None) -> None:
        self.calls.append(("finish", exit_status, signal))


def _arg(argv: tuple[bytes, ...], flag: bytes) -> bytes:
    return argv[argv.index(flag) + 1]


@pytest.fixture(autouse=True)
def _tickets_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ticket files of the coordinators made here land in the test's tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def started(
    policy: str = "spread", link: FakeLink | None = None
) -> tuple[OssCoordinator, FakeLink]:
    link = link or FakeLink()
    c = OssCoordinator(FakeInner(), policy, link, "/work/dir", creds=lambda pid: (7, 8, (8,)))
    assert isinstance(c.on_syscall(execve(1, b"/bin/sh", (b"sh", b"-c", b"x\xff"))), Allow)
    return c, link


def test_the_local_fallback_is_off_unless_asked_and_other_values_are_refused() -> None:
    env = {"DCP_TOKEN": "dcp_tok"}
    assert not OssModeConfig.load("http://o:1", "spread", env).fallback_local
    for value, local in (("none", False), ("local", True), (" local ", True)):
        cfg = OssModeConfig.load("http://o:1", "spread", {**env, "DCP_OSS_FALLBACK": value})
        assert cfg.fallback_local is local
    with pytest.raises(OssModeError, match="DCP_OSS_FALLBACK must be 'local' or 'none'"):
        OssModeConfig.load("http://o:1", "spread", {**env, "DCP_OSS_FALLBACK": "yes"})


class RefusingLink(FakeLink):
    """An OSS without a ready instance: the submission says the program cannot run."""

    def submit(self, argv: Sequence[str], cwd: str) -> None:
        super().submit(argv, cwd)
        raise OssCannotRun("the OSS at http://o:1 has no ready instance with room")


def test_a_program_the_oss_cannot_take_never_starts() -> None:
    link = RefusingLink()
    c = OssCoordinator(FakeInner(), "spread", link, "/work/dir")
    d = c.on_syscall(execve(1, b"/bin/sh", (b"sh", b"-c", b"x")))
    assert isinstance(d, Complete) and d.result == -errno.EHOSTDOWN
    assert c.refused is not None and "no ready instance" in c.refused
    assert [call[0] for call in link.calls] == ["submit"]


def test_the_first_exec_submits_the_program_and_stays_home() -> None:
    c, link = started()
    assert link.calls == [("submit", ("sh", "-c", "x\ufffd"), "/work/dir")]
    assert c.instance_of(1) == "local"


def test_a_placed_exec_becomes_the_deputy_with_the_oss_grant() -> None:
    c, link = started()
    d = c.on_syscall(execve(2, b"/bin/echo", (b"echo", b"hi")))
    assert isinstance(d, Rewrite) and set(d.args) == {0, 1}
    argv = d.args[1]
    assert isinstance(argv, tuple)
    assert _arg(argv, b"--agent") == b"10.0.0.1:7070"
    assert _arg(argv, b"--instance") == b"x1"
    # The ticket travels in a 0600 file of the tracee's uid, never on argv.
    ticket_file = _arg(argv, b"--ticket-file")
    assert b"ticket-1" not in b" ".join(argv)
    with open(ticket_file, "rb") as f:
        assert f.read() == b"ticket-1"
    assert os.stat(ticket_file).st_mode & 0o777 == 0o600
    assert argv[argv.index(b"--") :] == (b"--", b"/bin/echo", b"echo", b"hi")
    # The OSS was told whom and what the ticket is for.
    bound = link.idents[0]
    assert (bound.uid, bound.gid, bound.groups) == (7, 8, (8,))
    assert bound.digest == tickets.exec_digest(b"/bin/echo", (b"echo", b"hi"))
    assert c.instance_of(2) == "x1"
    # spread hints the OSS away from the instance used last
    c.on_syscall(execve(3, b"/bin/echo", (b"echo",)))
    assert [x for x in link.calls if x[0] == "place"] == [("place", ()), ("place", ("x1",))]
    c.on_process(ProcessExited(2, 0, None))
    c.on_process(ProcessExited(3, None, 9))
    assert link.calls[-2:] == [("release", "x1"), ("release", "x0")]


def test_pack_sends_no_hint_and_local_never_asks() -> None:
    c, link = started("pack")
    c.on_syscall(execve(2, b"/bin/echo", (b"echo",)))
    c.on_syscall(execve(3, b"/bin/echo", (b"echo",)))
    assert [x for x in link.calls if x[0] == "place"] == [("place", ()), ("place", ())]
    c, link = started("local")
    assert isinstance(c.on_syscall(execve(2, b"/bin/echo", (b"echo",))), Allow)
    assert [x[0] for x in link.calls] == ["submit"]


def test_no_grant_keeps_the_process_home_and_releases_nothing() -> None:
    c, link = started(link=FakeLink(grant=False))
    assert isinstance(c.on_syscall(execve(2, b"/bin/echo", (b"echo",))), Allow)
    c.on_process(ProcessExited(2, 0, None))
    assert [x[0] for x in link.calls] == ["submit", "place"]
    assert c.instance_of(2) == "local"


def test_files_that_are_not_placeable_never_reach_the_oss() -> None:
    c, link = started()
    assert isinstance(c.on_syscall(execve(2, b"/nonexistent/prog", (b"prog",))), Allow)
    assert [x[0] for x in link.calls] == ["submit"]


def test_close_finishes_with_the_root_status_or_cancels() -> None:
    c, link = started()
    c.on_process(ProcessExited(1, 4, None))
    c.close()
    assert link.calls[-1] == ("finish", 4, None)
    c, link = started()
    c.on_process(ProcessExited(1, None, 15))
    c.close()
    assert link.calls[-1] == ("finish", None, 15)
    c, link = started()
    c.close()  # the root's end was never seen
    assert link.calls[-1] == ("finish", None, None)
    link = FakeLink()
    OssCoordinator(FakeInner(), "spread", link, "/").close()  # never started: nothing
    assert link.calls == []


def test_openapi_documents_the_exec_key_grants_and_hint() -> None:
    from oss.server import openapi

    schemas = openapi()["components"]["schemas"]
    key = schemas["AgentRegister"]["properties"]["exec_key"]
    assert key.get("writeOnly") is True
    assert "exec_key" not in schemas["AgentRegister"]["required"]
    assert set(schemas["ExecGrant"]["properties"]) == {"instance", "address", "tickets"}
    assert "exec_grants" in schemas["PlacementResult"]["properties"]
    assert "avoid" in schemas["PlacementRequest"]["properties"]
    assert not any("exec_key" in s.get("properties", {}) for n, s in schemas.items()
                   if n != "AgentRegister")  # fmt: skip


# -- an instance that cannot mount the program's storage -----------------------------------


class _Answer:
    """What `OssClient.place` returns, as far as `OssProgramLink.place` reads it."""

    def __init__(self, instance: str) -> None:
        grant = type("G", (), {"instance": instance, "address": "10.0.0.9:7070", "tickets": ["t"]})
        self.exec_grants = [grant]
        self.assignments: list[object] = []


def test_an_instance_that_cannot_mount_the_storage_is_said_once_and_then_avoided(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import concurrent.futures

    from vmagent.cluster.ossmode import OssProgramLink

    cfg = OssModeConfig.load("http://o:1", "spread", {"DCP_TOKEN": "tok"})
    link = OssProgramLink(cfg, storage=object())
    asked: list[list[str]] = []  # each placement's `avoid`
    mounts: list[str] = []
    released: list[str] = []

    class Client:
        def place(self, pid: str, n: int, avoid: list[str], exec_as: object) -> str:
            asked.append(avoid)
            return "vm2" if "vm2" not in avoid else "vm3"

    class Storage:
        def request(self, method: str, path: str, body: dict[str, str]) -> dict[str, str]:
            return body

    def call(body: object, _timeout: float) -> None:  # the OSS relays the mount
        if isinstance(body, dict) and "instance" in body:
            mounts.append(body["instance"])
            if body["instance"] == "vm2":
                raise TimeoutError("the agent did not mount")

    done: concurrent.futures.Future[str | None] = concurrent.futures.Future()
    done.set_result("p1")
    link._submitted = done
    link._spec_given = True
    link._client = Client()  # type: ignore[assignment]
    link._storage_client = Storage()  # type: ignore[assignment]
    link._call = lambda where: _Answer(where)  # type: ignore[assignment,method-assign,return-value]
    link._bridge.call = call  # type: ignore[assignment,method-assign]
    link.release = released.append  # type: ignore[method-assign]
    ident = Ident(0, 0, (), "d" * 64)
    try:
        with caplog.at_level("WARNING"):
            assert link.place(["home"], ident) is None  # vm2 cannot mount: runs here
            grant = link.place(["home"], ident)
            assert grant is not None and grant.instance == "vm3"
            assert link.place(["home"], ident) is not None
    finally:
        link._bridge.close(5.0)
    assert asked == [["home"], ["home", "vm2"], ["home", "vm2"]]
    assert mounts == ["vm2", "vm3"] and released == ["vm2"]
    said = [r.getMessage() for r in caplog.records if "not mounted on vm2" in r.getMessage()]
    assert len(said) == 1 and "processes placed there run here" in said[0], said
