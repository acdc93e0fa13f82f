"""Redirectors: a node's share of the programs' network, put in place with netlink.

A node is a network namespace (an instance's, or the host's: `None` is the
caller's own).  `Redirector.apply(node, program, state)` makes the node hold
`state` (an `net.nodestate.NodeState`) for `program`, changing only what
differs from what it applied before; `remove(node, program)` takes all of it
away.  What several programs share on a node (the moved `local` rule, the
sysctls it changed, the default route's source) is restored when the last
program leaves the node.

Addresses, routes, policy rules and the qdisc go through pyroute2 (netlink,
one socket per namespace, opened by a thread that entered it).  NAT is one
JSON nft transaction per program and node, run by libnftables in this
process (what `nft -j -f` runs): the table is replaced as a whole, so a
crash in the middle never leaves half a table.  pyroute2's nftables module
builds rules expression by expression with no atomic replace; the `nft`
command costs a fork (docs/NETWORK.md has the figures).

Blocking: callers on an event loop run these methods in a thread, under a
timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from net.nodestate import Nat, NodeKey, NodeState, Route, Rule

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
NFT_TIMEOUT = 10.0
RT_TABLE_LOCAL = 255
RTN_UNREACHABLE = 7
TCP_ESTABLISHED = "01"
_SAFE = re.compile(r"[^A-Za-z0-9_]")
T = TypeVar("T")


class RedirectError(Exception):
    """A redirector could not change a node's network."""


def nft_table(program: str) -> str:
    """The nft table that holds one program's NAT rules on a node."""
    return "dcp_" + _SAFE.sub("_", program)[:27]


def in_netns(ns: str | None, fn: Callable[[], T]) -> T:
    """`fn()` on a short-lived thread that entered namespace `ns` (None: here)."""
    if ns is None:
        return fn()
    result: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise RedirectError(f"setns {ns}: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    t = threading.Thread(target=body, name=f"netns-{ns}")  # setns holds for this thread only
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0]


def read_sysctl(ns: str | None, key: str) -> str:
    """/proc/sys/KEY as seen in namespace `ns`."""

    def read() -> str:
        with open(f"/proc/sys/{key}") as f:
            return f.read().strip()

    return in_netns(ns, read)


def swap_sysctls(ns: str | None, values: Mapping[str, str]) -> dict[str, str]:
    """Write /proc/sys/KEY = VALUE for each inside namespace `ns`; the values before."""

    def swap() -> dict[str, str]:
        before = {}
        for key, value in values.items():
            with open(f"/proc/sys/{key}", "r+") as f:
                before[key] = f.read().strip()
                f.seek(0)
                f.write(value)
        return before

    return in_netns(ns, swap)


def write_sysctls(ns: str | None, values: Mapping[str, str]) -> None:
    """Write /proc/sys/KEY = VALUE for each, inside namespace `ns`."""

    def write() -> None:
        for key, value in values.items():
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)

    in_netns(ns, write)


NFT_CTX_OUTPUT_JSON = 1 << 4  # libnftables: JSON output, and JSON input with it
_libnft: Any = None


def _nftables() -> Any:
    global _libnft  # one handle on the shared library per process (a cache, not state)
    if _libnft is None:
        try:
            lib = ctypes.CDLL("libnftables.so.1")
        except OSError as exc:
            raise RedirectError(f"libnftables is missing (apt package nftables): {exc}") from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        _libnft = lib
    return _libnft


def nft(ns: str | None, ruleset: dict[str, Any]) -> None:
    """Run one JSON nft transaction in namespace `ns` (libnftables, in this process).

    In process, not the `nft` command: the OSS of a `dcptrace --instances` run lives
    in the tracer's process, whose wait4(-1) would reap a child before
    subprocess could (and a fork costs ~4 ms a transaction).
    """
    lib = _nftables()
    data = json.dumps(ruleset).encode()

    def run() -> None:
        ctx = lib.nft_ctx_new(0)
        try:
            lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
            lib.nft_ctx_buffer_error(ctx)
            if lib.nft_run_cmd_from_buffer(ctx, data) != 0:
                err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
                raise RedirectError(f"nft: {err.strip().splitlines()[-1:] or 'failed'}")
        finally:
            lib.nft_ctx_free(ctx)

    in_netns(ns, run)


