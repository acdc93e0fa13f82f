"""Checkpoint and restore of a session's tree on its own instance (vmagent.checkpoint).

Real agent (`trace_agent.py`), real deputy, real instance tracer, real CRIU
(`.ci/build-criu.sh` installs it; without a working one the tests skip and say
why).  The program is a counter that prints its pid and a number per line:
after a checkpoint with restore, and one without, its output has no gap and
no repeat, the pid it sees never changes, it is traced again, and the exit
status reaches the deputy.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.integration import checkpointing
from tests.integration.checkpointing import agent_call, criu_or_skip
from tests.integration.test_trace_resident import DROP, TracedAgent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="CRIU dumps and restores as root")

COUNTER = r"""
import os, sys, time
flag = sys.argv[1]
i = 0
while i < 400:
    if i == 20:
        with open(flag + ".tmp", "w") as f:
            f.write(str(int(open('/proc/self/stat').read().split()[0])))
        os.rename(flag + ".tmp", flag)
    print(int(open('/proc/self/stat').read().split()[0]), i, flush=True)
    i += 1
    time.sleep(0.01)
status = open("/proc/self/status").read()
print("tracer", [l.split()[1] for l in status.splitlines() if l.startswith("TracerPid")][0])
sys.exit(7)
"""


@pytest.fixture(scope="module")
def agent() -> Iterator[TracedAgent]:
    criu_or_skip()
    a = TracedAgent("ckpt0")
    yield a
    print(a.stop())  # the agent's log, shown when a test failed
    DROP.close()


def call(agent: TracedAgent, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    return agent_call(agent.address, agent.token, method, path, body, timeout=120)


def session_of(agent: TracedAgent, pid: int) -> str:
    return checkpointing.session_of(agent.address, agent.token, pid)


def test_a_counter_survives_checkpoint_and_restore_in_place(
    agent: TracedAgent, tmp_path: Path
) -> None:
    flag = tmp_path / "flag"
    proc = subprocess.Popen(
        agent.deputy("/usr/bin/python3", "-c", COUNTER, str(flag)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(flag.exists, 60), "the counter never started"
        pid = int(flag.read_text())
        sid = session_of(agent, pid)
        restored = call(agent, "POST", f"/v1/sessions/{sid}/checkpoint", {"restore": True})
        assert restored["pids"] == [pid] and restored["restore_ms"] > 0
        kept = call(agent, "POST", f"/v1/sessions/{sid}/checkpoint", {"restore": False})
        assert kept["pids"] == [pid] and kept["image_bytes"] > 0
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = out.decode().splitlines()
    assert proc.returncode == 7, err.decode()
    assert lines[-1].startswith("tracer ") and lines[-1] != "tracer 0"  # traced again
    counted = [line.split() for line in lines[:-1]]
    assert {int(p) for p, _ in counted} == {pid}  # the pid it sees never changed
    assert [int(n) for _, n in counted] == list(range(400))  # no gap, no repeat
    images = Path(kept["images"])
    assert (images / "dump.log").exists()  # kept: a checkpoint without restore is the caller's
    shutil.rmtree(images)


def test_a_checkpoint_of_an_unknown_session_is_refused(agent: TracedAgent) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        call(agent, "POST", "/v1/sessions/" + "00" * 16 + "/checkpoint", {"restore": False})
    assert info.value.code == 404


HOLDER = r"""
import hashlib, os, sys, time
data = bytearray(os.urandom(64 << 20))
print(hashlib.sha256(data).hexdigest(), flush=True)
flag = sys.argv[1]
with open(flag + ".tmp", "w") as f:
    f.write(str(int(open('/proc/self/stat').read().split()[0])))
os.rename(flag + ".tmp", flag)
while not os.path.exists(flag + ".go"):
    time.sleep(0.01)
