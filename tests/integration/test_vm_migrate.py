"""Migration between two TCG guests (issue 12): the guests' agents, Debian's criu 3.17.

One lab (image, private libvirtd, bridge, OSS, two guests) for the module.  A
deputy in the lab namespace runs a counter holding 64 MB of random data in vm1
(the exec path dcptrace's remote placement uses); the test moves its session
vm1 -> vm2 -> vm1 through the source agents' migrate route (tickets minted with
the target's token, as the OSS mints them with its exec key), then destroys
vm2 while a second counter is on its way there.  Every output line is the
deputy's stdout, i.e. what reaches the user's terminal.
"""

from __future__ import annotations

import atexit
import hashlib
import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from vmcheck import why_no_vm_lab

pytestmark = [
    pytest.mark.vm,
    pytest.mark.libvirt,
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.timeout(900),  # the image is rebuilt when the sources changed
]

_reason = why_no_vm_lab()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from vmlab import Lab, LoopThread, make_lab, remove_tree  # noqa: E402

from images.builder import default_cache_dir  # noqa: E402
from net import bridge  # noqa: E402
from vmagent.checkpoint.migrate import mint_ticket  # noqa: E402
from vmagent.exec import remote  # noqa: E402

AGENT_PORT = 7070
MB = 64

# Holds MB of random data (its sha256 printed at the start and the end); a thread
# dirties a page per line without changing it and prints "pid statpid i hostname"
# every 50 ms, until the main thread reads a line from stdin (a read blocked across
# the moves); exits 7.
COUNTER = r"""
import hashlib, os, socket, sys, threading, time
data = bytearray(os.urandom(int(sys.argv[1]) << 20))
print("sum", hashlib.sha256(data).hexdigest(), flush=True)
stop = threading.Event()
def count():
    me = int(open("/proc/self/stat").read().split()[0])
    i = 0
    while not stop.is_set():
        k = (i * 4096) % len(data)
        data[k] = data[k]
        print(os.getpid(), me, i, socket.gethostname(), flush=True)
        i += 1
        time.sleep(0.05)
counter = threading.Thread(target=count)
counter.start()
sys.stdin.readline()
stop.set()
counter.join()
print("sum", hashlib.sha256(data).hexdigest(), flush=True)
sys.exit(7)
"""


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """vm1 and vm2 booted, their agents registered; closed after the module."""
    failed_before = request.session.testsfailed
    loop = LoopThread()
    lab = make_lab(loop, "g")
    try:
        lab.image = lab.build_image(default_cache_dir())
        loop.run(lab.start(), timeout=120)
        if lab.oss is None:
            pytest.skip(f"no agent in the guests: {lab.oss_missing}")
        loop.run(lab.boot(["vm1", "vm2"]), timeout=300)
        for n in ("vm1", "vm2"):
            loop.run(lab.registered(n), timeout=180)
        yield lab
    finally:
        if not lab.closed:
            loop.run(lab.aclose(), timeout=120)
        loop.stop()
        if request.session.testsfailed > failed_before:
            print(f"\nVM lab failed: serial logs kept in {lab.work}/state/serial", file=sys.stderr)
        else:
            remove_tree(lab.work)


DROP = remote.TicketDrop()
atexit.register(DROP.close)


def addr(lab: Lab, name: str) -> str:
    assert lab.provider is not None
    return str(lab.provider.address(name))


def call(
    lab: Lab, name: str, method: str, path: str, body: Any = None, timeout: float = 300
) -> Any:
    """The agent of `name`, asked from inside the lab namespace with its token."""
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
        raise AssertionError(f"{name} {path}: {resp.status} {text.strip()}")
    return json.loads(text)


def migrate(lab: Lab, source: str, target: str, sid: str) -> Any:
    ticket = mint_ticket(lab.tokens[target], target, sid)
    body = {"to": f"{addr(lab, target)}:{AGENT_PORT}", "instance": target, "ticket": ticket}
    return call(lab, source, "POST", f"/v1/sessions/{sid}/migrate", body)