def nat_ruleset(program: str, rules: tuple[Nat, ...], guard: str = "") -> dict[str, Any]:
    """The JSON transaction that replaces `program`'s table by one holding `rules` (and a
    drop of what arrives on `guard` for 127.0.0.0/8)."""
    table = nft_table(program)
    ident = {"family": "ip", "table": table}
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": "ip", "name": table}}},
        {"delete": {"table": {"family": "ip", "name": table}}},
    ]
    if not rules and not guard:
        return {"nftables": cmds}
    cmds.append({"add": {"table": {"family": "ip", "name": table}}})
    if guard:
        cmds.append(
            {"add": {"chain": {**ident, "name": "guard", "type": "filter", "hook": "prerouting",
                               "prio": -300, "policy": "accept"}}}
        )  # fmt: skip
        match = [
            _match({"meta": {"key": "iifname"}}, guard),
            _match({"payload": {"protocol": "ip", "field": "daddr"}}, _prefix("127.0.0.0/8")),
            {"drop": None},
        ]
        cmds.append({"add": {"rule": {**ident, "chain": "guard", "expr": match}}})
    chains = {"output": ("out", -100), "prerouting": ("pre", -100), "postrouting": ("post", 100)}
    for hook, (name, prio) in chains.items():
        cmds.append(
            {"add": {"chain": {**ident, "name": name, "type": "nat", "hook": hook,
                               "prio": prio, "policy": "accept"}}}
        )  # fmt: skip
    for n in rules:
        cmds.append({"add": {"rule": {**ident, "chain": chains[n.hook][0], "expr": _expr(n)}}})
    return {"nftables": cmds}


