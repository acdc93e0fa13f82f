"""The program network when instances are VMs (`dcp-oss serve --network-prefix`).

The host (the machine whose bridge the VMs hang on: the OSS's own, or a
namespace of it) is changed in place by a `net.redirector.Redirector`; an
instance is a separate kernel the OSS cannot reach with netlink, so its node
state travels to its agent as a `network` command in the heartbeat reply
(`oss.compute.commands`), which the agent applies
(`vmagent.network.orders`).  The agent authenticates that channel with its
instance token; nothing new listens, and a command names one instance only.

Which instances are where is learned as they register: `SpotBook` places an
instance whose address lies on the host's bridge subnet, with the lowest
free slot (its routing table and ephemeral port block).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from net.nodestate import NodeKey, NodeState, to_wire
from oss.network.plan import HostSpot, InstanceSpot, max_slots

log = logging.getLogger(__name__)

Send = Callable[[str, str, dict[str, Any]], None]  # (instance, program, wire state)


class SpotBook(Mapping[str, InstanceSpot]):
    """Instances on one host's bridge, placed as they register (thread-safe reads)."""

    def __init__(self, host: HostSpot, subnet: ipaddress.IPv4Network, gateway: str,
                 ports_per_instance: int = 1024) -> None:  # fmt: skip
        self.host = host
        self.subnet = subnet
        self.gateway = gateway
        self.slots = max_slots(ports_per_instance)
        self._spots: dict[str, InstanceSpot] = {}

    def place(self, name: str, address: str) -> InstanceSpot | None:
        """Place instance `name` registered at `address` (None: not on this bridge, or
        every slot is taken).  An instance keeps its slot while it is known."""
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return None
        if ip not in self.subnet or str(ip) == self.gateway:
            return None
        old = self._spots.get(name)
        if old is not None and old.address == str(ip):
            return old
        taken = {s.slot for n, s in self._spots.items() if n != name}
        free = [i for i in range(self.slots) if i not in taken]
        if old is not None and old.slot in free:
            free.insert(0, old.slot)
        if not free:
            log.warning("network: no slot left for instance %s (%d taken)", name, len(taken))
            return None
        spot = InstanceSpot(name, str(ip), self.gateway, self.host.name, free[0])
        self._spots = {**self._spots, name: spot}  # readers on other threads see a whole dict
        return spot

    def forget(self, name: str) -> None:
        """Instance `name` is gone: its slot is free."""
        if name in self._spots:
            self._spots = {n: s for n, s in self._spots.items() if n != name}

    def __getitem__(self, name: str) -> InstanceSpot:
        return self._spots[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._spots)

    def __len__(self) -> int:
        return len(self._spots)


class VmApplier:
    """The `Applier` for VMs: the host here, each instance through its agent."""

    def __init__(self, host: str, host_ns: str | None, spots: Mapping[str, InstanceSpot],
                 send: Send) -> None:  # fmt: skip
        from net.redirector import Redirector

        self.host_key: NodeKey = ("host", host)
        self.redirector = Redirector({self.host_key: host_ns})
        self.spots = spots
        self.send = send
        self._sent: dict[str, dict[str, NodeState]] = {}  # program -> instance -> state
        self._lock = threading.Lock()

    def knows(self, key: NodeKey) -> bool:
        """The host, and every instance placed on its bridge."""
        return key == self.host_key or (key[0] == "instance" and key[1] in self.spots)

    def apply(self, key: NodeKey, program: str, state: NodeState) -> bool:
        """The host: in place; an instance: queue its state as a `network` command."""
        if key == self.host_key:
            return self.redirector.apply(key, program, state)
        with self._lock:
            sent = self._sent.setdefault(program, {})
            if sent.get(key[1], NodeState()) == state:
                return False
            sent[key[1]] = state
        self.send(key[1], program, to_wire(state))
        return True

    def remove_program(self, program: str) -> None:
        """Every instance that got `program`'s state is told to drop it; the host drops it."""
        with self._lock:
            sent = self._sent.pop(program, {})
        for instance, state in sent.items():
            if not state.empty:
                self.send(instance, program, to_wire(NodeState()))
        self.redirector.remove(self.host_key, program)

    def close(self) -> None:
        """Take every program off the host and the instances."""
        with self._lock:
            programs = sorted(self._sent)
        for program in programs:
            try:
                self.remove_program(program)
            except Exception as exc:  # keep going: the others must go too
                log.warning("network: %s not fully removed: %s", program, exc)
        self.redirector.close()


class NetworkOptionError(ValueError):
    """The program network's options are wrong."""


def vm_network_options(
    prefix: str, bridge: str, netns: str | None
) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Interface]:
    """Check `--network-prefix` against the host's bridge: (the prefix, the bridge's
    address); NetworkOptionError (one line) when they cannot work."""
    net = checked_prefix(prefix)
    if not bridge:
        raise NetworkOptionError("--network-prefix needs --network-bridge (the VMs' bridge)")
    iface = bridge_address(bridge, netns)
    if iface is None:
        where = f" in netns {netns}" if netns else ""
        raise NetworkOptionError(
            f"--network-bridge {bridge}: no such device with an IPv4 address{where}"
        )
    if net.overlaps(iface.network):
        raise NetworkOptionError(
            f"--network-prefix {prefix} overlaps the bridge's subnet {iface.network}"
        )
    return net, iface


def checked_prefix(prefix: str) -> ipaddress.IPv4Network:
    """`--network-prefix` as a network: private IPv4, /30 or wider (NetworkOptionError)."""
    try:
        net = ipaddress.IPv4Network(prefix, strict=True)
    except ValueError as exc:
        raise NetworkOptionError(f"--network-prefix {prefix!r}: not an IPv4 prefix ({exc})") \
            from exc  # fmt: skip
    if net.num_addresses < 4:
        raise NetworkOptionError(
            f"--network-prefix {prefix}: holds no program address (/30 or wider)"
        )
    if not net.is_private:
        raise NetworkOptionError(
            f"--network-prefix {prefix}: not a private range (it would shadow real hosts)"
        )
    return net


def bridge_address(bridge: str, netns: str | None) -> ipaddress.IPv4Interface | None:
    """The first IPv4 address of device `bridge` in namespace `netns` (None: none)."""
    import os

    from pyroute2 import IPRoute

    from net.redirector import NETNS_DIR, in_netns

    if netns and not os.path.exists(os.path.join(NETNS_DIR, netns)):
        return None

    def look() -> ipaddress.IPv4Interface | None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=bridge)
            if not found:
                return None
            for msg in ipr.get_addr(family=2, index=found[0]):
                addr = msg.get_attr("IFA_ADDRESS")
                if addr:
                    return ipaddress.IPv4Interface(f"{addr}/{msg['prefixlen']}")
        return None

    return in_netns(netns, look)
