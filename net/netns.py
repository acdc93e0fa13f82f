"""A lab network for local instances: one bridge, one network namespace per instance.

Layout (all names carry a per-lab tag, so several labs and sessions coexist):

    host: bridge dcpb<tag>  10.213.N.1/24
            |-- veth dcpv<tag>i  <->  netns dcp-<tag>-<name>: eth0 10.213.N.(10+i)/24,
            |                                                 lo up, default via .1

The /24 is chosen among 10.213.0.0/16 so that it overlaps no address or route
already on the host.  Everything goes through netlink (pyroute2); nothing leaves
the bridge (no NAT, no forwarding is enabled).  `LabNetwork.destroy()` removes
what it created by name and tolerates pieces that are already gone, so it can
run after a partial `create()`.
"""

from __future__ import annotations

# pyroute2 forks (netns.create, NetNS).  A module that registers fork handlers
# while a fork is under way in this thread has its "after" handler run without
# its "before": concurrent.futures.thread (imported by asyncio's executor on a
# thread, e.g. the run's own OSS) then prints "release unlocked lock" into the
# user's stderr.  Importing it first makes that registration happen before any fork.
import concurrent.futures.thread  # noqa: F401
import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute, NetNS, netns

log = logging.getLogger(__name__)

LAB_SUPERNET = ipaddress.IPv4Network("10.213.0.0/16")
NETNS_DIR = "/run/netns"
# One marker per live lab, naming the process that owns it, so a lab whose
# owner died without tearing down (SIGKILL) can be found and removed later.
MARKER_DIR = "/run/dcp-labs"


class NetError(Exception):
    """A lab network operation failed."""


@dataclass(frozen=True, slots=True)
class Attachment:
    """One instance's place on the lab network."""

    name: str
    netns: str  # network namespace name (under /run/netns)
    address: str  # the instance's IPv4 address
    host_veth: str


def used_networks(ipr: IPRoute) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """IPv4 networks of the host's addresses and routes."""
    nets = []
    for msg in ipr.get_addr(family=2):
        addr = msg.get_attr("IFA_ADDRESS")
        if addr:
            nets.append(ipaddress.ip_network(f"{addr}/{msg['prefixlen']}", strict=False))
    for msg in ipr.get_routes(family=2):
        dst = msg.get_attr("RTA_DST")
        if dst:
            nets.append(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False))
    return nets


def choose_subnet(
    used: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network], seed: int
) -> ipaddress.IPv4Network:
    """A free /24 in the lab supernet, starting the search at `seed` (pure)."""
    subnets: list[ipaddress.IPv4Network] = list(LAB_SUPERNET.subnets(new_prefix=24))
    for i in range(len(subnets)):
        candidate = subnets[(seed + i) % len(subnets)]
        if not any(u.version == 4 and candidate.overlaps(u) for u in used):  # type: ignore[arg-type]
            return candidate
    raise NetError("no free /24 left in 10.213.0.0/16")