def _match(left: dict[str, Any], right: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def _prefix(cidr: str) -> Any:
    addr, _, length = cidr.partition("/")
    return {"prefix": {"addr": addr, "len": int(length or 32)}}


def _expr(n: Nat) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if n.iif:
        out.append(_match({"meta": {"key": "iifname"}}, n.iif))
    if n.oif:
        out.append(_match({"meta": {"key": "oifname"}}, n.oif))
    if n.daddr:
        out.append(_match({"payload": {"protocol": "ip", "field": "daddr"}}, _prefix(n.daddr)))
    if n.saddr:
        out.append(_match({"payload": {"protocol": "ip", "field": "saddr"}}, _prefix(n.saddr)))
    if n.dport:
        out.append(_match({"payload": {"protocol": n.proto, "field": "dport"}}, n.dport))
    out.append({n.kind: {"addr": n.to}})
    return out


@dataclass
class _Node:
    ns: str | None
    programs: dict[str, NodeState] = field(default_factory=dict)
    saved_sysctls: dict[str, str] = field(default_factory=dict)
    local_moved: int | None = None
    default_before: tuple[str, str] | None = None  # (gateway, dev) of the route we changed


class Redirector:
    """Applies programs' node states to namespaces (not thread-safe: one caller at a time)."""

    def __init__(self, nodes: Mapping[NodeKey, str | None]) -> None:
        self._nodes = {key: _Node(ns) for key, ns in nodes.items()}

    def add_node(self, key: NodeKey, ns: str | None) -> None:
        """Make node `key` (namespace `ns`) known."""
        self._nodes.setdefault(key, _Node(ns))

    def knows(self, key: NodeKey) -> bool:
        """Whether node `key` is known."""
        return key in self._nodes

    def applied(self, key: NodeKey, program: str) -> NodeState:
        """What node `key` holds for `program` now."""
        node = self._nodes.get(key)
        return node.programs.get(program, NodeState()) if node else NodeState()

    def apply(self, key: NodeKey, program: str, state: NodeState) -> bool:
        """Make node `key` hold `state` for `program`; False if nothing changed."""
        node = self._nodes[key]
        old = node.programs.get(program, NodeState())
        if old == state:
            return False
        if state.empty:
            self.remove(key, program)
            return True
        try:
            with _ipr(node.ns) as ipr:
                self._shared_up(node, ipr, state)
                _addresses(ipr, old, state)
                _routes(ipr, old, state)
                _rules(ipr, old, state)
                if state.default_src and state.default_src != old.default_src:
                    gw, dev, src = state.default_src
                    node.default_before = node.default_before or (gw, dev)
                    _default(ipr, gw, dev, src)
                if state.rate_kbit != old.rate_kbit or state.shape_dev != old.shape_dev:
                    _shape(ipr, old.shape_dev, state.shape_dev, state.rate_kbit)
        except NetlinkError as exc:
            raise RedirectError(f"{key[0]} {key[1]}: {exc}") from exc
        if state.nat != old.nat or state.guard_dev != old.guard_dev:
            nft(node.ns, nat_ruleset(program, state.nat, state.guard_dev))
        node.programs[program] = state
        return True

    def _shared_up(self, node: _Node, ipr: IPRoute, state: NodeState) -> None:
        wanted = {k: v for k, v in state.sysctls if k not in node.saved_sysctls}
        if wanted:
            node.saved_sysctls.update(swap_sysctls(node.ns, wanted))
        if state.local_pref is not None and node.local_moved is None:
            _move_local(ipr, 0, state.local_pref)
            node.local_moved = state.local_pref

    def remove(self, key: NodeKey, program: str) -> None:
        """Take everything node `key` holds for `program` away (and the shared set-up
        with the last program)."""
        node = self._nodes.get(key)
        if node is None or program not in node.programs:
            return
        old = node.programs.pop(program)
        errors: list[str] = []
        if old.nat or old.guard_dev:
            with _collect(errors):
                nft(node.ns, nat_ruleset(program, ()))
        with _collect(errors), _ipr(node.ns) as ipr:
            with _collect(errors):
                _rules(ipr, old, NodeState())
            with _collect(errors):
                _routes(ipr, old, NodeState())
            if old.shape_dev:
                with _collect(errors):
                    _shape(ipr, old.shape_dev, "", 0)
            if not node.programs:
                if node.default_before is not None:
                    with _collect(errors):
                        _default(ipr, *node.default_before, "")
                    node.default_before = None
                if node.local_moved is not None:
                    with _collect(errors):
                        _move_local(ipr, node.local_moved, 0)
                    node.local_moved = None
            with _collect(errors):
                _addresses(ipr, old, NodeState())
        if not node.programs and node.saved_sysctls:
            with _collect(errors):
                write_sysctls(node.ns, node.saved_sysctls)
            node.saved_sysctls = {}
        if errors:
            raise RedirectError(f"{key[0]} {key[1]}: " + "; ".join(errors))

    def connections(self, key: NodeKey, address: str) -> list[int]:
        """Local ports of the established TCP connections from `address` in node `key`."""
        node = self._nodes.get(key)
        if node is None:
            return []
        want = socket.inet_aton(address)[::-1].hex().upper()

        def read() -> list[int]:
            ports = []
            # thread-self: this thread's namespace (`in_netns` entered it), not the process's
            with open("/proc/thread-self/net/tcp") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    host, _, port = cols[1].partition(":")
                    if host == want and cols[3] == TCP_ESTABLISHED:
                        ports.append(int(port, 16))
            return sorted(set(ports))

        return in_netns(node.ns, read)

    def remove_program(self, program: str) -> None:
        """Remove `program` from every node (keeps going past errors; raises the first)."""
        first: RedirectError | None = None
        for key in list(self._nodes):
            try:
                self.remove(key, program)
            except RedirectError as exc:
                first = first or exc
                log.warning("%s", exc)
        if first is not None:
            raise first

    def close(self) -> None:
        """Remove every program from every node."""
        programs = {p for node in self._nodes.values() for p in node.programs}
        for program in sorted(programs):
            with contextlib.suppress(RedirectError):
                self.remove_program(program)


@contextlib.contextmanager
def _collect(errors: list[str]) -> Iterator[None]:
    try:
        yield
    except (NetlinkError, RedirectError, OSError) as exc:
        errors.append(str(exc))


def _ipr(ns: str | None) -> IPRoute:
    """A netlink socket of namespace `ns`, made on a thread that entered it: pyroute2's own
    `netns=` forks a helper, which a tracer's wait4(-1) in this process may reap first."""
    if not ns:
        return IPRoute()
    sock = in_netns(ns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0))
    return IPRoute(use_socket=sock)


