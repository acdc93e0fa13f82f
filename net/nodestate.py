"""What a node holds for one program: the values the planner (`oss.network.plan`)
decides and the redirector (`net.redirector`) puts in place."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

TABLE_BASE = 7000  # routing table of the instance with slot s: TABLE_BASE + s
MAIN_TABLE = 254
LOCAL_TABLE = 255  # a pinned port delivered here (a rule's table only)
RULE_PREF = 100  # our policy rules
PIN_PREF = 90  # a moved connection's port: before the port blocks' rules


@dataclass(frozen=True, slots=True, order=True)
class Rule:
    """`ip rule add pref PREF to DST/32 [ipproto P] dport LO-HI lookup TABLE`."""

    dst: str
    ports: tuple[int, int]
    table: int
    proto: int = 0  # 0: any protocol with ports (tcp, udp, sctp)
    pref: int = RULE_PREF  # PIN_PREF: a moved connection's port, before the blocks


@dataclass(frozen=True, slots=True, order=True)
class Route:
    """`ip route replace DST/32 via VIA dev DEV [src SRC] table TABLE`, or with `kind`
    "unreachable": `ip route replace unreachable DST/32 table TABLE`."""

    table: int
    dst: str
    via: str
    dev: str
    src: str = ""
    kind: str = "unicast"


@dataclass(frozen=True, slots=True, order=True)
class Nat:
    """One nft NAT rule: hook `output`/`prerouting`/`postrouting`."""

    hook: str
    kind: str  # "dnat" | "snat"
    to: str
    daddr: str = ""  # CIDR to match ("" any)
    saddr: str = ""
    dport: int = 0
    iif: str = ""
    oif: str = ""
    proto: str = "tcp"  # the protocol `dport` is of: "tcp" | "udp"


@dataclass(frozen=True, slots=True)
class NodeState:
    """What one node holds for one program."""

    addresses: tuple[tuple[str, int, str], ...] = ()  # (ip, prefixlen, dev)
    rules: frozenset[Rule] = frozenset()
    routes: frozenset[Route] = frozenset()
    sysctls: tuple[tuple[str, str], ...] = ()  # ("net/ipv4/conf/eth0/accept_local", "1")
    default_src: tuple[str, str, str] | None = None  # (gateway, dev, src)
    local_pref: int | None = None  # move `lookup local` to this pref
    nat: tuple[Nat, ...] = ()
    rate_kbit: int = 0  # egress shaping on `shape_dev` (0: none)
    shape_dev: str = ""
    guard_dev: str = ""  # drop what arrives on it for 127.0.0.0/8 (route_localnet is on)

    @property
    def empty(self) -> bool:
        """Nothing to hold."""
        return self == NodeState()


NodeKey = tuple[str, str]  # ("instance", name) | ("host", name)


# -- the wire: a node state as JSON (the OSS's `network` command to an agent) ---------

MAX_ITEMS = 512  # rules, routes, NAT rules of one program on one node
_DEV = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_SYSCTL = re.compile(r"^net/ipv4/(conf/[A-Za-z0-9_.-]{1,15}/[a-z_]{1,32}|ip_local_port_range)$")
_HOOKS = ("output", "prerouting", "postrouting")


class BadNodeState(ValueError):
    """A node state on the wire is malformed or asks for more than a program's set-up."""


def to_wire(state: NodeState) -> dict[str, Any]:
    """`state` as a JSON object (`from_wire` reads it back)."""
    return dict(
        addresses=[list(a) for a in state.addresses],
        rules=[_rule_wire(r) for r in sorted(state.rules)],
        routes=[[r.table, r.dst, r.via, r.dev, r.src, r.kind] for r in sorted(state.routes)],
        sysctls=[list(s) for s in state.sysctls],
        default_src=list(state.default_src) if state.default_src else None,
        local_pref=state.local_pref,
        nat=[_nat_wire(n) for n in state.nat],
        rate_kbit=state.rate_kbit,
        shape_dev=state.shape_dev,
        guard_dev=state.guard_dev,
    )


def _rule_wire(r: Rule) -> list[Any]:
    """A rule as 5 items (what agents before pins read), 6 with a pin's preference."""
    out: list[Any] = [r.dst, r.ports[0], r.ports[1], r.table, r.proto]
    return out if r.pref == RULE_PREF else [*out, r.pref]


def _nat_wire(n: Nat) -> list[Any]:
    """A NAT rule as 8 items (what agents before UDP read), 9 for a UDP port."""
    out: list[Any] = [n.hook, n.kind, n.to, n.daddr, n.saddr, n.dport, n.iif, n.oif]
    return out if n.proto == "tcp" else [*out, n.proto]


def from_wire(data: object) -> NodeState:
    """The node state a JSON object describes; BadNodeState if it is not one a planner
    makes (addresses, tables, sysctls and devices are checked, lists bounded)."""
    try:
        return _from_wire(data)
    except BadNodeState:
        raise
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise BadNodeState(f"malformed node state: {exc}") from exc