class Counter:
    """The counter under its deputy; its stdout lines gathered as they arrive."""

    def __init__(self, lab: Lab, name: str, mb: int) -> None:
        path = b"/usr/bin/python3"
        args = (b"python3", b"-c", COUNTER.encode(), str(mb).encode())
        ticket = remote.ticket_for_self(lab.tokens[name], name, path, args)
        argv = remote.deputy_command(
            DROP, f"{addr(lab, name)}:{AGENT_PORT}", name, ticket, path, args
        )
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.netns, *argv],
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

    def rows(self) -> list[list[str]]:
        return [ln.split() for ln in self.lines if not ln.startswith("sum ")]

    def wait_rows(self, n: int, seconds: float = 240) -> None:
        deadline = time.monotonic() + seconds
        while len(self.rows()) < n:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the counter stopped at {self.lines[-3:]}: {self.errors()}")
            time.sleep(0.1)

    def host(self) -> str:
        rows = self.rows()
        return rows[-1][3] if rows else ""

    def finish(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        self.proc.stdin.close()
        code = self.proc.wait(timeout=240)
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


def session_of(lab: Lab, name: str, pid: int) -> str:
    for s in call(lab, name, "GET", "/v1/sessions")["sessions"]:
        if s["pid"] == pid and s["running"]:
            return str(s["session"])
    raise AssertionError(f"no session of pid {pid} on {name}")


def check_run(counter: Counter, code: int) -> list[str]:
    """Exit 7, both sums equal, no gap, no repeat, one pid; the hosts in order."""
    assert code == 7, counter.errors()
    sums = [ln.split()[1] for ln in counter.lines if ln.startswith("sum ")]
    assert len(sums) == 2 and sums[0] == sums[1], sums
    rows = counter.rows()
    assert [int(r[2]) for r in rows] == list(range(len(rows)))  # no gap, no repeat
    assert len({(r[0], r[1]) for r in rows}) == 1, {(r[0], r[1]) for r in rows}
    hosts = [r[3] for r in rows]
    return [h for i, h in enumerate(hosts) if i == 0 or hosts[i - 1] != h]


def test_a_64mb_counter_moves_to_the_other_guest_and_back(lab: Lab) -> None:
    counter = Counter(lab, "vm1", MB)
    try:
        counter.wait_rows(5)
        statpid = int(counter.rows()[0][1])
        sid = session_of(lab, "vm1", statpid)
        there = migrate(lab, "vm1", "vm2", sid)
        print("vm1 -> vm2:", json.dumps(there), file=sys.stderr)
        assert (there["from"], there["to"], there["pid"]) == ("vm1", "vm2", statpid)
        assert there["image_bytes"] > MB << 20
        seen = len(counter.rows())
        counter.wait_rows(seen + 5)
        assert counter.host() == "vm2"
        back = migrate(lab, "vm2", "vm1", sid)
        print("vm2 -> vm1:", json.dumps(back), file=sys.stderr)
        assert (back["from"], back["to"]) == ("vm2", "vm1")
        counter.wait_rows(len(counter.rows()) + 5)
        code = counter.finish()
    finally:
        counter.kill()
    assert check_run(counter, code) == ["vm1", "vm2", "vm1"]
    assert hashlib.sha256(b"").hexdigest() not in counter.lines[0]


def test_a_target_destroyed_mid_migration_leaves_the_program_on_the_source(lab: Lab) -> None:
    assert lab.provider is not None
    counter = Counter(lab, "vm1", MB)
    result: list[Any] = []
    try:
        counter.wait_rows(5)
        sid = session_of(lab, "vm1", int(counter.rows()[0][1]))

        def move() -> None:
            try:
                result.append(migrate(lab, "vm1", "vm2", sid))
            except AssertionError as exc:
                result.append(str(exc))

        mover = threading.Thread(target=move)
        mover.start()
        # Frozen (no line for a second): the dump or the transfer is under way.
        last, since = len(counter.rows()), time.monotonic()
        while mover.is_alive() and time.monotonic() - since < 1.0:
            time.sleep(0.05)
            if len(counter.rows()) != last:
                last, since = len(counter.rows()), time.monotonic()
        conn = lab.provider.conn
        lab.loop.run(_destroy(conn, "dcp-vm2"))
        mover.join(300)
        assert not mover.is_alive()
        (said,) = result
        assert isinstance(said, str) and "vm1 /v1/sessions" in said, said
        assert said.count("\n") == 0
        counter.wait_rows(len(counter.rows()) + 5)  # it runs on
        code = counter.finish()
    finally:
        counter.kill()
    assert check_run(counter, code) == ["vm1"]


async def _destroy(conn: Any, domain: str) -> None:
    import asyncio

    dom = await asyncio.to_thread(conn.lookupByName, domain)
    await asyncio.to_thread(dom.destroy)