def _index(ipr: IPRoute, dev: str) -> int:
    found = ipr.link_lookup(ifname=dev)
    if not found:
        raise RedirectError(f"no device {dev}")
    return int(found[0])


def _addresses(ipr: IPRoute, old: NodeState, new: NodeState) -> None:
    for ip, plen, dev in set(new.addresses) - set(old.addresses):
        with _exists_ok():
            ipr.addr("add", index=_index(ipr, dev), address=ip, prefixlen=plen)
    for ip, plen, dev in set(old.addresses) - set(new.addresses):
        with _absent_ok():
            ipr.addr("del", index=_index(ipr, dev), address=ip, prefixlen=plen)


def _routes(ipr: IPRoute, old: NodeState, new: NodeState) -> None:
    gone = {(r.table, r.dst) for r in old.routes} - {(r.table, r.dst) for r in new.routes}
    for r in sorted(new.routes - old.routes):
        ipr.route("replace", **_route_args(ipr, r))
    for r in sorted(old.routes):
        if (r.table, r.dst) in gone:
            kind = {"type": "unreachable"} if r.kind == "unreachable" else {}
            with _absent_ok():
                ipr.route("del", dst=r.dst, dst_len=32, table=r.table, **kind)


def _route_args(ipr: IPRoute, r: Route) -> dict[str, Any]:
    if r.kind == "unreachable":
        return dict(dst=r.dst, dst_len=32, table=r.table, type="unreachable")
    args: dict[str, Any] = dict(
        dst=r.dst, dst_len=32, gateway=r.via, oif=_index(ipr, r.dev), table=r.table
    )
    if r.src:
        args["prefsrc"] = r.src
    return args


def _rule_args(r: Rule) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        priority=r.pref, dst=r.dst, dst_len=32, table=r.table,
        dport_range=f"{r.ports[0]}:{r.ports[1]}",
    )  # fmt: skip
    if r.proto:
        args["ip_proto"] = r.proto
    return args


def _rules(ipr: IPRoute, old: NodeState, new: NodeState) -> None:
    for r in sorted(new.rules - old.rules):
        with _exists_ok():
            ipr.rule("add", **_rule_args(r))
    for r in sorted(old.rules - new.rules):
        with _absent_ok():
            ipr.rule("del", **_rule_args(r))


def _move_local(ipr: IPRoute, src_pref: int, dst_pref: int) -> None:
    """Move the `lookup local` rule from pref `src_pref` to `dst_pref` (add, then delete)."""
    with _exists_ok():
        ipr.rule("add", priority=dst_pref, table=RT_TABLE_LOCAL)
    with _absent_ok():
        ipr.rule("del", priority=src_pref, table=RT_TABLE_LOCAL)


def _default(ipr: IPRoute, gateway: str, dev: str, src: str) -> None:
    args: dict[str, Any] = dict(dst="0.0.0.0", dst_len=0, gateway=gateway, oif=_index(ipr, dev))
    if src:
        args["prefsrc"] = src
    ipr.route("replace", **args)


