"""Issue 13 on VMs: the node state's wire form, the spot book, the `network` command
queue and `dcp-oss serve --network-prefix` (pure parts, and the option's checks)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from net.nodestate import BadNodeState, NodeState, from_wire, to_wire
from oss.compute.commands import CommandQueue
from oss.network.plan import HostSpot, InstanceSpot, Listener, ProgramNet, plan
from oss.network.vms import SpotBook

ROOT = Path(__file__).resolve().parents[2]


def _states() -> dict[tuple[str, str], NodeState]:
    net = ProgramNet(
        "p1", "10.5.0.2", ("a", "b"),
        (Listener("a", 8000), Listener("b", 9000, "loopback"), Listener("b", 53, proto=17)),
    )  # fmt: skip
    spots = {
        "a": InstanceSpot("a", "10.1.0.2", "10.1.0.1", "h", 0),
        "b": InstanceSpot("b", "10.1.0.3", "10.1.0.1", "h", 1),
    }
    return plan(net, spots, {"h": HostSpot("h", "br0")}, rate_kbit=4000)


def test_every_planned_state_survives_the_wire() -> None:
    for key, state in _states().items():
        assert from_wire(json.loads(json.dumps(to_wire(state)))) == state, key
    assert from_wire(to_wire(NodeState())).empty


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda w: w.update(sysctls=[["kernel/core_pattern", "|/x"]]), "sysctl"),
        (lambda w: w.update(sysctls=[["net/ipv4/conf/../../kernel/x", "1"]]), "sysctl"),
        (lambda w: w["routes"].append([254, "10.5.0.9", "", "", "", "blackhole"]), "not one of"),
        (lambda w: w["rules"].append(["10.5.0.2", 1, 2, 255, 0]), "integer"),
        (lambda w: w.update(addresses=[["10.5.0.2", 32, "eth0; rm"]]), "device"),
        (lambda w: w.update(rules=[["10.5.0.2", 1, 2, 7000, 6]] * 600), "at most"),
        (lambda w: w.update(nat=[["input", "dnat", "1.2.3.4", "", "", 0, "", ""]]), "not one of"),
        (
            lambda w: w.update(nat=[["output", "dnat", "1.2.3.4", "", "", 5, "", "", "sctp"]]),
            "not one of",
        ),
        (
            lambda w: w.update(nat=[["output", "dnat", "1.2.3.4", "", "", 5, "", "", "udp", 1]]),
            "8 or 9",
        ),
    ],
)
def test_a_state_no_planner_makes_is_refused(change: object, why: str) -> None:
    wire = to_wire(_states()[("instance", "a")])
    change(wire)  # type: ignore[operator]
    with pytest.raises(BadNodeState, match=why):
        from_wire(wire)


def test_an_older_agents_nat_rule_of_8_items_is_tcp() -> None:
    wire = to_wire(_states()[("instance", "a")])
    assert sorted(len(n) for n in wire["nat"]) == [8, 8, 9]  # only the UDP one says so
    wire["nat"] = [n[:8] for n in wire["nat"]]
    assert {n.proto for n in from_wire(wire).nat} == {"tcp"}


def test_a_pinned_port_and_an_older_agents_rule_of_5_items() -> None:
    wire = to_wire(_states()[("instance", "a")])
    wire["rules"].append(["10.5.0.2", 33000, 33000, 255, 6, 90])  # a pin delivered here
    state = from_wire(wire)
    assert any(r.table == 255 and r.pref == 90 for r in state.rules)
    wire["rules"] = [r[:5] for r in wire["rules"] if r[3] != 255]
    assert {r.pref for r in from_wire(wire).rules} == {100}


def test_not_an_object_is_refused() -> None:
    for bad in (None, [], "x", {"addresses": "x"}, {"addresses": [["1.2.3.4"]]}):
        with pytest.raises(BadNodeState):
            from_wire(bad)


def test_spot_book_places_instances_on_its_bridge_with_free_slots() -> None:
    book = SpotBook(HostSpot("host", "br0"), ipaddress.IPv4Network("10.7.0.0/24"), "10.7.0.1")
    assert book.place("vm1", "10.7.0.10") == InstanceSpot("vm1", "10.7.0.10", "10.7.0.1", "host", 0)
    assert book.place("vm2", "10.7.0.11") is not None and book["vm2"].slot == 1
    assert book.place("out", "10.8.0.5") is None  # not on this bridge
    assert book.place("gw", "10.7.0.1") is None and book.place("bad", "nope") is None
    assert book.place("vm1", "10.7.0.10") == book["vm1"]  # registering again keeps its slot
    book.forget("vm1")
    assert book.place("vm3", "10.7.0.12") is not None and book["vm3"].slot == 0
    assert set(book) == {"vm2", "vm3"} and len(book) == 2


def test_spot_book_refuses_past_its_slots() -> None:
    book = SpotBook(HostSpot("host", "br0"), ipaddress.IPv4Network("10.7.0.0/24"), "10.7.0.1",
                    ports_per_instance=14116)  # fmt: skip
    assert book.place("a", "10.7.0.2") is not None and book.place("b", "10.7.0.3") is not None
    assert book.place("c", "10.7.0.4") is None


def test_a_newer_network_command_replaces_the_pending_one() -> None:
    q = CommandQueue()
    first = q.network("vm1", "p1", {"addresses": []})
    other = q.network("vm1", "p2", {"addresses": []})
    newest = q.network("vm1", "p1", {"rate_kbit": 5})
    got = q.for_instance("vm1", [])
    assert [c.id for c in got] == [other.id, newest.id] and first.id not in [c.id for c in got]
    assert got[1].state == {"rate_kbit": 5} and got[1].action == "network"
    assert q.for_instance("vm2", []) == []
    assert q.for_instance("vm1", [other.id, newest.id]) == []


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--network-prefix", "10.9.0.0/33"], "not an IPv4 prefix"),
        (["--network-prefix", "10.9.0.0/31", "--network-bridge", "lo"], "no program address"),
        (["--network-prefix", "8.8.8.0/24", "--network-bridge", "lo"], "not a private range"),
        (["--network-prefix", "10.9.0.0/24"], "needs --network-bridge"),
        (["--network-prefix", "10.9.0.0/24", "--network-bridge", "nosuchdev0"], "no such device"),
        (["--network-prefix", "127.0.0.0/24", "--network-bridge", "lo"], "overlaps"),
        (["--network-bridge", "br0"], "need --network-prefix"),
    ],
)
def test_network_prefix_option_is_checked(args: list[str], why: str, tmp_path: Path) -> None:
    """`dcp-oss serve --network-prefix` refuses what cannot work, in one line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-m", "oss.cli", "serve", "--data", str(tmp_path / "d"), *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert res.returncode == 2, (args, res.stderr)
    assert why in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)


def test_lab_network_prefix_is_checked(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-m", "oss.cli", "lab", "--config", str(tmp_path / "lab.toml"),
         "--data", str(tmp_path / "d"), "--network-prefix", "8.8.8.0/24"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert res.returncode == 2 and "not a private range" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
