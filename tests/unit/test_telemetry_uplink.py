"""Uplink batching, retries and bounds against a fake OSS (the real one: integration)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from vmagent.telemetry.uplink import ReportRejected, Uplink


class FakeOss:
    """Applies batches like the OSS: a seq at most once; fails while `down`."""

    def __init__(self) -> None:
        self.down = 0  # fail this many posts
        self.reject = False
        self.bodies: list[dict[str, Any]] = []
        self.applied: list[int] = []
        self.posted = asyncio.Event()

    async def post(self, raw: bytes) -> dict[str, Any]:
        body = json.loads(raw)
        self.bodies.append(body)
        self.posted.set()
        if self.reject:
            raise ReportRejected("422")
        if self.down:
            self.down -= 1
            raise OSError("connection refused")
        if not self.applied or body["seq"] > self.applied[-1]:
            self.applied.append(body["seq"])
        return {"acked_seq": self.applied[-1]}


def _row(pid: int, final: bool = False, cpu: int = 0) -> dict[str, Any]:
    return {"program_id": "p", "pid": pid, "started": 1.0, "final": final, "cpu_us": cpu}


async def _with(up: Uplink, coro: Any) -> Any:
    task = asyncio.create_task(up.run())
    try:
        return await coro
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_final_rows_go_at_once_and_samples_coalesce() -> None:
    async def go() -> None:
        oss = FakeOss()
        up = Uplink("vm1", oss.post, interval=3600)

        async def body() -> None:
            for cpu in range(5):
                up.usage(_row(1, cpu=cpu))  # samples of one process: only the newest waits
            assert up.waiting == 1 and oss.bodies == []
            up.usage(_row(1, final=True, cpu=9))
            await up.drain(5)
            assert [b["usage"] for b in oss.bodies] == [[_row(1, True, 9)]]
            up.usage(_row(1, cpu=10))  # a late sample after the final row: ignored
            assert up.waiting == 0

        await _with(up, body())

    asyncio.run(go())


def test_512_items_make_a_batch_without_waiting_for_the_interval() -> None:
    async def go() -> None:
        oss = FakeOss()
        up = Uplink("vm1", oss.post, interval=3600)

        async def body() -> None:
            for i in range(511):
                up.line("p", 5, "stdout", f"line {i}", 1.0)
            await asyncio.sleep(0.05)
            assert oss.bodies == []
            up.line("p", 5, "stdout", "line 511", 1.0)
            await asyncio.wait_for(oss.posted.wait(), 5)
            assert len(oss.bodies[0]["logs"]) == 512

        await _with(up, body())

    asyncio.run(go())


def test_a_failed_batch_is_retried_with_its_seq() -> None:
    async def go() -> None:
        oss = FakeOss()
        oss.down = 2
        up = Uplink("vm1", oss.post, interval=0.01)

        async def body() -> None:
            up.event({"program_id": "p", "pid": 5, "ts": 1.0, "kind": "exec"})
            assert await up.drain(10)
            seqs = [b["seq"] for b in oss.bodies]
            assert len(seqs) == 3 and len(set(seqs)) == 1 and oss.applied == seqs[:1]

        await _with(up, body())

    asyncio.run(go())


def test_memory_is_bounded_while_the_oss_is_away() -> None:
    async def go() -> None:
        oss = FakeOss()
        oss.down = 10**9
        up = Uplink("vm1", oss.post, interval=3600, max_held=10_000)
        for _ in range(1000):
            up.line("p", 5, "stderr", "x" * 100, 1.0)
        assert up.dropped > 900 and up.waiting < 100

    asyncio.run(go())


def test_a_refused_batch_is_dropped_and_counted() -> None:
    async def go() -> None:
        oss = FakeOss()
        oss.reject = True
        up = Uplink("vm1", oss.post, interval=0.01)

        async def body() -> None:
            up.line("p", 5, "stdout", "x", 1.0)
            assert await up.drain(5)
            assert up.dropped == 1 and len(oss.bodies) == 1

        await _with(up, body())

    asyncio.run(go())


def test_storage_walks_coalesce_per_program() -> None:
    async def go() -> None:
        oss = FakeOss()
        up = Uplink("vm1", oss.post, interval=3600)

        async def body() -> None:
            up.storage("p", 10)
            up.storage("p", 12)
            assert up.waiting == 1
            await up.drain(5)
            assert oss.bodies[0]["storage"] == [{"program_id": "p", "kb": 12}]

        await _with(up, body())

    asyncio.run(go())
