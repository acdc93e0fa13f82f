"""What a node holds for one program: the values the planner (`oss.network.plan`)
decides and the redirector (`net.redirector`) puts in place."""

from __future__ import annotations

from dataclasses import dataclass

TABLE_BASE = 7000  # routing table of the instance with slot s: TABLE_BASE + s
MAIN_TABLE = 254


@dataclass(frozen=True, slots=True, order=True)
class Rule:
    """`ip rule add pref RULE_PREF to DST/32 [ipproto P] dport LO-HI lookup TABLE`."""

    dst: str
    ports: tuple[int, int]
    table: int
    proto: int = 0  # 0: any protocol with ports (tcp, udp, sctp)


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
