"""kill -9 of a real `dcp-oss serve` subprocess loses no acknowledged write."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oss import models as m
from oss.client import OssClient, Unreachable

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _cli(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "oss", *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip()


class Served:
    """A `dcp-oss serve` subprocess on an ephemeral loopback port."""

    def __init__(self, data: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "oss",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data",
                str(data),
                "--tick",
                "0.2",
                "--heartbeat-timeout",
                "30",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.kill()
            raise RuntimeError(f"dcp-oss did not start: {line!r}")
        self.url = line.split()[-1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Any]:
    procs: list[Served] = []

    def start() -> Served:
        s = Served(tmp_path / "data")
        procs.append(s)
        return s

    yield start
    for p in procs:
        p.kill()


def test_kill_9_loses_no_acknowledged_write(served: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    admin = _cli("account", "create", "--data", str(data), "--admin", "root")
    itok = _cli("instance-token", "--data", str(data), "vm1")
    first = served()
    acked_programs: list[str] = []
    acked_lines: dict[str, list[str]] = {}

    async def workload() -> list[m.BillingRecord]:
        async with OssClient(first.url, itok) as agent, OssClient(first.url, admin) as c:
            await agent.register(
                m.AgentRegister(
                    instance="vm1", address="127.0.0.1:1", hostname="vm1", cpus=256, memory_mb=1
                )
            )
            p0 = await c.submit(m.ProgramSubmit(argv=["seed"]))
            acked_programs.append(p0.id)
            # Wait for metering to write billing records, and read them (acknowledged).
            seen: list[m.BillingRecord] = []
            async with asyncio.timeout(30):
                while len(seen) < 3:
                    await asyncio.sleep(0.2)
                    seen = (await c.billing()).records

            async def submitter(k: int) -> None:
                for i in itertools.count():
                    p = await c.submit(m.ProgramSubmit(argv=["w", str(k), str(i)]))
                    acked_programs.append(p.id)

            async def logger(k: int) -> None:
                pid = p0.id
                for i in itertools.count():
                    text = f"line {k}-{i}"
                    await c.append_logs(pid, [m.LogLineIn(stream="stdout", text=text)])
                    acked_lines.setdefault(pid, []).append(text)

            tasks = [asyncio.create_task(f(k)) for k in range(4) for f in (submitter, logger)]
            await asyncio.sleep(1.5)
            first.kill()  # SIGKILL while writes are in flight
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, Unreachable) for r in results), results
            return seen

    billing_seen = asyncio.run(workload())
    n_lines = sum(map(len, acked_lines.values()))
    print(
        f"acknowledged before SIGKILL: {len(acked_programs)} submissions, {n_lines} log lines,"
        f" {len(billing_seen)} billing records"
    )
    assert len(acked_programs) > 10 and n_lines > 10

    second = served()

    async def verify() -> None:
        async with OssClient(second.url, admin) as c:
            have = {p.id for p in await c.programs(limit=10_000)}
            missing = [p for p in acked_programs if p not in have]
            assert not missing, f"{len(missing)} acknowledged submissions lost"
            for pid, texts in acked_lines.items():
                got = {ln.text for ln in (await c.logs(pid, "stdout")).lines}
                lost = [t for t in texts if t not in got]
                assert not lost, f"{len(lost)} acknowledged log lines lost"
            after = {r.id: r for r in (await c.billing()).records}
            for r in billing_seen:
                assert after.get(r.id) == r, f"billing record {r.id} lost or changed"

    asyncio.run(verify())