def _from_wire(data: object) -> NodeState:
    if not isinstance(data, dict):
        raise BadNodeState("a node state is a JSON object")
    lists = ("addresses", "rules", "routes", "sysctls", "nat")
    for key in lists:
        if not isinstance(data.get(key, []), list) or len(data.get(key, [])) > MAX_ITEMS:
            raise BadNodeState(f"{key}: a list of at most {MAX_ITEMS}")
    addresses = tuple((_ip(a), _int(p, 0, 32), _dev(d)) for a, p, d in data.get("addresses", []))
    rules = frozenset(_rule(r) for r in data.get("rules", []))
    routes = frozenset(
        Route(_table(t), _ip(d), _ip(v) if v else "", _dev(dv) if dv else "", _ip(s) if s else "",
              _one(k, ("unicast", "unreachable")))
        for t, d, v, dv, s, k in data.get("routes", [])
    )  # fmt: skip
    sysctls = tuple((_sysctl(k), _value(v)) for k, v in data.get("sysctls", []))
    ds = data.get("default_src")
    default_src = (_ip(ds[0]), _dev(ds[1]), _ip(ds[2])) if ds else None
    lp = data.get("local_pref")
    nat = tuple(_nat(n) for n in data.get("nat", []))
    shape, guard = data.get("shape_dev", ""), data.get("guard_dev", "")
    return NodeState(
        addresses=addresses,
        rules=rules,
        routes=routes,
        sysctls=sysctls,
        default_src=default_src,
        local_pref=_int(lp, 1, 32765) if lp is not None else None,
        nat=nat,
        rate_kbit=_int(data.get("rate_kbit", 0), 0, 100_000_000),
        shape_dev=_dev(shape) if shape else "",
        guard_dev=_dev(guard) if guard else "",
    )


def _rule(r: list[Any]) -> Rule:
    """One policy rule from the wire (5 items, or 6 with its preference: older 5)."""
    d, lo, hi, t, p, *rest = r
    if len(rest) > 1:
        raise BadNodeState(f"a rule has 5 or 6 items, not {len(r)}")
    pref = _one(rest[0], (RULE_PREF, PIN_PREF)) if rest else RULE_PREF
    table = LOCAL_TABLE if t == LOCAL_TABLE and pref == PIN_PREF else _table(t)
    ports = (_int(lo, 1, 65535), _int(hi, 1, 65535))
    return Rule(_ip(d), ports, table, _int(p, 0, 255), int(pref))


def _nat(n: list[Any]) -> Nat:
    """One NAT rule from the wire (8 items, or 9 with its protocol: older agents' 8)."""
    h, k, to, da, sa, dp, i, o, *rest = n
    if len(rest) > 1:
        raise BadNodeState(f"a NAT rule has 8 or 9 items, not {len(n)}")
    return Nat(_one(h, _HOOKS), _one(k, ("dnat", "snat")), _ip(to), _cidr(da), _cidr(sa),
               _int(dp, 0, 65535), _dev(i) if i else "", _dev(o) if o else "",
               _one(rest[0], ("tcp", "udp")) if rest else "tcp")  # fmt: skip


def _ip(v: object) -> str:
    return str(ipaddress.IPv4Address(_str(v)))


def _cidr(v: object) -> str:
    return str(ipaddress.IPv4Network(_str(v), strict=False)) if v else ""


def _str(v: object) -> str:
    if not isinstance(v, str) or len(v) > 64:
        raise BadNodeState(f"not a short string: {str(v)[:40]!r}")
    return v


def _int(v: object, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadNodeState(f"not an integer in {lo}..{hi}: {str(v)[:40]!r}")
    return v


def _table(v: object) -> int:
    if v == MAIN_TABLE:
        return MAIN_TABLE
    return _int(v, TABLE_BASE, TABLE_BASE + 99)


def _dev(v: object) -> str:
    if not _DEV.match(_str(v)):
        raise BadNodeState(f"not a device name: {str(v)[:40]!r}")
    return str(v)


def _sysctl(v: object) -> str:
    if not _SYSCTL.match(_str(v)) or ".." in str(v):
        raise BadNodeState(f"not a network sysctl of a program's set-up: {str(v)[:60]!r}")
    return str(v)


def _value(v: object) -> str:
    if not re.fullmatch(r"[0-9]{1,5}(\t[0-9]{1,5})?", _str(v)):
        raise BadNodeState(f"not a sysctl value: {str(v)[:40]!r}")
    return str(v)


def _one(v: object, allowed: tuple[Any, ...]) -> Any:
    if isinstance(v, bool) or v not in allowed:
        raise BadNodeState(f"not one of {', '.join(map(str, allowed))}: {str(v)[:40]!r}")
    return v