def _shape(ipr: IPRoute, old_dev: str, dev: str, rate_kbit: int) -> None:
    """A token bucket on `dev`'s egress at `rate_kbit` (0: none; the old one goes)."""
    if old_dev and (old_dev != dev or not rate_kbit):
        with _absent_ok():
            ipr.tc("del", index=_index(ipr, old_dev), handle=0x10000, parent=0xFFFFFFFF)
    if dev and rate_kbit:
        burst = max(rate_kbit * 1000 // 8 // 100, 16_000)  # 10 ms of traffic, at least 16 KB
        ipr.tc(
            "replace", kind="tbf", index=_index(ipr, dev), handle=0x10000,
            rate=f"{rate_kbit}kbit", burst=burst, latency="50ms",
        )  # fmt: skip


@contextlib.contextmanager
def _exists_ok() -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        if exc.code != 17:  # EEXIST
            raise


@contextlib.contextmanager
def _absent_ok() -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        if exc.code not in (2, 3, 19, 99):  # ENOENT, ESRCH, ENODEV, EADDRNOTAVAIL
            raise


def sweep_prefix(ns: str | None, prefix: str) -> int:
    """Remove every policy rule and table route (TABLE_BASE..+99) whose destination is
    inside `prefix` in namespace `ns` (what a dead OSS left); how many went."""
    import ipaddress

    from net.nodestate import MAIN_TABLE, TABLE_BASE

    net = ipaddress.ip_network(prefix)
    gone = 0
    with _ipr(ns) as ipr:
        for rule in ipr.get_rules(family=2):
            dst = rule.get_attr("FRA_DST")
            if dst and ipaddress.ip_address(dst) in net:
                with _absent_ok():
                    ipr.rule("del", **_raw_rule(rule))
                    gone += 1
        for table in (MAIN_TABLE, *range(TABLE_BASE, TABLE_BASE + 100)):
            for route in ipr.get_routes(family=2, table=table):
                dst = route.get_attr("RTA_DST")
                if dst and ipaddress.ip_address(dst) in net:
                    kind = {"type": "unreachable"} if route["type"] == RTN_UNREACHABLE else {}
                    with _absent_ok():
                        ipr.route("del", dst=dst, dst_len=32, table=table, **kind)
                        gone += 1
    return gone


def _raw_rule(rule: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        priority=rule.get_attr("FRA_PRIORITY"), dst=rule.get_attr("FRA_DST"),
        dst_len=rule["dst_len"], table=rule.get_attr("FRA_TABLE"),
    )  # fmt: skip
    for attr, key in (("FRA_DPORT_RANGE", "dport_range"), ("FRA_IP_PROTO", "ip_proto")):
        value = rule.get_attr(attr)
        if value is not None:
            args[key] = value
    return args


# -- listing (tests and `dcp-oss network`): what a namespace holds -------------------


def listing(ns: str | None) -> dict[str, list[str]]:
    """Addresses, policy rules, routes of every table but `local`, nft tables, qdiscs
    and tc filters of namespace `ns`, one line each (for leftover checks)."""
    out: dict[str, list[str]] = {}
    ip = shutil.which("ip") or "/usr/sbin/ip"
    tc = shutil.which("tc") or "/usr/sbin/tc"
    base = ["nsenter", f"--net={os.path.join(NETNS_DIR, ns)}", "--"] if ns else []

    def run(argv: list[str]) -> list[str]:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return [line for line in done.stdout.splitlines() if line.strip()]

    out["addresses"] = run([*base, ip, "-o", "-4", "addr", "show"])
    out["rules"] = run([*base, ip, "-4", "rule", "show"])
    out["routes"] = [
        r for r in run([*base, ip, "-4", "route", "show", "table", "all"])
        if not r.startswith(("local ", "broadcast ")) and "table local" not in r
    ]  # fmt: skip
    out["nft"] = run([*base, shutil.which("nft") or "/usr/sbin/nft", "list", "tables"])
    links = run([*base, ip, "-o", "link", "show"])
    devs = [line.split(":")[1].strip().split("@")[0] for line in links]
    out["qdiscs"] = [q for d in devs for q in run([*base, tc, "qdisc", "show", "dev", d])]
    out["filters"] = [
        f for d in devs for kind in ("ingress", "egress")
        for f in run([*base, tc, "filter", "show", "dev", d, kind])
    ]  # fmt: skip
    return out
