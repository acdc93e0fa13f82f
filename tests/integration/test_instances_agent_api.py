"""The agent's HTTP side, and its OSS link against the real dcp-oss.

The OSS is `python -m oss serve` over a fresh data directory (a real aiohttp
server and SQLite, on loopback); the instance token comes from
`python -m oss instance-token`, as CONTRACTS.md specifies.  The agent is the
real `python -m vmagent` process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import secret_file

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
TOKEN = "inst-token-123"  # for agents without an OSS


def oss_cli(*args: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "oss", *args], capture_output=True, env=ENV, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.decode().strip()


class RealOss:
    """dcp-oss serve in a subprocess; restartable on the same port and data."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.instance_token = oss_cli("instance-token", "--data", str(data), "n7")
        self.admin = oss_cli("account", "create", "--data", str(data), "--admin", "ops")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, port: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oss", "serve", "--data", str(self.data),
             "--listen", f"127.0.0.1:{port}", "--heartbeat-interval", "0.2", "--tick", "0.2"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        found = re.search(r"http://[0-9.]+:\d+", line)
        assert found, f"dcp-oss did not start: {line!r}"
        self.url = found.group(0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def port(self) -> int:
        return int(self.url.rpartition(":")[2])

    def instance(self, name: str) -> dict[str, Any] | None:
        status, body = get(f"{self.url}/v1/instances", self.admin)
        assert status == 200, body
        return next((i for i in body if i["name"] == name), None)


def wait_for(cond: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def oss(tmp_path: Path) -> Iterator[RealOss]:
    server = RealOss(tmp_path / "oss")
    server.start()
    yield server
    server.stop()


def start_agent(
    *extra: str, token: str = TOKEN, name: str = "n7"
) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmagent", "--instance", name, "--token-file", secret_file(token),
         "--listen", "127.0.0.1:0", "-v", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("listening "), proc.stderr.read() if proc.stderr else line
    return proc, line.split()[1]


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def get(url: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, {"text": exc.read().decode()}


def test_registers_heartbeats_and_survives_an_oss_restart(oss: RealOss) -> None:
    proc, address = start_agent("--oss", oss.url, token=oss.instance_token)
    try:
        wait_for(lambda: (oss.instance("n7") or {}).get("state") == "ready", "registration")
        inst = oss.instance("n7")
        assert inst is not None
        assert inst["address"] == address and inst["cpus"] >= 1 and inst["memory_mb"] > 0
        first = inst["last_heartbeat"]
        wait_for(lambda: (oss.instance("n7") or {})["last_heartbeat"] > first, "heartbeats")
        port = oss.port
        oss.stop()
        time.sleep(1.0)  # heartbeats fail meanwhile; the agent backs off and retries
        assert proc.poll() is None
        oss.start(port)  # same port, same data
        before = (oss.instance("n7") or {})["last_heartbeat"]
        wait_for(lambda: (oss.instance("n7") or {})["last_heartbeat"] > before, "heartbeats after")
        assert (oss.instance("n7") or {}).get("state") == "ready"
    finally:
        stop_agent(proc)


def test_refused_token_is_retried_without_crashing(oss: RealOss) -> None:
    proc, _ = start_agent("--oss", oss.url, token="not-the-token")
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    said = b""

    def refused() -> bool:  # the agent measures its CPU score (~1 s) before it registers
        nonlocal said
        said += proc.stderr.read() or b""  # type: ignore[union-attr]
        return b"refused the token of instance n7" in said

    try:
        wait_for(refused, "the OSS's refusal", 30)
        assert proc.poll() is None  # refused, it retries: still running
        assert (oss.instance("n7") or {}).get("state") != "ready"
    finally:
        stop_agent(proc)


def test_http_api_health_load_and_auth() -> None:
    proc, address = start_agent()
    try:
        status, health = get(f"http://{address}/v1/health")
        assert status == 200 and health == {"ok": True}  # anonymous: liveness only
        status, health = get(f"http://{address}/v1/health", TOKEN)
        assert status == 200 and health["instance"] == "n7" and health["ok"] is True
        status, body = get(f"http://{address}/v1/load")
        assert status == 401 and "bearer token" in body["text"]
        status, load = get(f"http://{address}/v1/load", TOKEN)
        assert status == 200 and load["memory_used_mb"] > 0 and load["processes"] > 0
        status, sessions = get(f"http://{address}/v1/sessions", TOKEN)
        assert status == 200 and sessions["sessions"] == []
        status, _ = get(f"http://{address}/v1/nothing")
        assert status == 404
    finally:
        stop_agent(proc)


def test_bad_options_give_a_usage_error_not_a_traceback() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmagent",
            "--instance",
            "a1",
            "--token-file",
            secret_file("t"),
            "--listen",
            "nope",
        ],
        capture_output=True,
        env=env,
    )
    assert res.returncode == 2
    assert b"expected HOST:PORT" in res.stderr and b"Traceback" not in res.stderr
