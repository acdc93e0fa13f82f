"""The network planner (oss.network.plan): pure decisions, no netlink."""

from __future__ import annotations

import pytest

from net.nodestate import LOCAL_TABLE
from oss.network.plan import (
    HOME,
    HOME_TABLE,
    LOCAL_PREF,
    PIN_PREF,
    TABLE_BASE,
    TCP,
    UDP,
    HomeSpot,
    HostSpot,
    InstanceSpot,
    Listener,
    Nat,
    NodeState,
    Pin,
    PlanError,
    ProgramNet,
    Route,
    Rule,
    bound_class,
    moved,
    pins,
    plan,
    port_block,
)

P = "10.214.0.2"
SPOTS = {
    "a": InstanceSpot("a", "10.213.1.10", "10.213.1.1", "h1", 0),
    "b": InstanceSpot("b", "10.213.1.11", "10.213.1.1", "h1", 1),
    "c": InstanceSpot("c", "10.213.2.10", "10.213.2.1", "h2", 2),
}
HOSTS = {
    "h1": HostSpot("h1", "br0", "wire0", {"h2": "10.99.0.2"}),
    "h2": HostSpot("h2", "br0", "wire0", {"h1": "10.99.0.1"}),
}


def test_port_blocks_are_disjoint_and_bounded() -> None:
    blocks = [port_block(s, 1024) for s in range(27)]
    assert all(hi + 1 == blocks[i + 1][0] for i, (_lo, hi) in enumerate(blocks[:-1]))
    assert blocks[0] == (32768, 33791) and blocks[-1][1] <= 60999
    with pytest.raises(PlanError):
        port_block(27, 1024)


def test_bound_class() -> None:
    assert bound_class("0.0.0.0", P) == "any" and bound_class("::", P) == "any"
    assert bound_class("127.0.0.1", P) == "loopback"
    assert bound_class("::ffff:127.0.0.1", P) == "loopback"
    assert bound_class(P, P) == "program" and bound_class("::1", P) == "other"
    assert bound_class("10.213.1.10", P) == "other" and bound_class("junk", P) == "other"


def test_instance_holds_the_address_and_routes_other_blocks_and_listeners() -> None:
    net = ProgramNet("p", P, ("a", "b", "c"), (Listener("b", 8000),))
    a = plan(net, SPOTS, HOSTS)[("instance", "a")]
    assert a.addresses == ((P, 32, "eth0"),)
    assert a.default_src == ("10.213.1.1", "eth0", P) and a.local_pref == LOCAL_PREF
    assert ("net/ipv4/ip_local_port_range", "32768\t33791") in a.sysctls
    assert a.routes == {
        Route(TABLE_BASE + 1, P, "10.213.1.11", "eth0", P),  # b: same host, direct
        Route(TABLE_BASE + 2, P, "10.213.1.1", "eth0", P),  # c: other host, via gateway
    }
    assert Rule(P, (8000, 8000), TABLE_BASE + 1, TCP) in a.rules
    assert Rule(P, port_block(2, 1024), TABLE_BASE + 2) in a.rules
    assert Nat("output", "dnat", P, daddr="127.0.0.0/8", dport=8000) in a.nat
    assert Nat("postrouting", "snat", P, saddr="127.0.0.0/8", oif="eth0") in a.nat
    b = plan(net, SPOTS, HOSTS)[("instance", "b")]
    assert not any(r.ports == (8000, 8000) for r in b.rules) and not b.nat  # it listens here


def test_hosts_steer_to_their_instances_or_over_the_wire() -> None:
    net = ProgramNet("p", P, ("a", "c"), (Listener("c", 443),))
    states = plan(net, SPOTS, HOSTS)
    h1, h2 = states[("host", "h1")], states[("host", "h2")]
    assert Route(TABLE_BASE + 2, P, "10.99.0.2", "wire0") in h1.routes
    assert Route(TABLE_BASE + 2, P, "10.213.2.10", "br0") in h2.routes
    assert Rule(P, (443, 443), TABLE_BASE + 2, TCP) in h1.rules
    assert ("net/ipv4/conf/br0/forwarding", "1") in h1.sysctls
    assert not h1.addresses and h1.default_src is None


def test_loopback_listener_is_reached_through_dnat_and_not_from_outside() -> None:
    net = ProgramNet("p", P, ("a", "b"), (Listener("b", 5432, "loopback"),))
    states = plan(net, SPOTS, HOSTS)
    b = states[("instance", "b")]
    assert b.nat == (Nat("prerouting", "dnat", "127.0.0.1", f"{P}/32", dport=5432, iif="eth0"),)
    assert not any(r.ports == (5432, 5432) for r in states[("host", "h1")].rules)
    assert any(r.ports == (5432, 5432) for r in states[("instance", "a")].rules)


def test_udp_listeners_are_steered_by_protocol_and_port() -> None:
    net = ProgramNet(
        "p", P, ("a", "b"), (Listener("b", 53, proto=UDP), Listener("b", 5353, "loopback", UDP))
    )
    states = plan(net, SPOTS, HOSTS)
    a, b, h1 = states[("instance", "a")], states[("instance", "b")], states[("host", "h1")]
    assert {
        Rule(P, (53, 53), TABLE_BASE + 1, UDP),
        Rule(P, (5353, 5353), TABLE_BASE + 1, UDP),
    } <= a.rules
    assert Nat("output", "dnat", P, daddr="127.0.0.0/8", dport=53, proto="udp") in a.nat
    assert Nat("output", "dnat", P, daddr="127.0.0.0/8", dport=5353, proto="udp") in a.nat
    assert b.nat == (
        Nat("prerouting", "dnat", "127.0.0.1", f"{P}/32", dport=5353, iif="eth0", proto="udp"),
    )
    assert Rule(P, (53, 53), TABLE_BASE + 1, UDP) in h1.rules  # from outside: bound to any
    assert not any(r.ports == (5353, 5353) for r in h1.rules)  # loopback: the program's own


