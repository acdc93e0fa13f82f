"""`dcptrace --oss URL` end to end: a real `dcp-oss serve`, two real agents, real dcptrace.

The agents are plain loopback processes registered with the OSS (each with its
own exec key); a placed program's parent on its instance is that instance's
agent, so `/proc/$PPID/cmdline` names the instance it ran on.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, WHERE_SH, dcptrace_argv, secret_file, traced_env, wait_for

pytestmark = [pytest.mark.usefixtures("has_ptrace"), pytest.mark.slow]

MARKER = """#!/bin/sh
# Which instance runs me: my parent there is its agent (`--instance NAME`).  Its
# real pid, from /proc/self/stat: $PPID is the program's (its home's, issue 11).
read _ _ _ pp _ < /proc/self/stat
where=$(tr '\\0' ' ' < /proc/$pp/cmdline | sed -n 's/.*--instance \\([^ ]*\\).*/\\1/p')
echo "on ${where:-home}"
exit "${1:-0}"
"""


def _children(pid: int) -> list[int]:
    try:
        return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def _cli(*args: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "oss", *args], capture_output=True, env=_env(), timeout=60
    )
    assert res.returncode == 0, res.stderr.decode()
    return res.stdout.decode().strip()


@dataclass
class Lab:
    """A dcp-oss serve and its agents (all stopped by pid at teardown)."""

    data: Path
    url: str = ""
    token: str = ""
    admin: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def get(self, path: str, token: str | None = None) -> Any:
        req = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Bearer {token or self.token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def start(
        self, *argv: str, prefix: tuple[str, ...] = ()
    ) -> tuple[subprocess.Popen[bytes], str]:
        log = open(self.data / f"proc{len(self.procs)}.log", "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", *argv],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=_env(),
            )  # fmt: skip
        finally:
            log.close()
        self.procs.append(proc)
        assert proc.stdout is not None
        return proc, proc.stdout.readline().decode()

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                # `unshare --fork` waits for its child: the agent (PID 1 inside) gets the TERM.
                for kid in _children(p.pid) if p.args[0] == "nsenter" else []:
                    os.kill(kid, signal.SIGTERM)
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            if p.stdout is not None:
                p.stdout.close()


def start_lab(
    lab: Lab, listen: str, agents: dict[str, tuple[str, ...]], serve: tuple[str, ...] = ()
) -> None:
    """Accounts, instance tokens, `dcp-oss serve` on `listen`, one agent per name.

    `agents` maps each instance name to (command prefix, agent --listen, extra options);
    `serve`: more options of `dcp-oss serve`.
    """
    # The tests run as root: the operator lets this account run processes as uid 0.
    lab.token = _cli("account", "create", "--data", str(lab.data), "--allow-root", "acme")
    lab.admin = _cli("account", "create", "--data", str(lab.data), "--admin", "op")
    tokens = {n: _cli("instance-token", "--data", str(lab.data), n) for n in agents}
    _proc, line = lab.start(
        "oss", "serve", "--listen", f"{listen}:0", "--data", str(lab.data),
        "--heartbeat-interval", "0.5", "--tick", "0.5", *serve,
    )  # fmt: skip
    assert "listening on " in line, line
    lab.url = line.split("listening on ", 1)[1].strip()
    for name, (*prefix, agent_listen, extra) in agents.items():
        _proc, line = lab.start(
            "vmagent", "--oss", lab.url, "--instance", name,
            "--token-file", secret_file(tokens[name], lab.data),
            "--listen", agent_listen, *extra.split(), prefix=tuple(prefix),
        )  # fmt: skip
        assert line.startswith("listening "), line

    def ready() -> bool:
        rows = lab.get("/v1/instances", lab.admin)
        return sorted(r["name"] for r in rows if r["state"] == "ready") == sorted(agents)

    assert wait_for(ready, 30), lab.get("/v1/instances", lab.admin)
    (lab.data / "marker.sh").write_text(MARKER)
    (lab.data / "marker.sh").chmod(0o755)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two loopback agents registered with a loopback dcp-oss serve."""
    lab = Lab(tmp_path_factory.mktemp("oss"))
    try:
        start_lab(lab, "127.0.0.1", {n: ("127.0.0.1:0", "") for n in ("n0", "n1")})
        yield lab
    finally:
        lab.stop()


