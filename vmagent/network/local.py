"""The program network of a `dcptrace --instances N` run (local instances, as root).

The run's lab (`net.netns.LabNetwork`: one bridge in this namespace, one
namespace per instance) becomes one host, `home`, for the run's OSS: its
instances are the spots the planner knows (slot = their index), the host is
this namespace (node `None`).  Program addresses come from a /24 of
`NET_SUPERNET` that no route, address or policy rule here uses yet.
"""

from __future__ import annotations

import ipaddress
import os
from typing import TYPE_CHECKING

from oss.network.manager import NetworkConfig
from oss.network.plan import HomeSpot, HostSpot, InstanceSpot, NodeKey

if TYPE_CHECKING:
    from net.netns import LabNetwork

NET_SUPERNET = ipaddress.IPv4Network("10.214.0.0/16")
HOME = "home"


class NoPrefix(Exception):
    """No free /24 for program addresses is left in 10.214.0.0/16."""


def free_prefix(seed: int) -> ipaddress.IPv4Network:
    """A /24 of NET_SUPERNET that nothing in this namespace uses (routes of any table,
    addresses, policy rules)."""
    from pyroute2 import IPRoute

    used: list[ipaddress.IPv4Network] = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=2):
            addr = msg.get_attr("IFA_ADDRESS")
            if addr:
                used.append(ipaddress.IPv4Network(f"{addr}/{msg['prefixlen']}", strict=False))
        for msg in ipr.get_routes(family=2, table=0):
            dst = msg.get_attr("RTA_DST")
            if dst:
                used.append(ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}", strict=False))
        for msg in ipr.get_rules(family=2):
            dst = msg.get_attr("FRA_DST")
            if dst:
                used.append(ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}", strict=False))
    subnets = list(NET_SUPERNET.subnets(new_prefix=24))
    for i in range(len(subnets)):
        candidate = subnets[(seed + i) % len(subnets)]
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise NoPrefix()


def lab_config(lab: LabNetwork) -> tuple[NetworkConfig, dict[NodeKey, str | None]]:
    """The network config of a run's lab and the namespaces of its nodes."""
    prefix = free_prefix(os.getpid() % 256)
    spots = {
        a.name: InstanceSpot(a.name, a.address, lab.gateway, HOME, i)
        for i, a in enumerate(lab.attachments)
    }
    nodes: dict[NodeKey, str | None] = {("host", HOME): None}
    nodes.update({("instance", a.name): a.netns for a in lab.attachments})
    home = HomeSpot(HOME, lab.gateway)  # the run's home is this host: its servers too
    config = NetworkConfig(prefix, spots, {HOME: HostSpot(HOME, lab.bridge)}, home=home)
    return config, nodes
