"""The agent's HTTP side and its OSS link (register, heartbeat, re-register after restarts).

The OSS here is a small aiohttp server on loopback implementing the agent<->OSS
contract of CONTRACTS.md (the real dcp-oss lives on another branch); the agent
is the real `python -m vmagent` process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "inst-token-123"


class ContractOss:
    """register/heartbeat per CONTRACTS.md, on a fixed loopback port, restartable."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.registrations: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.accept = True
        self.runner: web.AppRunner | None = None
        self.port = 0

    def _auth(self, request: web.Request) -> None:
        if not self.accept or request.headers.get("Authorization") != f"Bearer {TOKEN}":
            raise web.HTTPUnauthorized(text="bad token")

    async def _register(self, request: web.Request) -> web.Response:
        self._auth(request)
        body = await request.json()
        self.registrations.append(body)
        return web.json_response({"instance": body["instance"], "heartbeat_interval": 0.1})

    async def _heartbeat(self, request: web.Request) -> web.Response:
        self._auth(request)
        self.heartbeats.append(await request.json())
        return web.json_response({"ok": True})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/agents/register", self._register)
        app.router.add_post("/v1/agents/heartbeat", self._heartbeat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def wait_for(cond: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def oss() -> Iterator[ContractOss]:
    server = ContractOss()
    server.start()
    yield server
    server.close()


def start_agent(*extra: str) -> tuple[subprocess.Popen[bytes], str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmagent",
            "--instance",
            "a1",
            "--token",
            TOKEN,
            "--listen",
            "127.0.0.1:0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
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


def test_registers_heartbeats_and_survives_an_oss_restart(oss: ContractOss) -> None:
    proc, address = start_agent("--oss", f"http://127.0.0.1:{oss.port}")
    try:
        wait_for(lambda: len(oss.heartbeats) >= 3, "three heartbeats")
        reg = oss.registrations[0]
        assert reg["instance"] == "a1" and reg["address"] == address
        assert reg["cpus"] >= 1 and reg["memory_mb"] > 0 and reg["hostname"]
        seqs = [h["seq"] for h in oss.heartbeats]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert set(oss.heartbeats[0]["load"]) == {
            "cpu_percent",
            "memory_used_mb",
            "runqueue",
            "processes",
        }
        oss.stop()
        before = len(oss.registrations)
        time.sleep(0.5)  # heartbeats fail meanwhile; the agent backs off
        oss.start()  # same port
        wait_for(lambda: len(oss.registrations) > before, "re-registration after restart")
        after = len(oss.heartbeats)
        wait_for(lambda: len(oss.heartbeats) > after, "heartbeats after restart")
        assert oss.heartbeats[-1]["seq"] > seqs[-1]  # seq keeps increasing
        assert proc.poll() is None
    finally:
        stop_agent(proc)


def test_refused_token_is_retried_without_crashing(oss: ContractOss) -> None:
    oss.accept = False
    proc, _ = start_agent("--oss", f"http://127.0.0.1:{oss.port}")
    try:
        time.sleep(1.0)
        assert proc.poll() is None and oss.registrations == []
        oss.accept = True
        wait_for(lambda: len(oss.registrations) == 1, "registration once accepted")
    finally:
        stop_agent(proc)
    assert proc.stderr is not None
    assert b"refused the token of instance a1" in proc.stderr.read()


def test_http_api_health_load_and_auth() -> None:
    proc, address = start_agent()
    try:
        status, health = get(f"http://{address}/v1/health")
        assert status == 200 and health["instance"] == "a1" and health["ok"] is True
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
        [sys.executable, "-m", "vmagent", "--instance", "a1", "--token", "t", "--listen", "nope"],
        capture_output=True,
        env=env,
    )
    assert res.returncode == 2
    assert b"expected HOST:PORT" in res.stderr and b"Traceback" not in res.stderr