def test_a_tcp_and_a_udp_listener_share_a_port_number() -> None:
    net = ProgramNet("p", P, ("a", "b"), (Listener("a", 53), Listener("b", 53, proto=UDP)))
    c = plan(ProgramNet("p", P, ("a", "b", "c"), net.listeners), SPOTS, HOSTS)[("instance", "c")]
    assert {
        Rule(P, (53, 53), TABLE_BASE + 0, TCP),
        Rule(P, (53, 53), TABLE_BASE + 1, UDP),
    } <= c.rules


def test_a_moved_connections_port_is_pinned_to_its_new_instance() -> None:
    net = ProgramNet("p", P, ("a", "b", "c"), (Listener("a", 8000),))
    # b restored a connection from a's block (33000) and holds its own (34000) and a
    # listener's port: only 33000 came with the move.
    pinned = pins(net, "b", [33000, 34000, 8000], 1024, SPOTS["b"].slot)
    assert pinned.pinned == (Pin("b", 33000),)
    states = plan(pinned, SPOTS, HOSTS)
    a, b, h1 = states[("instance", "a")], states[("instance", "b")], states[("host", "h1")]
    assert Rule(P, (33000, 33000), LOCAL_TABLE, TCP, PIN_PREF) in b.rules  # delivered here
    assert Rule(P, (33000, 33000), TABLE_BASE + 1, TCP, PIN_PREF) in a.rules
    assert Rule(P, (33000, 33000), TABLE_BASE + 1, TCP, PIN_PREF) in h1.rules
    assert Rule(P, port_block(0, 1024), TABLE_BASE + 0) in h1.rules  # the block stays a's
    again = pins(pinned, "c", [33000], 1024, SPOTS["c"].slot)  # it moved on to c
    assert again.pinned == (Pin("c", 33000),)
    assert moved(again, 1, "a", "b").pinned == again.pinned


def test_a_server_at_home_is_steered_through_the_gateway_and_dnat() -> None:
    net = ProgramNet("p", P, ("a",), (Listener(HOME, 8010), Listener(HOME, 8011, "loopback")))
    states = plan(net, SPOTS, HOSTS, home=HomeSpot("h1", "10.213.1.1"))
    a, h1 = states[("instance", "a")], states[("host", "h1")]
    assert Route(HOME_TABLE, P, "10.213.1.1", "eth0", P) in a.routes
    assert Rule(P, (8010, 8010), HOME_TABLE, TCP) in a.rules
    assert Nat("output", "dnat", P, daddr="127.0.0.0/8", dport=8010) in a.nat
    assert h1.nat == (Nat("prerouting", "dnat", "10.213.1.1", f"{P}/32", dport=8010),)
    assert not any(r.ports[0] == 8011 for r in a.rules)  # loopback-bound: home's own
    assert not any(r.table == HOME_TABLE for r in plan(net, SPOTS, HOSTS)[("instance", "a")].rules)


def test_first_listener_of_a_port_wins() -> None:
    net = ProgramNet("p", P, ("a", "b"), (Listener("a", 80), Listener("b", 80)))
    b = plan(net, SPOTS, HOSTS)[("instance", "b")]
    assert Rule(P, (80, 80), TABLE_BASE + 0, TCP) in b.rules


def test_bandwidth_cap_is_shared_by_the_instances() -> None:
    net = ProgramNet("p", P, ("a", "b"))
    a = plan(net, SPOTS, HOSTS, rate_kbit=10_000)[("instance", "a")]
    assert a.rate_kbit == 5_000 and a.shape_dev == "eth0"


def test_unknown_instance_or_host_is_an_error() -> None:
    with pytest.raises(PlanError, match="no known place"):
        plan(ProgramNet("p", P, ("zz",)), SPOTS, HOSTS)
    with pytest.raises(PlanError, match="unknown host"):
        plan(ProgramNet("p", P, ("a",)), SPOTS, {})


def test_moved_moves_the_pids_listeners_or_all_of_the_source() -> None:
    net = ProgramNet("p", P, ("a", "b"), (Listener("a", 80, pid=7), Listener("a", 81, pid=8)))
    one = moved(net, 7, "a", "c")
    assert [(x.instance, x.port) for x in one.listeners] == [("c", 80), ("a", 81)]
    assert one.members == ("a", "b", "c")
    every = moved(net, 99, "a", "b")
    assert {x.instance for x in every.listeners} == {"b"} and every.members == ("a", "b")


def test_no_members_no_host_state() -> None:
    assert plan(ProgramNet("p", P, ()), SPOTS, HOSTS)[("host", "h1")] == NodeState()


def test_hosts_end_unsteered_traffic_and_instances_guard_loopback() -> None:
    states = plan(ProgramNet("p", P, ("a",)), SPOTS, HOSTS)
    assert Route(254, P, "", "", kind="unreachable") in states[("host", "h1")].routes
    assert states[("instance", "a")].guard_dev == "eth0"
    from net.redirector import nat_ruleset

    cmds = nat_ruleset("p", (), "eth0")["nftables"]
    guard = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    assert guard and guard[0]["chain"] == "guard" and {"drop": None} in guard[0]["expr"]
