"""The networking manager over a real SQLite store and a fake applier."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest

from oss.db.store import Store
from oss.network.manager import NetworkConfig, NetworkManager
from oss.network.plan import HostSpot, InstanceSpot, NodeKey, NodeState
from oss.network.store import PoolExhausted, PortTaken
from oss.schema import VERSIONS


class FakeApplier:
    """Records what each node holds per program (the Applier protocol)."""

    def __init__(self) -> None:
        self.held: dict[tuple[NodeKey, str], NodeState] = {}

    def knows(self, key: NodeKey) -> bool:
        return True

    def apply(self, key: NodeKey, program: str, state: NodeState) -> bool:
        if self.held.get((key, program)) == state:
            return False
        self.held[(key, program)] = state
        return True

    def remove_program(self, program: str) -> None:
        self.held = {k: v for k, v in self.held.items() if k[1] != program}

    def close(self) -> None:
        self.held.clear()


SPOTS = {n: InstanceSpot(n, f"10.213.1.{10 + i}", "10.213.1.1", "h", i) for i, n in
         enumerate(("a", "b"))}  # fmt: skip


def _manager(tmp: Path, prefix: str = "10.214.7.0/29") -> tuple[NetworkManager, FakeApplier]:
    config = NetworkConfig(ipaddress.IPv4Network(prefix), SPOTS, {"h": HostSpot("h", "br0")})
    fake = FakeApplier()
    return NetworkManager(Store(tmp / "oss", VERSIONS), config, fake), fake


def test_addresses_are_durable_unique_and_released(tmp_path: Path) -> None:
    async def main() -> None:
        m, fake = _manager(tmp_path)
        await m.store.open()
        a = await m.join("p1", "a")
        assert a == "10.214.7.2" and await m.join("p1", "b") == a
        assert await m.join("p2", "a") == "10.214.7.3"
        assert await m.join("p3", "zz") is None  # not an instance of ours
        assert fake.held[(("instance", "a"), "p1")].addresses == ((a, 32, "eth0"),)
        await m.release("p1")
        assert not any(k[1] == "p1" for k in fake.held)
        assert await m.join("p4", "a") == "10.214.7.2"  # freed, given again
        for p in ("p5", "p6", "p7"):
            await m.join(p, "a")
        with pytest.raises(PoolExhausted):
            await m.join("p8", "a")
        await m.store.close()
        # Durable: a new manager over the same store puts it all back.
        m2, fake2 = _manager(tmp_path)
        await m2.store.open()
        await m2.start()
        assert (("instance", "a"), "p2") in fake2.held
        assert await m2.address_of("p2") == "10.214.7.3"
        await m2.store.close()

    asyncio.run(main())


def test_listeners_steer_and_conflict(tmp_path: Path) -> None:
    async def main() -> None:
        m, fake = _manager(tmp_path)
        await m.store.open()
        await m.join("p", "a")
        await m.listen("p", "b", 10, 8080, "0.0.0.0")
        a_rules = fake.held[(("instance", "a"), "p")].rules
        assert any(r.ports == (8080, 8080) for r in a_rules)
        with pytest.raises(PortTaken):
            await m.listen("p", "a", 11, 8080, "0.0.0.0")
        await m.listen("p", "b", 12, 8080, "0.0.0.0")  # the same instance again: fine
        await m.unlisten("p", "b", 8080)
        assert not any(r.ports == (8080, 8080) for r in fake.held[(("instance", "a"), "p")].rules)
        shown = await m.show("p")
        assert shown is not None and shown["listeners"] == [] and shown["instances"] == ["a", "b"]
        await m.store.close()

    asyncio.run(main())


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="holds no program address"):
        NetworkConfig(ipaddress.IPv4Network("10.214.0.0/31"))
    spots = {"x": InstanceSpot("x", "1.1.1.1", "1.1.1.2", "h", 40)}
    with pytest.raises(ValueError, match="at most 27"):
        NetworkConfig(ipaddress.IPv4Network("10.214.0.0/24"), spots)


class ReadingApplier(FakeApplier):
    """A fake that also reads a node's connections (`ConnectionReader`)."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__()
        self.ports = ports

    def connections(self, key: NodeKey, address: str) -> list[int]:
        return self.ports if key == ("instance", "b") else []


def test_a_moved_connections_port_is_pinned_kept_after_a_restart_and_forgotten_at_the_end(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        config = NetworkConfig(
            ipaddress.IPv4Network("10.214.7.0/29"), SPOTS, {"h": HostSpot("h", "br0")}
        )
        fake = ReadingApplier([32800, 33900])  # a's block, b's own block
        m = NetworkManager(Store(tmp_path / "oss", VERSIONS), config, fake)
        await m.store.open()
        await m.join("p1", "a")
        await m.moved("p1", 7, "a", "b")
        host = fake.held[(("host", "h"), "p1")]
        pinned = {r.ports for r in host.rules if r.pref == 90}
        assert pinned == {(32800, 32800)}
        await m.listen("p1", "b", 7, 8080, "0.0.0.0")  # a later change keeps the pin
        host = fake.held[(("host", "h"), "p1")]
        assert {r.ports for r in host.rules if r.pref == 90} == {(32800, 32800)}
        # A restarted OSS (a new manager on the same store) puts the pin back too.
        await m.store.close()
        again = ReadingApplier([])
        m = NetworkManager(Store(tmp_path / "oss", VERSIONS), config, again)
        await m.store.open()
        await m.start()
        host = again.held[(("host", "h"), "p1")]
        assert {r.ports for r in host.rules if r.pref == 90} == {(32800, 32800)}
        fake = again
        await m.release("p1")
        await m.join("p1", "a")
        host = fake.held[(("host", "h"), "p1")]
        assert not any(r.pref == 90 for r in host.rules)
        await m.store.close()

    asyncio.run(main())