print(hashlib.sha256(data).hexdigest(), flush=True)
"""


def test_a_python_process_with_64_mb_keeps_its_checksum(agent: TracedAgent, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    proc = subprocess.Popen(
        agent.deputy("/usr/bin/python3", "-c", HOLDER, str(flag)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(flag.exists, 120), "the holder never started"
        sid = session_of(agent, int(flag.read_text()))
        done = call(agent, "POST", f"/v1/sessions/{sid}/checkpoint", {"restore": True})
        assert done["image_bytes"] > 64 << 20
        Path(str(flag) + ".go").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before, after = out.decode().split()
    assert proc.returncode == 0, err.decode()
    assert before == after


def test_a_failed_dump_leaves_the_program_running_where_it_was_once(
    agent: TracedAgent, tmp_path: Path
) -> None:
    flag = tmp_path / "flag"
    proc = subprocess.Popen(
        agent.deputy("/usr/bin/python3", "-c", COUNTER, str(flag)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(flag.exists, 60), "the counter never started"
        pid = int(flag.read_text())
        sid = session_of(agent, pid)
        with pytest.raises(urllib.error.HTTPError) as info:  # CRIU cannot write there
            call(agent, "POST", f"/v1/sessions/{sid}/checkpoint", {"images": "/proc/sys"})
        assert info.value.code == 409
        assert "criu dump failed" in info.value.msg
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = out.decode().splitlines()
    assert proc.returncode == 7, err.decode()
    assert lines[-1] != "tracer 0"  # traced again after the failure
    assert [int(line.split()[1]) for line in lines[:-1]] == list(range(400))


def test_without_a_working_criu_a_checkpoint_fails_at_once_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DCP_CRIU", "/bin/false")
    broken = TracedAgent("ckpt1")
    flag = tmp_path / "flag"
    proc = subprocess.Popen(
        broken.deputy("/usr/bin/python3", "-c", COUNTER, str(flag)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(flag.exists, 60), "the counter never started"
        sid = session_of(broken, int(flag.read_text()))
        with pytest.raises(urllib.error.HTTPError) as info:
            call(broken, "POST", f"/v1/sessions/{sid}/checkpoint", {"restore": True})
        assert info.value.code == 503
        message = info.value.msg.split(": ", 1)[1]
        assert message.startswith("checkpoint unavailable: /bin/false check failed")
        assert "\n" not in message
        out, _err = proc.communicate(timeout=120)
        assert proc.returncode == 7  # untouched
        assert len(out.decode().splitlines()) == 401
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        broken.stop()


TCP_CLIENT = r"""
import os, socket, sys
port, flag = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port))
with open(flag + ".tmp", "w") as f:
    f.write(str(int(open('/proc/self/stat').read().split()[0])))
os.rename(flag + ".tmp", flag)
f = s.makefile("rwb")
for i in range(40):
    f.write(b"%d\n" % i)
    f.flush()
    print(f.readline().decode().strip(), flush=True)
"""


def test_an_established_tcp_connection_survives_checkpoint_and_restore(
    agent: TracedAgent, tmp_path: Path
) -> None:
    """The program talks to a server outside its tree; restored in place, it goes on talking."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    go = threading.Event()
    answered: list[str] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as f:
            for line in f:
                n = int(line)
                if n == 5:
                    go.wait(120)  # hold the client mid-conversation while it is checkpointed
                answered.append(str(n))
                f.write(b"echo %d\n" % n)
                f.flush()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    flag = tmp_path / "flag"
    proc = subprocess.Popen(
        agent.deputy("/usr/bin/python3", "-c", TCP_CLIENT, str(port), str(flag)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(flag.exists, 60), "the client never connected"
        sid = session_of(agent, int(flag.read_text()))
        assert wait_for(lambda: len(answered) == 5, 60)
        done = call(agent, "POST", f"/v1/sessions/{sid}/checkpoint", {"restore": True})
        assert done["restore_ms"] > 0
        go.set()
        out, err = proc.communicate(timeout=120)
    finally:
        go.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines() == [f"echo {i}" for i in range(40)]
