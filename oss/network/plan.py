"""What each node's network must hold for one program (pure: no netlink, no SQL).

One program has one address P.  Every instance where it has a process holds
P (a /32 on its uplink, so `bind`, `getsockname` and `hostname -I` show it)
and sends with P as source; every host steers (P, port) to an instance with
policy rules and routes.  Several instances share P, so the 4-tuples of
their connections must stay apart on the wire: each instance owns a block of
ephemeral ports (`port_block`: its `ip_local_port_range`), and replies to
P:port in instance j's block are routed to j like a listener's port is.

Per node (`plan` returns a `NodeState` per `NodeKey`):

instance i (holds P)
  - address P/32 on its device; default route with `src P`;
  - sysctls: `accept_local` (packets from P, its own address, arrive from
    other instances), `rp_filter` 0, `route_localnet` (loopback redirect),
    `ip_local_port_range` = its block; with `route_localnet` on, anything that
    arrives from the wire for 127.0.0.0/8 is dropped (`guard_dev`, before NAT:
    what kube-proxy's CVE-2020-8558 taught);
  - the `local` policy rule moved after ours (pref `LOCAL_PREF`), so a rule can
    send P:port away although P is local;
  - for every other member j: table `table_of(j)` holds `P via <j or i's
    gateway> src P`; a rule sends P:<j's block> there, and P:port of every
    listener on j;
  - nft (table `dcp_<program>`): 127.0.0.0/8:port of a listener on j is DNAT'ed
    to P (then routed by the rule above) and SNAT'ed to P on the way out; a
    listener of i bound to loopback gets P:port from the wire DNAT'ed to
    127.0.0.1.
host h (no P)
  - forwarding on its bridge and wire devices;
  - per member j: `P via <j if on h, else the peer host on the wire>` in
    `table_of(j)`; rules for j's block and j's listeners bound to any
    address or P (not those bound to loopback: they are the program's own);
  - `unreachable P` in its main table: what no rule steers fails here.

Listeners are TCP or UDP (rules and NAT match the protocol).  A moved
connection's port (`Pin`) gets a rule at `PIN_PREF`, before the blocks': to
its instance everywhere, `lookup local` on that instance.  With a `HomeSpot`
(local runs), a listener of `HOME` is routed by the instances to the home's
host (`HOME_TABLE`, via their gateway), which DNATs P:port to its own address.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from net.nodestate import (
    LOCAL_TABLE,
    MAIN_TABLE,
    PIN_PREF,
    RULE_PREF,
    TABLE_BASE,
    Nat,
    NodeKey,
    NodeState,
    Route,
    Rule,
)

__all__ = ["MAIN_TABLE", "RULE_PREF", "TABLE_BASE", "Nat", "NodeKey", "NodeState", "Route", "Rule"]

PORT_BASE = 32768  # the first port of the first instance's ephemeral block
PORT_TOP = 60999  # Linux's default ephemeral range ends here
LOCAL_PREF = 200  # where the `lookup local` rule moves on an instance holding P
TCP, UDP = 6, 17
PROTO_NAMES = {TCP: "tcp", UDP: "udp"}  # what nft matches a port of
BOUND = ("any", "loopback", "program", "other")  # what a listener is bound to


HOME = "home"  # the listeners' instance name of the program's processes at home
HOME_TABLE = TABLE_BASE + 99  # instances route P:port of a home listener by this table


class PlanError(ValueError):
    """The network of a program cannot be planned."""


@dataclass(frozen=True, slots=True)
class InstanceSpot:
    """Where an instance sits: its address, device, gateway and host."""

    name: str
    address: str  # its own address (on its host's bridge)
    gateway: str  # its host's address on that bridge
    host: str
    slot: int  # its ephemeral port block and routing table
    dev: str = "eth0"


@dataclass(frozen=True, slots=True)
class HostSpot:
    """A host: the bridge its instances hang on, its wire to other hosts."""

    name: str
    bridge: str
    wire_dev: str = ""  # the device towards other hosts ("" for a single host)
    peers: Mapping[str, str] = field(default_factory=dict)  # host -> its address on the wire
    uplinks: tuple[str, ...] = ()  # more devices outside traffic arrives on (forwarding)


@dataclass(frozen=True, slots=True)
class HomeSpot:
    """Where the program's home is: on host `host`, reached from its instances at
    `address` (the host's address on their bridge)."""

    host: str
    address: str


@dataclass(frozen=True, slots=True)
class Listener:
    """A listening socket of the program: on `instance`, `port`, bound to `bound`."""

    instance: str
    port: int
    bound: str = "any"
    proto: int = TCP
    pid: int = 0


@dataclass(frozen=True, slots=True)
class Pin:
    """A connection's local port `port` of P that now lives on `instance` (its process
    moved there): the port's packets go there, not to the block it was taken from."""

    instance: str
    port: int
    proto: int = TCP


@dataclass(frozen=True, slots=True)
class ProgramNet:
    """One program's address, the instances it runs on, its listeners and pinned ports."""

    program: str
    address: str
    members: tuple[str, ...]
    listeners: tuple[Listener, ...] = ()
    pinned: tuple[Pin, ...] = ()


def port_block(slot: int, size: int) -> tuple[int, int]:
    """The ephemeral ports of the instance with `slot` (PlanError past the range)."""
    lo = PORT_BASE + slot * size
    hi = lo + size - 1
    if slot < 0 or size < 16 or hi > PORT_TOP:
        raise PlanError(f"no ephemeral port block {slot} of {size} ports below {PORT_TOP}")
    return lo, hi


def max_slots(size: int) -> int:
    """How many instances get a block of `size` ports."""
    return (PORT_TOP - PORT_BASE + 1) // size


def table_of(spot: InstanceSpot) -> int:
    """The routing table that leads to `spot`."""
    return TABLE_BASE + spot.slot


def bound_class(address: str, program_address: str) -> str:
    """What a listener's local address is, as one of BOUND."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "other"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return "any"
    if ip.is_loopback:
        return "loopback" if ip.version == 4 else "other"
    if str(ip) == program_address:
        return "program"
    return "other"


def plan(
    net: ProgramNet,
    spots: Mapping[str, InstanceSpot],
    hosts: Mapping[str, HostSpot],
    *,
    ports_per_instance: int = 1024,
    rate_kbit: int = 0,
    home: HomeSpot | None = None,
) -> dict[NodeKey, NodeState]:
    """Every node's state for `net` (hosts with no member included: they may be entered).

    With `home`, listeners of instance HOME (servers that run at home, bound to any
    address or P) are reached at P:port too: the instances route the port to the
    home's host (`HOME_TABLE`), which DNATs P:port to its own address there.
    """
    members = [spots[m] for m in net.members if m in spots]
    p = net.address
    missing = [m for m in net.members if m not in spots]
    if missing:
        raise PlanError(f"instances with no known place: {', '.join(missing)}")
    for s in members:
        if s.host not in hosts:
            raise PlanError(f"instance {s.name} is on unknown host {s.host}")
    # The first listener of a port wins (a second one is refused when it reports).
    owner: dict[tuple[int, int], Listener] = {}
    for lst in net.listeners:
        at_home = lst.instance == HOME and home is not None and lst.bound in ("any", "program")
        if lst.instance in net.members or at_home:
            owner.setdefault((lst.proto, lst.port), lst)
    out: dict[NodeKey, NodeState] = {}
    share = rate_kbit // len(members) if rate_kbit and members else 0
    for me in members:
        out[("instance", me.name)] = _instance(net, me, members, owner, ports_per_instance, share)
    for host in hosts.values():
        out[("host", host.name)] = _host(net, host, members, owner, hosts, ports_per_instance)
    if home is not None and any(x.instance == HOME for x in owner.values()):
        key = ("host", home.host)
        state = out.get(key, NodeState())
        dnat = tuple(
            Nat("prerouting", "dnat", home.address, daddr=f"{p}/32", dport=x.port,
                proto=PROTO_NAMES[x.proto])
            for x in owner.values() if x.instance == HOME and x.proto in PROTO_NAMES
        )  # fmt: skip
        out[key] = dataclasses.replace(state, nat=state.nat + dnat)
    return out


def _instance(
    net: ProgramNet,
    me: InstanceSpot,
    members: list[InstanceSpot],
    owner: Mapping[tuple[int, int], Listener],
    size: int,
    rate_kbit: int,
) -> NodeState:
    p, dev = net.address, me.dev
    lo, hi = port_block(me.slot, size)
    rules: set[Rule] = set()
    routes: set[Route] = set()
    by_name = {s.name: s for s in members}
    for other in members:
        if other.name == me.name:
            continue
        via = other.address if other.host == me.host else me.gateway
        routes.add(Route(table_of(other), p, via, dev, p))
        rules.add(Rule(p, port_block(other.slot, size), table_of(other)))
    nat: list[Nat] = []
    for (proto, port), lst in sorted(owner.items()):
        name = PROTO_NAMES.get(proto)
        if lst.instance == me.name:
            if lst.bound == "loopback" and name:
                nat.append(Nat("prerouting", "dnat", "127.0.0.1", daddr=f"{p}/32", dport=port,
                               iif=dev, proto=name))  # fmt: skip
            continue
        if lst.instance == HOME:  # a server at home: through the gateway, DNAT'ed there
            routes.add(Route(HOME_TABLE, p, me.gateway, dev, p))
            rules.add(Rule(p, (port, port), HOME_TABLE, proto))
        else:
            rules.add(Rule(p, (port, port), table_of(by_name[lst.instance]), proto))
        if name and lst.bound in ("any", "loopback"):
            nat.append(Nat("output", "dnat", p, daddr="127.0.0.0/8", dport=port, proto=name))
    for pin in net.pinned:
        if pin.instance == me.name:  # here, although the port is in another's block
            rules.add(Rule(p, (pin.port, pin.port), LOCAL_TABLE, pin.proto, PIN_PREF))
        elif pin.instance in by_name:
            there = by_name[pin.instance]
            rules.add(Rule(p, (pin.port, pin.port), table_of(there), pin.proto, PIN_PREF))
    if any(n.hook == "output" for n in nat):
        nat.append(Nat("postrouting", "snat", p, saddr="127.0.0.0/8", oif=dev))
    conf = f"net/ipv4/conf/{dev}"
    sysctls = (
        ("net/ipv4/conf/all/accept_local", "1"),
        (f"{conf}/accept_local", "1"),
        ("net/ipv4/conf/all/rp_filter", "0"),
        (f"{conf}/rp_filter", "0"),
        (f"{conf}/route_localnet", "1"),
        ("net/ipv4/ip_local_port_range", f"{lo}\t{hi}"),
    )
    return NodeState(
        addresses=((p, 32, dev),),
        rules=frozenset(rules),
        routes=frozenset(routes),
        sysctls=sysctls,
        default_src=(me.gateway, dev, p),
        local_pref=LOCAL_PREF,
        nat=tuple(nat),
        rate_kbit=rate_kbit,
        shape_dev=dev if rate_kbit else "",
        guard_dev=dev,
    )


def _host(
    net: ProgramNet,
    host: HostSpot,
    members: list[InstanceSpot],
    owner: Mapping[tuple[int, int], Listener],
    hosts: Mapping[str, HostSpot],
    size: int,
) -> NodeState:
    p = net.address
    rules: set[Rule] = set()
    routes: set[Route] = set()
    by_name = {s.name: s for s in members}
    for s in members:
        if s.host == host.name:
            routes.add(Route(table_of(s), p, s.address, host.bridge))
        elif s.host in host.peers and host.wire_dev:
            routes.add(Route(table_of(s), p, host.peers[s.host], host.wire_dev))
        else:
            continue  # no way there from this host
        rules.add(Rule(p, port_block(s.slot, size), table_of(s)))
    reachable = {r.table for r in routes}
    for (proto, port), lst in sorted(owner.items()):
        if lst.instance not in by_name:
            continue  # at home: the home's host DNATs it (`plan`)
        t = table_of(by_name[lst.instance])
        if t in reachable and lst.bound in ("any", "program"):
            rules.add(Rule(p, (port, port), t, proto))
    for pin in net.pinned:
        if pin.instance in by_name and table_of(by_name[pin.instance]) in reachable:
            t = table_of(by_name[pin.instance])
            rules.add(Rule(p, (pin.port, pin.port), t, pin.proto, PIN_PREF))
    if not routes:
        return NodeState()
    # Whatever no rule steers (a port nobody listens on) ends here, never on the default
    # route: the program address means nothing beyond these hosts.
    routes.add(Route(MAIN_TABLE, p, "", "", kind="unreachable"))
    devs = [host.bridge, *([host.wire_dev] if host.wire_dev else []), *host.uplinks]
    sysctls = tuple((f"net/ipv4/conf/{d}/forwarding", "1") for d in devs)
    # A client on the bridge itself (VMs' host side) is routed back out of the bridge:
    # an ICMP redirect would send its later packets to P straight to one instance,
    # whatever the port.
    sysctls += ((f"net/ipv4/conf/{host.bridge}/send_redirects", "0"),
                ("net/ipv4/conf/all/send_redirects", "0"))  # fmt: skip
    return NodeState(rules=frozenset(rules), routes=frozenset(routes), sysctls=sysctls)


def moved(net: ProgramNet, pid: int, source: str, target: str) -> ProgramNet:
    """`net` after process `pid` moved from `source` to `target`: its listeners follow.

    Listeners of `pid` on `source` move; when none is `pid`'s (a listener of
    a child of the migrated tree), every listener on `source` moves, as the
    migration moves a whole session.  `target` becomes a member.
    """
    mine = [x for x in net.listeners if x.instance == source and x.pid == pid]
    moving = mine or [x for x in net.listeners if x.instance == source]
    listeners = tuple(
        Listener(target, x.port, x.bound, x.proto, x.pid) if x in moving else x
        for x in net.listeners
    )
    members = net.members if target in net.members else (*net.members, target)
    return ProgramNet(net.program, net.address, members, listeners, net.pinned)


def pins(net: ProgramNet, target: str, ports: list[int], size: int, slot: int) -> ProgramNet:
    """`net` with the connections' local `ports` found on `target` (slot `slot`) after a
    migration pinned there: those outside its own block came with the moved process
    (listeners' ports excepted).  Earlier pins of the same ports are replaced."""
    lo, hi = port_block(slot, size)
    listened = {x.port for x in net.listeners if x.proto == TCP}
    moved_in = {q for q in ports if not lo <= q <= hi and q not in listened}
    kept = tuple(x for x in net.pinned if x.port not in moved_in)
    return dataclasses.replace(net, pinned=kept + tuple(Pin(target, q) for q in sorted(moved_in)))
