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

import hashlib
import json
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

from vmagents import AgentRefused, Program, migrate, session_of  # noqa: E402
from vmlab import Lab, LoopThread, make_lab, remove_tree  # noqa: E402

from images.builder import default_cache_dir  # noqa: E402

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


class Counter(Program):
    """The counter; its rows are its lines other than the two sums."""

    def rows(self) -> list[list[str]]:
        return [ln.split() for ln in self.lines if not ln.startswith("sum ")]

    def wait_rows(self, n: int) -> None:
        self.wait_lines(n + 1)

    def host(self) -> str:
        rows = self.rows()
        return rows[-1][3] if rows else ""


def check_run(counter: Counter, code: int) -> list[str]:
    """Exit 7, both sums equal, no gap, no repeat, one pid; the hosts in order."""
    assert code == 7, counter.errors()
    sums = [ln.split()[1] for ln in counter.lines if ln.startswith("sum ")]
    assert len(sums) == 2 and sums[0] == sums[1], sums
    rows = counter.rows()
    assert [int(r[2]) for r in rows] == list(range(len(rows)))  # no gap, no repeat
    # The pid on the instance never changes (CRIU restores it).  The pid the program
    # sees (getpid, r[0]) is its home's view, kept by the tracer's op=adopt: see the
    # report of the pids work (issue 11/12) for its state; it is printed, not asserted.
    assert len({r[1] for r in rows}) == 1, {r[1] for r in rows}
    print("getpid seen:", sorted({r[0] for r in rows}), file=sys.stderr)
    hosts = [r[3] for r in rows]
    return [h for i, h in enumerate(hosts) if i == 0 or hosts[i - 1] != h]


def test_a_64mb_counter_moves_to_the_other_guest_and_back(lab: Lab) -> None:
    counter = Counter(lab, "vm1", COUNTER, str(MB))
    try:
        counter.wait_rows(5)
        statpid = int(counter.rows()[0][1])
        sid = session_of(lab, "vm1", statpid)
        there = migrate(lab, "vm1", "vm2", sid)
        print("vm1 -> vm2:", json.dumps(there), file=sys.stderr)
        assert (there["from"], there["to"], there["pid"]) == ("vm1", "vm2", statpid)
        seen = len(counter.rows())
        counter.wait_rows(seen + 5)
        assert counter.host() == "vm2"
        # Back the way it went before the fast path: one frozen dump, its images packed.
        back = migrate(lab, "vm2", "vm1", sid, precopy=False, page_server=False)
        print("vm2 -> vm1:", json.dumps(back), file=sys.stderr)
        assert (back["from"], back["to"]) == ("vm2", "vm1")
        counter.wait_rows(len(counter.rows()) + 5)
        code = counter.finish()
    finally:
        counter.kill()
    assert check_run(counter, code) == ["vm1", "vm2", "vm1"]
    # There by default: pre-copy rounds (the first carried the data) and the page server.
    assert there["precopy_rounds"][0] > MB << 20 and not there["precopy_error"], there
    assert there["page_server"] and there["image_bytes"] < MB << 20, there
    assert back["precopy_rounds"] == [] and not back["page_server"], back
    assert back["image_bytes"] > MB << 20 and back["zstd_bytes"] > MB << 20, back
    assert hashlib.sha256(b"").hexdigest() not in counter.lines[0]


def test_a_target_destroyed_mid_migration_leaves_the_program_on_the_source(lab: Lab) -> None:
    assert lab.provider is not None
    counter = Counter(lab, "vm1", COUNTER, str(MB))
    result: list[Any] = []
    try:
        counter.wait_rows(5)
        sid = session_of(lab, "vm1", int(counter.rows()[0][1]))

        def move() -> None:
            # The packed path (one frozen dump, images over HTTP): its freeze outlasts the
            # second this test waits before the destroy; the fast path's may not.
            try:
                result.append(migrate(lab, "vm1", "vm2", sid, precopy=False, page_server=False))
            except AgentRefused as exc:
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
