"""LocalCluster with namespaced instances (root): separate hosts on a lab network."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from net.netns import leftover_links, leftover_namespaces
from tests.conftest import wait_for
from vmagent.cluster.local import Instance, LocalCluster
from vmagent.errors import ClusterError
from vmagent.exec.remote import TicketDrop, deputy_command, ticket_for_self

pytestmark = [
    pytest.mark.root,
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaced instances need root"),
]


DROP = TicketDrop()


@pytest.fixture(scope="module", autouse=True)
def _ticket_files() -> Iterator[None]:
    yield
    DROP.close()


def deputy(inst: Instance, *argv: str, window: float | None = None) -> list[str]:
    path = os.fsencode(argv[0])
    args = tuple(os.fsencode(a) for a in argv)
    ticket = ticket_for_self(inst.token, inst.name, path, args)
    return deputy_command(DROP, inst.address, inst.name, ticket, path, args, window)


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_three_namespaced_instances_are_separate_hosts() -> None:
    cluster = LocalCluster(3)
    tag = cluster.tag
    try:
        instances = cluster.start()
        assert all(i.isolated for i in instances)
        assert [i.hostname for i in instances] == ["node0", "node1", "node2"]
        hosts = {i.address.rpartition(":")[0] for i in instances}
        assert len(hosts) == 3 and all(h.startswith("10.213.") for h in hosts)
        for inst in instances:
            res = subprocess.run(deputy(inst, "/bin/hostname"), capture_output=True)
            assert (res.returncode, res.stdout) == (0, f"{inst.name}\n".encode())
            # Its own network namespace: only lo and the lab link.
            res = subprocess.run(deputy(inst, "/bin/cat", "/proc/net/dev"), capture_output=True)
            links = {line.split(":")[0].strip() for line in res.stdout.decode().splitlines()[2:]}
            assert links == {"lo", "eth0"}
        assert leftover_namespaces(tag) and leftover_links(tag)
    finally:
        cluster.close()
        cluster.remove_logs()
    assert leftover_namespaces(tag) == [] and leftover_links(tag) == []


def test_kill_9_of_a_namespaced_agent_takes_its_processes_along() -> None:
    with LocalCluster(2) as cluster:
        inst = cluster.instances[1]
        marker = f"{time.time_ns() % 10**6 + 1000}.25"
        proc = subprocess.Popen(
            deputy(inst, "/bin/sh", "-c", f"sleep {marker}; echo never", window=1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not processes_with(f"sleep\0{marker}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(f"sleep\0{marker}")
        cluster.kill(inst.name)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 255 and out == b""
        assert f"instance {inst.name} ({inst.address}) lost".encode() in err
        deadline = time.monotonic() + 30
        while processes_with(f"sleep\0{marker}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(f"sleep\0{marker}") == []
        # The other instance is unaffected.
        other = cluster.instances[0]
        assert subprocess.run(deputy(other, "/bin/true")).returncode == 0
        cluster.remove_logs()


def test_a_failed_start_tears_down_everything() -> None:
    cluster = LocalCluster(2, start_timeout=0.001)  # no agent can be ready that fast
    with pytest.raises(ClusterError, match="did not start"):
        cluster.start()
    assert leftover_namespaces(cluster.tag) == [] and leftover_links(cluster.tag) == []
    deadline = time.monotonic() + 10
    while processes_with(f"dcp-{cluster.tag}-") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(f"dcp-{cluster.tag}-") == []  # nsenter/unshare/agents all gone
    cluster.remove_logs()


def test_close_stops_every_agent() -> None:
    cluster = LocalCluster(2)
    pids = [i.pid for i in cluster.start()]
    cluster.close()
    cluster.remove_logs()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


@pytest.mark.slow
def test_an_instance_that_goes_silent_is_detected_without_a_hang() -> None:
    # Its link goes down: no FIN, no RST, just silence (a VM whose host died).
    # TCP keepalive (5 s idle, 3 probes 2 s apart) notices, the deputy retries
    # for its window and fails cleanly; the agent kills the orphaned session.
    from pyroute2 import NetNS

    with LocalCluster(1, reconnect_window=2.0) as cluster:
        inst = cluster.instances[0]
        marker = f"{time.time_ns() % 10**6 + 1000}.75"
        proc = subprocess.Popen(
            deputy(inst, "/bin/sh", "-c", f"exec sleep {marker}", window=2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not processes_with(f"sleep\0{marker}") and time.monotonic() < deadline:
            time.sleep(0.05)
        ns_name = cluster.netns_of(inst.name)
        assert ns_name is not None
        ns = NetNS(ns_name)
        try:
            ns.link("set", index=ns.link_lookup(ifname="eth0")[0], state="down")
        finally:
            ns.close()
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 255
        assert f"instance {inst.name} ({inst.address}) lost".encode() in err
        deadline = time.monotonic() + 60
        while processes_with(f"sleep\0{marker}") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_with(f"sleep\0{marker}") == []
        cluster.remove_logs()


def test_a_namespaced_instance_reopens_the_users_terminal() -> None:
    master, slave = os.openpty()
    try:
        with LocalCluster(1) as cluster:
            res = subprocess.run(
                deputy(cluster.instances[0], "/bin/sh", "-c", "test -t 1 && hostname"),
                stdout=slave,
                stderr=subprocess.PIPE,
                timeout=60,
            )
            assert res.returncode == 0, res.stderr
            out = os.read(master, 4096).replace(b"\r", b"")
            assert out == b"node0\n"
            cluster.remove_logs()
    finally:
        os.close(master)
        os.close(slave)


OWNER = """
import sys, time
from vmagent.cluster.local import LocalCluster
c = LocalCluster(2, isolate={isolate})
c.start()
print(c.tag, *[i.pid for i in c.instances], flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("isolate", [True, False])
def test_sigkill_of_the_owner_stops_its_agents_and_the_lab_is_swept(isolate: bool) -> None:
    from vmagent.cluster.local import sweep_dead_labs

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER.format(isolate=isolate)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert owner.stdout is not None
    tag, *pids = owner.stdout.readline().decode().split()
    agents = [int(p) for p in pids]
    assert len(agents) == 2 and all(Path(f"/proc/{p}").exists() for p in agents)
    logs = list(Path(tempfile.gettempdir()).glob(f"dcp-cluster-{tag}-*"))
    assert logs and (leftover_namespaces(tag) or not isolate)
    owner.kill()  # no teardown can run
    owner.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{p}").exists() for p in agents) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() for p in agents)  # the lifeline stopped them
    # The lab's reaper saw its owner go and removed the lab: nothing is left for
    # the next start to sweep.
    assert wait_for(lambda: not leftover_namespaces(tag) and not leftover_links(tag), 30)
    assert wait_for(lambda: not any(d.exists() for d in logs), 30)
    assert tag not in sweep_dead_labs()
