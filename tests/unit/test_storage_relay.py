"""The OSS's relay of a program's storage to its instances (issue 14, `--oss`)."""

from __future__ import annotations

import asyncio

import pytest

from oss.compute.commands import CommandQueue
from oss.storage.relay import StorageNotMounted, StorageRelay

SPEC = {"name": "run-1", "server": "10.0.0.1:2222", "key": "k" * 43, "host_key": "ssh-ed25519 A"}


async def _answer(relay: StorageRelay, instance: str, ok: bool, error: str = "") -> dict:
    """Play the agent: wait for its order, then report the outcome."""
    while True:
        cmds = relay.commands.for_instance(instance, [])
        if cmds:
            cmd = cmds[-1]
            assert relay.outcome("someone-else", cmd.id, True, "") is False
            assert relay.outcome(instance, cmd.id, ok, error) is True
            return {"action": cmd.action, "storage": dict(cmd.storage or {})}
        await asyncio.sleep(0)


def test_a_mount_is_ordered_once_per_instance_and_carries_the_spec() -> None:
    async def go() -> None:
        relay = StorageRelay(CommandQueue())
        await relay.put("p1", SPEC)
        seen = asyncio.ensure_future(_answer(relay, "vm1", True))
        await relay.mount("p1", "vm1")
        assert (await seen) == {"action": "mount", "storage": SPEC}
        await relay.mount("p1", "vm1")  # mounted already: no second order
        assert relay.commands.for_instance("vm1", []) == []
        assert relay.mounted["p1"] == {"vm1"}
        gone = asyncio.ensure_future(_answer(relay, "vm1", True))
        assert await relay.unmount_all("p1") == {}
        # An unmount needs no key.
        assert (await gone) == {"action": "unmount", "storage": {"name": "run-1"}}
        assert "p1" not in relay.specs

    asyncio.run(go())


def test_a_failed_mount_says_why_and_a_program_without_storage_is_refused() -> None:
    async def go() -> None:
        relay = StorageRelay(CommandQueue())
        with pytest.raises(StorageNotMounted, match="declared no storage"):
            await relay.mount("p1", "vm1")
        await relay.put("p1", SPEC)
        seen = asyncio.ensure_future(_answer(relay, "vm1", False, "dcpfs did not mount"))
        with pytest.raises(StorageNotMounted, match="vm1: dcpfs did not mount"):
            await relay.mount("p1", "vm1")
        await seen
        assert relay.mounted["p1"] == set()

    asyncio.run(go())


def test_a_failed_instance_ends_the_wait_for_its_order() -> None:
    async def go() -> None:
        relay = StorageRelay(CommandQueue())
        await relay.put("p1", SPEC)
        waiting = asyncio.ensure_future(relay.mount("p1", "vm2"))
        while not relay.commands.for_instance("vm2", []):
            await asyncio.sleep(0)
        await relay.forget_instance("vm2")
        with pytest.raises(StorageNotMounted, match="vm2: the instance failed"):
            await waiting

    asyncio.run(go())


class FakeSpecs:
    """`SpecStore` in a dict (what outlives one relay: a restarted OSS's store)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[dict, set[str]]] = {}

    async def put(self, program: str, spec: dict) -> None:
        self.rows[program] = (dict(spec), self.rows.get(program, ({}, set()))[1])

    async def load(self, program: str) -> tuple[dict, set[str]] | None:
        row = self.rows.get(program)
        return (dict(row[0]), set(row[1])) if row else None

    async def mounted(self, program: str, instance: str) -> None:
        self.rows[program][1].add(instance)

    async def forget(self, program: str) -> None:
        self.rows.pop(program, None)

    async def forget_instance(self, instance: str) -> None:
        for _spec, instances in self.rows.values():
            instances.discard(instance)


def test_a_restarted_relay_reads_back_the_spec_and_the_mounts() -> None:
    async def go() -> None:
        saved = FakeSpecs()
        first = StorageRelay(CommandQueue(), saved)
        await first.put("p1", SPEC)
        seen = asyncio.ensure_future(_answer(first, "vm1", True))
        await first.mount("p1", "vm1")
        await seen
        again = StorageRelay(CommandQueue(), saved)  # the OSS restarted: memory is empty
        assert await again.mounts("p1") == {"vm1"}
        assert await again.mounts("p2") is None
        seen = asyncio.ensure_future(_answer(again, "vm2", True))
        await again.mount("p1", "vm2")
        assert (await seen)["storage"] == SPEC
        both = [asyncio.ensure_future(_answer(again, i, True)) for i in ("vm1", "vm2")]
        assert await again.unmount_all("p1") == {}
        assert [(await b)["action"] for b in both] == ["unmount", "unmount"]
        assert saved.rows == {}

    asyncio.run(go())


def test_mount_soon_mounts_once_in_the_background_and_the_end_waits_for_it() -> None:
    async def go() -> None:
        relay = StorageRelay(CommandQueue())
        await relay.put("p1", SPEC)
        said: list[str] = []

        async def say(line: str) -> None:
            said.append(line)

        relay.mount_soon("p1", "vm1", say)
        relay.mount_soon("p1", "vm1", say)  # under way: not a second order
        await asyncio.sleep(0)
        assert len(relay.commands.for_instance("vm1", [])) == 1
        # The run ends while the mount is under way: the unmount waits, then reaches it.
        ending = asyncio.ensure_future(relay.unmount_all("p1"))
        assert (await _answer(relay, "vm1", True))["action"] == "mount"
        while not [c for c in relay.commands.for_instance("vm1", []) if c.action == "unmount"]:
            await asyncio.sleep(0)
        assert (await _answer(relay, "vm1", True))["action"] == "unmount"
        assert await ending == {}
        assert said == ["storage mounted on vm1 (for execs placed from instances)"]
        relay.mount_soon("p2", "vm1", say)  # a program with no storage: one line, no order
        await asyncio.sleep(0.01)
        assert said[-1] == (
            "storage not mounted on vm1 (for execs placed from instances):"
            " program p2 declared no storage"
        )
        assert relay.commands.for_instance("vm1", []) == []

    asyncio.run(go())