@pytest.fixture
def ns_lab(tmp_path: Path) -> Iterator[Lab]:
    """Two agents in their own network/UTS/PID namespaces (hostname = instance name).

    The OSS listens on the lab bridge's host address, which the namespaces route to.
    """
    if os.geteuid() != 0:
        pytest.skip("namespaced instances need root")
    from net.netns import LabNetwork, leftover_links, leftover_namespaces

    tag = secrets.token_hex(3)
    net = LabNetwork(tag)
    lab = Lab(tmp_path)
    try:
        attachments = net.create(["n0", "n1"])
        agents = {
            a.name: (
                "nsenter", f"--net=/run/netns/{a.netns}", "--", "unshare", "--uts", "--pid",
                "--mount", "--mount-proc", "--fork", "--kill-child", "--",
                "0.0.0.0:7070", f"--hostname {a.name}",
            )
            for a in attachments
        }  # fmt: skip
        start_lab(lab, net.gateway, agents)
        yield lab
    finally:
        lab.stop()  # unshare dies, and --kill-child takes the agent with it
        net.destroy()
    assert leftover_links(tag) == [] and leftover_namespaces(tag) == []


def dcptrace(
    lab: Lab | None,
    url: str,
    *argv: str,
    token: str | None = None,
    fallback: str | None = None,
    flags: tuple[str, ...] = (),
    **opts: str,
) -> Any:
    env = traced_env()
    env.pop("DCP_TOKEN", None)
    env.pop("DCP_OSS_FALLBACK", None)
    if token is not None:
        env["DCP_TOKEN"] = token
    if fallback is not None:
        env["DCP_OSS_FALLBACK"] = fallback
    # Placement mechanics under test: every placeable exec placed (not the cost model).
    options = ["--no-state", "--oss", url]
    opts = {"placement": "spread", **opts}
    for k, v in opts.items():
        options += [f"--{k}", v]
    options += flags
    return subprocess.run(
        [*dcptrace_argv(*options), "--", *argv],
        cwd=lab.data if lab else "/", env=env, capture_output=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def newest_program(lab: Lab) -> dict[str, Any]:
    """The run's program once it ended (dcptrace returns with its program; its tracer
    process records the end in the OSS right after)."""
    found: list[dict[str, Any]] = []

    def ended() -> bool:
        found[:] = lab.get("/v1/programs")[:1]
        return bool(found) and found[0]["state"] not in ("pending", "running", "recovering")

    assert wait_for(ended, 30), found
    return found[0]


def test_background_children_run_on_both_instances_and_the_oss_records_the_run(lab: Lab) -> None:
    script = "for i in 1 2 3 4; do ./marker.sh & done; wait; exit 3"
    res = dcptrace(lab, lab.url, "sh", "-c", script, token=lab.token)
    err = res.stderr.decode()
    assert res.returncode == 3, err
    assert "Traceback" not in err and "WARNING" not in err, err
    where = sorted(res.stdout.decode().split("\n")[:-1])
    assert len(where) == 4 and set(where) == {"on n0", "on n1"}, where
    prog = newest_program(lab)
    assert prog["argv"] == ["sh", "-c", script]
    assert prog["cwd"] == str(lab.data)
    assert prog["exit_status"] == 3 and prog["signal"] is None
    assert prog["state"] == "failed" and prog["status_reason"] == "exited with status 3"
    assert prog["placements"] == [] and prog["processes"] == 0
    # Every placement was released: no slot stays taken on either instance.
    rows = lab.get("/v1/instances", lab.admin)
    assert {r["name"]: r["used_slots"] for r in rows} == {"n0": 0, "n1": 0}


@pytest.mark.root
@pytest.mark.netns
def test_children_run_in_two_namespaced_instances(ns_lab: Lab) -> None:
    # Each child names the instance it runs on (its hostname is the home's, issue 11).
    script = f'W={shlex.quote(WHERE_SH)}; for i in 1 2 3 4; do (sh -c "$W") & done; wait; exit 5'
    res = dcptrace(ns_lab, ns_lab.url, "sh", "-c", script, token=ns_lab.token)
    assert res.returncode == 5, res.stderr.decode()
    names = sorted(res.stdout.decode().split())
    assert len(names) == 4 and set(names) == {"n0", "n1"}, names
    prog = newest_program(ns_lab)
    assert prog["exit_status"] == 5 and prog["placements"] == []


def test_sequential_children_alternate_and_statuses_propagate(lab: Lab) -> None:
    script = (
        './marker.sh; ./marker.sh 7; echo "status $?"; '
        "sh -c 'kill -TERM $$'; echo \"status $?\"; exit 0"
    )
    res = dcptrace(lab, lab.url, "sh", "-c", script, token=lab.token, placement="spread")
    assert res.returncode == 0, res.stderr.decode()
    lines = res.stdout.decode().splitlines()
    assert lines[2:] == ["status 7", "status 143"], lines
    assert sorted(lines[:2]) == ["on n0", "on n1"], lines
    prog = newest_program(lab)
    assert prog["state"] == "finished" and prog["exit_status"] == 0


def test_placement_local_never_runs_remotely(lab: Lab) -> None:
    res = dcptrace(lab, lab.url, "sh", "-c", "./marker.sh; ./marker.sh", token=lab.token,
                   placement="local")  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode().splitlines() == ["on home", "on home"]
    assert newest_program(lab)["state"] == "finished"


def test_a_killed_root_is_recorded_with_its_signal(lab: Lab) -> None:
    res = dcptrace(lab, lab.url, "sh", "-c", "./marker.sh; kill -KILL $$", token=lab.token)
    assert res.returncode == -signal.SIGKILL, res.stderr.decode()  # dcptrace dies the same way
    assert res.stdout.decode().split() in (["on", "n0"], ["on", "n1"])
    prog = newest_program(lab)
    assert prog["signal"] == 9 and prog["state"] == "failed"


def _one_line(res: Any) -> str:
    err = res.stderr.decode()
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("dcptrace: "), err
    assert res.returncode in (2, 125), (res.returncode, err)
    assert res.stdout == b""
    return err


def test_no_token_is_one_clear_line(lab: Lab) -> None:
    err = _one_line(dcptrace(lab, lab.url, "/bin/echo", "ran"))
    assert "DCP_TOKEN" in err


def test_a_wrong_token_is_one_clear_line_and_nothing_runs(lab: Lab) -> None:
    before = len(lab.get("/v1/programs"))
    err = _one_line(dcptrace(lab, lab.url, "/bin/echo", "ran", token="dcp_not-a-token"))
    assert "refused the token in DCP_TOKEN" in err
    assert len(lab.get("/v1/programs")) == before


def test_an_unreachable_oss_is_one_clear_line() -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        err = _one_line(dcptrace(None, url, "/bin/echo", "ran", token="dcp_x"))
    assert f"cannot use the OSS at {url}" in err


def test_a_bad_url_is_one_clear_line() -> None:
    err = _one_line(dcptrace(None, "ftp://example.invalid", "/bin/true", token="dcp_x"))
    assert "http(s) URL" in err


def test_an_oss_gone_mid_run_leaves_the_processes_here(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    try:
        start_lab(lab, "127.0.0.1", {"n0": ("127.0.0.1:0", "")})
        script = "./marker.sh; while [ ! -f gone ]; do :; done; ./marker.sh; exit 6"
        env = dict(traced_env(), DCP_TOKEN=lab.token)
        p = subprocess.Popen(
            [*dcptrace_argv("--no-state", "--oss", lab.url, "--placement", "spread"),
             "--", "sh", "-c", script],
            cwd=lab.data, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert p.stdout is not None
            assert p.stdout.readline() == b"on n0\n"
            serve = lab.procs[0]
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=20)
            (lab.data / "gone").touch()
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 6, err.decode()
        assert out == b"on home\n"
        text = err.decode()
        assert "Traceback" not in text
        assert text.count("the OSS placed no process") == 1, text
    finally:
        lab.stop()


def _stopped_without_instances(lab: Lab) -> None:
    """dcptrace stops with one clear line, the program never ran, the OSS run is cancelled."""
    res = dcptrace(lab, lab.url, "sh", "-c", "touch ran", token=lab.token)
    err = res.stderr.decode()
    assert "Traceback" not in err, err
    assert res.returncode == 127 and err.count("\n") == 1, (res.returncode, err)  # never started
    assert "has no ready instance" in err and "DCP_OSS_FALLBACK=local" in err, err
    assert not (lab.data / "ran").exists()
    assert lab.get("/v1/programs")[0]["state"] == "cancelled"


def test_no_registered_instance_stops_dcptrace_unless_a_local_fallback_is_asked(
    tmp_path: Path,
) -> None:
    lab = Lab(tmp_path)
    try:
        start_lab(lab, "127.0.0.1", {})
        _stopped_without_instances(lab)
        res = dcptrace(lab, lab.url, "sh", "-c", "touch ran", token=lab.token, fallback="local")
        assert res.returncode == 0, res.stderr.decode()
        assert (lab.data / "ran").exists()
        assert res.stderr.decode().count("processes run here") == 1, res.stderr.decode()
    finally:
        lab.stop()


def test_every_instance_failed_stops_dcptrace(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    try:
        start_lab(lab, "127.0.0.1", {"n0": ("127.0.0.1:0", "")})
        agent = lab.procs[1]
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)

        def failed() -> bool:
            return lab.get("/v1/instances", lab.admin)[0]["state"] == "failed"

        assert wait_for(failed, 60), lab.get("/v1/instances", lab.admin)
        _stopped_without_instances(lab)
    finally:
        lab.stop()


def test_a_bad_fallback_is_one_clear_line(lab: Lab) -> None:
    err = _one_line(dcptrace(lab, lab.url, "/bin/true", token=lab.token, fallback="maybe"))
    assert "DCP_OSS_FALLBACK must be 'local' or 'none'" in err
