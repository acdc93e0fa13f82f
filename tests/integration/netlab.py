"""Simulated hosts for network tests: namespaces, bridges, a wire, an outside.

    outside ns  --uplink veth-- host ns h1 (bridge, 10.213.(200+k).1/24) -- instance ns ...
                                     |
                                   wire veth (10.99.0.1/30 <-> .2)
                                     |
                                 host ns h2 (bridge ...) -- instance ns ...

Everything is created under a tag and removed by `close()` (also after a failed
build).  Only addresses inside these namespaces are used.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from dataclasses import dataclass, field

from pyroute2 import IPRoute, NetNS, netns

from oss.network.plan import HostSpot, InstanceSpot

OUTSIDE_NET = "10.99.1"  # outside <-> h1 uplink: .1 on h1, .2 outside
WIRE_NET = "10.99.0"  # h1 .1 <-> h2 .2


@dataclass
class SimHost:
    """One simulated host: a namespace with a bridge and instance namespaces."""

    name: str
    ns: str
    bridge: str
    subnet: str  # "10.213.201"
    instances: dict[str, str] = field(default_factory=dict)  # instance -> its ns

    @property
    def gateway(self) -> str:
        """The host's address on its bridge."""
        return f"{self.subnet}.1"


class NetLab:
    """Hosts, instances, a wire between hosts and an outside namespace (root only)."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.hosts: dict[str, SimHost] = {}
        self.spots: dict[str, InstanceSpot] = {}
        self.outside = f"dcpo{self.tag}"
        self._namespaces: list[str] = []

    def _ns(self, name: str) -> str:
        netns.create(name)
        self._namespaces.append(name)
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        return name

    def _veth(self, a_ns: str, a_name: str, b_ns: str, b_name: str) -> None:
        tmp_a, tmp_b = f"t{self.tag}{a_name}"[:15], f"u{self.tag}{b_name}"[:15]
        with IPRoute() as ipr:
            ipr.link("add", ifname=tmp_a, kind="veth", peer=tmp_b)
            ipr.link("set", index=ipr.link_lookup(ifname=tmp_a)[0], net_ns_fd=a_ns)
            ipr.link("set", index=ipr.link_lookup(ifname=tmp_b)[0], net_ns_fd=b_ns)
        for ns_name, tmp, name in ((a_ns, tmp_a, a_name), (b_ns, tmp_b, b_name)):
            with NetNS(ns_name) as ns:
                idx = ns.link_lookup(ifname=tmp)[0]
                ns.link("set", index=idx, ifname=name)

    @staticmethod
    def _addr(ns_name: str, dev: str, address: str, plen: int) -> None:
        with NetNS(ns_name) as ns:
            idx = ns.link_lookup(ifname=dev)[0]
            ns.addr("add", index=idx, address=address, prefixlen=plen)
            ns.link("set", index=idx, state="up")

    def add_host(self, name: str, instances: list[str]) -> SimHost:
        """A host namespace with a bridge and one namespace per instance on it."""
        k = len(self.hosts)
        host = SimHost(name, self._ns(f"dcph{self.tag}{name}"), "br0", f"10.213.{201 + k}")
        with NetNS(host.ns) as ns:
            ns.link("add", ifname="br0", kind="bridge")
            idx = ns.link_lookup(ifname="br0")[0]
            ns.addr("add", index=idx, address=host.gateway, prefixlen=24)
            ns.link("set", index=idx, state="up")
        for i, inst in enumerate(instances):
            ins = self._ns(f"dcpi{self.tag}{inst}")
            self._veth(host.ns, f"v{inst}", ins, "eth0")
            with NetNS(host.ns) as ns:
                idx = ns.link_lookup(ifname=f"v{inst}")[0]
                ns.link("set", index=idx, master=ns.link_lookup(ifname="br0")[0], state="up")
            address = f"{host.subnet}.{10 + i}"
            self._addr(ins, "eth0", address, 24)
            with NetNS(ins) as ns:
                ns.route("add", dst="default", gateway=host.gateway)
            host.instances[inst] = ins
            self.spots[inst] = InstanceSpot(inst, address, host.gateway, name, len(self.spots))
        self.hosts[name] = host
        return host

    def add_bare_host(self, name: str) -> SimHost:
        """A host namespace with nothing in it (a dcptrace run there makes its own lab)."""
        host = SimHost(name, self._ns(f"dcph{self.tag}{name}"), "", "")
        self.hosts[name] = host
        return host

    def add_outside(self, via: str) -> None:
        """An outside namespace on an uplink of host `via` (10.99.1.2, routes to 10.214/16)."""
        host = self.hosts[via]
        self._ns(self.outside)
        self._veth(host.ns, "up0", self.outside, "eth0")
        self._addr(host.ns, "up0", f"{OUTSIDE_NET}.1", 24)
        self._addr(self.outside, "eth0", f"{OUTSIDE_NET}.2", 24)
        with NetNS(self.outside) as ns:
            ns.route("add", dst="10.214.0.0", dst_len=16, gateway=f"{OUTSIDE_NET}.1")
        self.sysctl(host.ns, "net/ipv4/conf/up0/forwarding", "1")
        for other in self.hosts.values():  # the other hosts reach the outside over the wire
            if other.name != via and self._wired:
                with NetNS(other.ns) as ns:
                    ns.route("add", dst=f"{OUTSIDE_NET}.0", dst_len=24, gateway=f"{WIRE_NET}.1")

    _wired = False

    def wire(self, a: str, b: str) -> None:
        """A veth 'wire' between hosts a (10.99.0.1) and b (10.99.0.2)."""
        ha, hb = self.hosts[a], self.hosts[b]
        self._veth(ha.ns, "wire0", hb.ns, "wire0")
        self._addr(ha.ns, "wire0", f"{WIRE_NET}.1", 30)
        self._addr(hb.ns, "wire0", f"{WIRE_NET}.2", 30)
        self._wired = True

    def host_spots(self) -> dict[str, HostSpot]:
        """The hosts as the planner sees them."""
        names = list(self.hosts)
        out = {}
        for i, h in enumerate(self.hosts.values()):
            peers = {}
            if self._wired and len(names) == 2:
                peers = {names[1 - i]: f"{WIRE_NET}.{2 - i}"}
            uplinks = ("up0",) if i == 0 and self.outside in self._namespaces else ()
            out[h.name] = HostSpot(h.name, h.bridge, "wire0" if self._wired else "", peers, uplinks)
        return out

    def nodes(self) -> dict[tuple[str, str], str | None]:
        """Node key -> namespace, for a Redirector."""
        out: dict[tuple[str, str], str | None] = {}
        for h in self.hosts.values():
            out[("host", h.name)] = h.ns
            for inst, ns in h.instances.items():
                out[("instance", inst)] = ns
        return out

    def ns_of(self, instance: str) -> str:
        """The namespace of an instance."""
        for h in self.hosts.values():
            if instance in h.instances:
                return h.instances[instance]
        raise KeyError(instance)

    @staticmethod
    def sysctl(ns: str, key: str, value: str) -> None:
        """Set a sysctl inside namespace `ns`."""
        subprocess.run(
            [
                "nsenter",
                f"--net=/run/netns/{ns}",
                "--",
                "sh",
                "-c",
                f"echo {value} > /proc/sys/{key}",
            ],
            check=True,
        )

    def close(self) -> None:
        """Remove every namespace (their links go with them)."""
        for name in reversed(self._namespaces):
            with contextlib.suppress(OSError, FileNotFoundError):
                if os.path.exists(f"/run/netns/{name}"):
                    netns.remove(name)
        self._namespaces.clear()

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
