"""What the checkpoint and migration tests share (local agents, local instances, the OSS).

An agent's HTTP API asked with its token, the session of a program's pid, CRIU
or a skip naming why not, and a program under its deputy that is killed if a
test leaves it running.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

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
