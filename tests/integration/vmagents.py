"""Driving the guests' agents from the host, for the VM tests and bench/bench_vm_migrate.py.

Everything goes through the lab namespace (the guests' bridge lives there): the
agent's HTTP API with the instance token the test holds, a deputy running a
program in a guest (the exec path dcptrace's remote placement uses), and
migrations with tickets minted from the target's token.
"""

from __future__ import annotations

import atexit
import http.client
import json
import subprocess
import threading
import time
from typing import Any

from vmlab import Lab

from net import bridge
from vmagent.checkpoint.migrate import mint_ticket
from vmagent.exec import remote

AGENT_PORT = 7070
DROP = remote.TicketDrop()
atexit.register(DROP.close)


class AgentRefused(AssertionError):
    """an agent answered with an error"""


def addr(lab: Lab, name: str) -> str:
    """The guest's address on the lab bridge."""
    assert lab.provider is not None
    return str(lab.provider.address(name))


def call(
    lab: Lab, name: str, method: str, path: str, body: Any = None, timeout: float = 300
) -> Any:
    """Ask the agent of `name` (its token) from inside the lab namespace; its JSON answer."""
    conn = http.client.HTTPConnection(addr(lab, name), AGENT_PORT, timeout=timeout)
    conn.sock = bridge.connect(lab.netns, addr(lab, name), AGENT_PORT, timeout)
    try:
        headers = {"Authorization": f"Bearer {lab.tokens[name]}"}
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
    finally:
        conn.close()
    if resp.status != 200:
        raise AgentRefused(f"{name} {path}: {resp.status} {text.strip()}")
    return json.loads(text)


def migrate(
    lab: Lab,
    source: str,
    target: str,
    sid: str,
    precopy: bool | None = None,
    page_server: bool | None = None,
) -> Any:
    """Move session `sid` from `source` to `target` (the source agent's route).

    `precopy`, `page_server`: None leaves them to the agent (both on by default).
    """
    ticket = mint_ticket(lab.tokens[target], target, sid)
    body: dict[str, Any] = {
        "to": f"{addr(lab, target)}:{AGENT_PORT}",
        "instance": target,
        "ticket": ticket,
    }
    if precopy is not None:
        body["precopy"] = precopy
    if page_server is not None:
        body["page_server"] = page_server
    return call(lab, source, "POST", f"/v1/sessions/{sid}/migrate", body)


def session_of(lab: Lab, name: str, pid: int) -> str:
    """The running session of the program whose pid (the instance's) is `pid`."""
    for s in call(lab, name, "GET", "/v1/sessions")["sessions"]:
        if s["pid"] == pid and s["running"]:
            return str(s["session"])
    raise AssertionError(f"no session of pid {pid} on {name}")


class Program:
    """`python3 -c CODE ARGS` in guest `name` under a deputy; its stdout gathered by line."""

    def __init__(self, lab: Lab, name: str, code: str, *args: str) -> None:
        path = b"/usr/bin/python3"
        argv = (b"python3", b"-c", code.encode(), *(a.encode() for a in args))
        ticket = remote.ticket_for_self(lab.tokens[name], name, path, argv)
        deputy = remote.deputy_command(
            DROP, f"{addr(lab, name)}:{AGENT_PORT}", name, ticket, path, argv
        )
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.netns, *deputy],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def wait_lines(self, n: int, seconds: float = 300) -> None:
        """Until `n` lines arrived (AssertionError if it ends or `seconds` pass first)."""
        deadline = time.monotonic() + seconds
        while len(self.lines) < n:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"it stopped at {self.lines[-3:]}: {self.errors()}")
            time.sleep(0.1)

    def finish(self) -> int:
        """Send it a line on stdin (its cue to end) and wait for its exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        self.proc.stdin.close()
        code = self.proc.wait(timeout=300)
        self.reader.join(30)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def errors(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")[-2000:]