class LabNetwork:
    """Creates and destroys one lab's bridge, namespaces and veth pairs."""

    def __init__(self, tag: str) -> None:
        if not tag.isalnum() or len(tag) > 8:
            raise NetError(f"lab tag must be 1-8 alphanumerics, got {tag!r}")
        self.tag = tag
        self.bridge = f"dcpb{tag}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.attachments: list[Attachment] = []
        self._namespaces: list[str] = []

    @property
    def gateway(self) -> str:
        """The host's address on the lab bridge."""
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def create(self, names: list[str]) -> list[Attachment]:
        """Bridge + one namespace per name; returns where each instance lives."""
        os.makedirs(MARKER_DIR, exist_ok=True)
        with open(os.path.join(MARKER_DIR, self.tag), "w") as f:
            f.write(f"{os.getpid()} {_start_time(os.getpid())}\n")
        with IPRoute() as ipr:
            self.subnet = choose_subnet(used_networks(ipr), os.getpid() % 256)
            ipr.link("add", ifname=self.bridge, kind="bridge")
            br = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.addr("add", index=br, address=self.gateway, prefixlen=24)
            ipr.link("set", index=br, state="up")
            for i, name in enumerate(names):
                self.attachments.append(self._attach(ipr, br, i, name))
        log.info("lab network %s on %s with %d namespaces", self.bridge, self.subnet, len(names))
        return list(self.attachments)

    def _attach(self, ipr: IPRoute, br: int, i: int, name: str) -> Attachment:
        assert self.subnet is not None
        ns_name = f"dcp-{self.tag}-{name}"
        host_end, ns_end = f"dcpv{self.tag}{i}", f"dcpp{self.tag}{i}"
        address = str(self.subnet.network_address + 10 + i)
        netns.create(ns_name)
        self._namespaces.append(ns_name)
        ipr.link("add", ifname=host_end, kind="veth", peer=ns_end)
        ipr.link("set", index=ipr.link_lookup(ifname=host_end)[0], master=br, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname=ns_end)[0], net_ns_fd=ns_name)
        ns = NetNS(ns_name)
        try:
            idx = ns.link_lookup(ifname=ns_end)[0]
            ns.link("set", index=idx, ifname="eth0")
            ns.addr("add", index=idx, address=address, prefixlen=24)
            ns.link("set", index=idx, state="up")
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.route("add", dst="default", gateway=self.gateway)
        finally:
            ns.close()
        return Attachment(name, ns_name, address, host_end)

    def destroy(self) -> None:
        """Remove the bridge, veths and namespaces (each step tolerates absence)."""
        with IPRoute() as ipr:
            for ifname in [a.host_veth for a in self.attachments] + [self.bridge]:
                for idx in ipr.link_lookup(ifname=ifname):
                    try:
                        ipr.link("del", index=idx)
                    except Exception as exc:  # noqa: BLE001 - keep tearing down
                        log.warning("could not delete link %s: %s", ifname, exc)
        for ns_name in self._namespaces:
            if os.path.exists(os.path.join(NETNS_DIR, ns_name)):
                try:
                    netns.remove(ns_name)
                except Exception as exc:  # noqa: BLE001
                    log.warning("could not remove netns %s: %s", ns_name, exc)
        self.attachments.clear()
        self._namespaces.clear()
        destroy_by_tag(self.tag)  # whatever a partial create() left, and the marker


def _start_time(pid: int) -> int:
    """A process's start time in clock ticks (tells a pid apart from its reuse)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def owner_alive(marker: str) -> bool:
    """Whether the process named in a lab marker ("PID STARTTIME") still runs."""
    try:
        pid_s, start_s = marker.split()
        return _start_time(int(pid_s)) == int(start_s)
    except (OSError, ValueError):
        return False


def destroy_by_tag(tag: str) -> None:
    """Remove every link and namespace of lab `tag`, and its marker (by name only)."""
    with IPRoute() as ipr:
        for name in leftover_links(tag):
            for idx in ipr.link_lookup(ifname=name):
                try:
                    ipr.link("del", index=idx)
                except Exception as exc:  # noqa: BLE001 - keep tearing down
                    log.warning("could not delete link %s: %s", name, exc)
    for ns_name in leftover_namespaces(tag):
        try:
            netns.remove(ns_name)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not remove netns %s: %s", ns_name, exc)
    try:
        os.unlink(os.path.join(MARKER_DIR, tag))
    except FileNotFoundError:
        pass


def sweep_stale() -> list[str]:
    """Remove the labs whose owning process is gone; return their tags."""
    try:
        tags = os.listdir(MARKER_DIR)
    except FileNotFoundError:
        return []
    removed = []
    for tag in tags:
        try:
            with open(os.path.join(MARKER_DIR, tag)) as f:
                marker = f.read()
        except OSError:
            continue
        if tag.isalnum() and not owner_alive(marker):
            destroy_by_tag(tag)
            removed.append(tag)
    return removed


def leftover_links(tag: str) -> list[str]:
    """Links of a lab that still exist (for teardown checks)."""
    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return [n for n in names if n and (n == f"dcpb{tag}" or n.startswith(f"dcpv{tag}"))]


def leftover_namespaces(tag: str) -> list[str]:
    """Namespaces of a lab that still exist."""
    try:
        return [n for n in os.listdir(NETNS_DIR) if n.startswith(f"dcp-{tag}-")]
    except FileNotFoundError:
        return []
