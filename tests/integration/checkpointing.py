"""What the checkpoint and migration tests share (local agents, local instances, the OSS).

An agent's HTTP API asked with its token, the session of a program's pid, CRIU
or a skip naming why not, and a program under its deputy that is killed if a
test leaves it running.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.integration.test_dcptrace_oss import Lab, _cli
from tests.integration.test_oss_limits_act import _send
from vmagent.checkpoint import criu


def criu_or_skip() -> criu.Criu:
    """The working CRIU; the test is skipped with CRIU's own reason otherwise."""
    try:
        return criu.check()
    except criu.CriuUnavailable as exc:
        pytest.skip(str(exc))


def agent_call(
    address: str,
    token: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    timeout: float = 300,
) -> Any:
    """An agent's JSON answer; HTTPError carrying the agent's line in `msg` otherwise."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"http://{address}{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        exc.msg = f"{exc.msg}: {exc.read().decode(errors='replace').strip()}"
        raise


def session_of(address: str, token: str, pid: int) -> str:
    """The running session whose program's pid (the instance's) is `pid`."""
    for s in agent_call(address, token, "GET", "/v1/sessions")["sessions"]:
        if s["pid"] == pid and s.get("running", True):
            return str(s["session"])
    raise AssertionError(f"no session of pid {pid} on {address}")


@contextlib.contextmanager
def started(argv: Sequence[str]) -> Iterator[subprocess.Popen[bytes]]:
    """`argv` running (stdout, stderr piped); killed on the way out if still running."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def in_order(numbers: Sequence[int]) -> bool:
    """0, 1, 2, ... without a gap or a repeat."""
    return list(numbers) == list(range(len(numbers)))


def pool_agents(url: str | None = None) -> list[int]:
    """The agents the local provider runs for pool p (found by their command line), of
    the OSS at `url` only if given (other tests on the machine may run their own)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if url is not None and f"--oss\0{url}\0".encode() not in cmd:
                continue
            if b"vmagent" in cmd and b"--instance\0p-" in cmd:
                found.append(int(d.name))
    return found


def ready_instances(lab: Lab) -> list[str]:
    """The OSS's instances that are ready, by name."""
    rows = lab.get("/v1/instances", lab.admin)
    return sorted(r["name"] for r in rows if r["state"] == "ready")


@contextlib.contextmanager
def local_pool(
    tmp_path: Path,
    price: int,
    instances: int,
    program: str | None = None,
    *,
    max_size: int | None = None,
    cpus: int = 2,
    serve: Sequence[str] = ("--heartbeat-timeout", "30", "--slots-per-cpu", "2"),
    need_criu: bool = True,
) -> Iterator[Lab]:
    """dcp-oss serve (tick 0.5 s, and `serve`'s options) with the local provider and a
    pool p of `instances` warm ready instances (at most `max_size`, default as many) of
    a `cpus`-CPU type priced `price` micro-units a second; `program`, if given, is the
    data directory's counter.py.  Skipped without root, or without a working CRIU when
    `need_criu`.  Everything it started is gone at the end, agents too."""
    if os.geteuid() != 0:
        pytest.skip("local instances in their own namespaces need root")
    if need_criu:
        criu_or_skip()
    lab = Lab(tmp_path)
    try:
        lab.token = _cli("account", "create", "--data", str(lab.data), "--allow-root", "acme")
        lab.admin = _cli("account", "create", "--data", str(lab.data), "--admin", "op")
        _proc, line = lab.start(
            "oss", "serve", "--listen", "127.0.0.1:0", "--data", str(lab.data),
            "--heartbeat-interval", "0.5", "--tick", "0.5", *serve,
            "--provider", "local=vmagent.cluster.provider:make",
        )  # fmt: skip
        assert "listening on " in line, line
        lab.url = line.split("listening on ", 1)[1].strip()
        itype = {"name": "t", "cpus": cpus, "memory_mb": 64, "price_micros_per_s": price}
        _send(lab, "PUT", "/v1/instance-types", lab.admin, itype)
        pool = {"name": "p", "instance_type": "t", "warm_target": instances,
                "max_size": max_size or instances, "provider": "local"}  # fmt: skip
        _send(lab, "PUT", "/v1/pools", lab.admin, pool)
        assert wait_for(lambda: len(ready_instances(lab)) == instances, 60), lab.get(
            "/v1/instances", lab.admin
        )
        if program is not None:
            (lab.data / "counter.py").write_text(program)
        yield lab
    finally:
        lab.stop()
        assert wait_for(lambda: pool_agents(lab.url) == [], 20), pool_agents(lab.url)
