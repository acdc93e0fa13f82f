"""Failover from checkpoints between two TCG guests (issue 12; Debian's criu 3.17).

One lab (image, private libvirtd, bridge, OSS, vm1 and vm2).  A real
`dcptrace --oss URL --placement spread --checkpoint-every 2` in the lab
namespace runs a counter, placed in a guest; its agent checkpoints it into the
OSS.  The guest holding it is destroyed (libvirt, as a crash); the OSS declares
it lost and the other guest restores the counter from its last checkpoint; the
run ends with the counter's final output and status, every number present.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

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

from images.builder import default_cache_dir, source_checkout  # noqa: E402

N = 600
# Prints its guest's name (guestinit writes it to /etc/hostname), then 1..N, "done"; exits 7.
COUNTER = r"""
import sys, time
print("on", open("/etc/hostname").read().strip(), flush=True)
for i in range(1, 601):
    print(i, flush=True)
    time.sleep(0.1)
print("done", flush=True)
sys.exit(7)
"""


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """vm1 and vm2 booted, their agents registered; closed after the module."""
    failed_before = request.session.testsfailed
    loop = LoopThread()
    lab = make_lab(loop, "f")
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


def test_a_destroyed_guest_s_checkpointed_counter_completes_on_the_other(lab: Lab) -> None:
    assert lab.oss is not None and lab.provider is not None
    oss = lab.oss.oss
    _acct, _user, token = lab.loop.run(
        oss.accounts.create_account("failover", False, "sum", "u", allow_root=True)
    )
    env = dict(os.environ, PYTHONPATH=str(source_checkout()), DCP_TOKEN=token)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.netns, sys.executable, "-m", "tracer.cli",
         "--oss", lab.oss_url, "--placement", "spread", "--checkpoint-every", "2",
         "--", "/bin/sh", "-c", 'exec /usr/bin/python3 -c "$0"', COUNTER],
        cwd="/", env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    lines: list[str] = []
    out = proc.stdout
    assert out is not None

    def read() -> None:
        for raw in iter(out.readline, b""):
            lines.append(raw.decode(errors="replace").strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any(ln.startswith("on ") for ln in lines) and time.monotonic() < deadline:
            assert proc.poll() is None, (proc.returncode, lines, proc.stderr.read())  # type: ignore[union-attr]
            time.sleep(0.2)
        (on,) = [ln for ln in lines if ln.startswith("on ")]
        holder = on.split()[1]
        assert holder in ("vm1", "vm2"), lines[:5]
        since = time.time()

        def checkpointed() -> bool:
            return any(s.taken > since for s in list(oss.failover.store.index.values()))

        while not checkpointed() and time.monotonic() < deadline + 120:
            assert proc.poll() is None, (proc.returncode, lines[-3:], proc.stderr.read())  # type: ignore[union-attr]
            time.sleep(0.5)
        assert checkpointed(), "no checkpoint reached the OSS"
        before = len(lines)

        provider = lab.provider

        async def crash() -> None:
            dom = await asyncio.to_thread(provider.conn.lookupByName, f"dcp-{holder}")
            await asyncio.to_thread(dom.destroy)

        lab.loop.run(crash())
        proc.wait(timeout=600)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    said = proc.stderr.read().decode(errors="replace")
    print(said, file=sys.stderr)
    assert proc.returncode == 7, said
    numbers = [int(ln) for ln in lines if ln.isdigit()]
    assert set(numbers) == set(range(1, N + 1)), (before, said)
    assert lines[-1] == "done" and lines.count("done") == 1
    other = "vm2" if holder == "vm1" else "vm1"
    assert f"restored on {other}" in said, said
