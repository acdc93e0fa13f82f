"""LocalCluster with namespaced instances (root): separate hosts on a lab network."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from net.netns import leftover_links, leftover_namespaces
from vmagent import tickets
from vmagent.cluster import Instance, LocalCluster
from vmagent.remote import deputy_argv, interpreter

pytestmark = [
    pytest.mark.root,
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaced instances need root"),
]


def deputy(inst: Instance, *argv: str, window: float | None = None) -> list[str]:
    args = deputy_argv(
        inst.address,
        inst.name,
        tickets.mint(inst.token, inst.name),
        os.fsencode(argv[0]),
        tuple(os.fsencode(a) for a in argv),
        window,
    )
    return [os.fsdecode(interpreter()), *(os.fsdecode(a) for a in args[1:])]


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
        deadline = time.monotonic() + 10
        while not processes_with(f"sleep\0{marker}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(f"sleep\0{marker}")
        cluster.kill(inst.name)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 255 and out == b""
        assert f"instance {inst.name} ({inst.address}) lost".encode() in err
        deadline = time.monotonic() + 10
        while processes_with(f"sleep\0{marker}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(f"sleep\0{marker}") == []
        # The other instance is unaffected.
        other = cluster.instances[0]
        assert subprocess.run(deputy(other, "/bin/true")).returncode == 0
        cluster.remove_logs()
