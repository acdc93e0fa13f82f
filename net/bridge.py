"""Bridges and network namespaces for the VM lab (netlink via pyroute2).

Blocking netlink calls: callers on an event loop run these with
`asyncio.to_thread` under `asyncio.timeout`.
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
MAX_IFNAME = 15


class NetError(Exception):
    """A netlink or namespace operation failed."""


class BadName(NetError):
    """An interface or namespace name is not usable."""


@dataclass(frozen=True)
class BridgeSpec:
    """A bridge and the address the host side has on it (the guests' gateway)."""

    name: str
    address: ipaddress.IPv4Interface

    def __post_init__(self) -> None:
        check_ifname(self.name)

    @property
    def mac(self) -> str:
        """A fixed, locally administered MAC derived from the name.

        A bridge without an explicit MAC takes the lowest MAC of its ports, so it
        changes when a VM's tap leaves; the other guests' ARP entries for the
        gateway then point nowhere until they expire (~30 s without traffic).
        """
        digest = hashlib.sha256(self.name.encode()).digest()
        return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


def check_ifname(name: str) -> None:
    """Linux interface names: 1..15 bytes, no '/', no whitespace."""
    if not name or len(name) > MAX_IFNAME or "/" in name or any(c.isspace() for c in name):
        raise BadName(f"bad interface name {name!r} (1-15 chars, no '/' or spaces)")


def netns_exists(name: str) -> bool:
    """Whether /run/netns/NAME exists."""
    return (NETNS_DIR / name).exists()


def create_netns(name: str) -> None:
    """Create a named network namespace with loopback up (idempotent)."""
    if "/" in name or not name:
        raise BadName(f"bad namespace name {name!r}")
    if not netns_exists(name):
        netns.create(name)
    with IPRoute(netns=name) as ipr:
        lo = ipr.link_lookup(ifname="lo")
        if lo:
            ipr.link("set", index=lo[0], state="up")


def remove_netns(name: str) -> None:
    """Remove a named network namespace (idempotent)."""
    if netns_exists(name):
        netns.remove(name)


def link_exists(name: str, ns: str | None = None) -> bool:
    """Whether interface `name` exists (in namespace `ns`, or the caller's)."""
    with _ipr(ns) as ipr:
        return bool(ipr.link_lookup(ifname=name))


def create_bridge(spec: BridgeSpec, ns: str | None = None) -> bool:
    """Create the bridge with its address and bring it up. False if it already existed."""
    try:
        with _ipr(ns) as ipr:
            existed = bool(ipr.link_lookup(ifname=spec.name))
            if not existed:
                ipr.link("add", ifname=spec.name, kind="bridge")
            idx = ipr.link_lookup(ifname=spec.name)[0]
            ipr.link("set", index=idx, address=spec.mac)
            have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx)}
            want = (str(spec.address.ip), spec.address.network.prefixlen)
            if want not in have:
                ipr.addr("add", index=idx, address=want[0], prefixlen=want[1])
            ipr.link("set", index=idx, state="up")
            return not existed
    except NetlinkError as exc:
        raise NetError(f"creating bridge {spec.name}: {exc}") from exc


def delete_link(name: str, ns: str | None = None) -> None:
    """Delete an interface (idempotent)."""
    try:
        with _ipr(ns) as ipr:
            found = ipr.link_lookup(ifname=name)
            if found:
                ipr.link("del", index=found[0])
    except NetlinkError as exc:
        raise NetError(f"deleting {name}: {exc}") from exc


def listening_socket(ns: str | None, host: str, port: int, backlog: int = 128) -> socket.socket:
    """A TCP socket listening on host:port inside namespace `ns`.

    A socket keeps the namespace it was made in, so a server in this process can
    serve guests on a bridge that lives in another namespace.
    """
    return _in_netns(ns, lambda: _listen(host, port, backlog))


def connect(ns: str | None, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to host:port made from inside namespace `ns`."""
    return _in_netns(ns, lambda: socket.create_connection((host, port), timeout=timeout))


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def _in_netns(ns: str | None, make: Callable[[], socket.socket]) -> socket.socket:
    """Run `make` on a short-lived thread that has entered namespace `ns`."""
    if ns is None:
        return make()
    result: list[socket.socket] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            _setns(NETNS_DIR / ns)
            result.append(make())
        except BaseException as exc:  # handed to the caller's thread below
            errors.append(exc)

    # setns affects only the calling thread; this thread ends right after.
    t = threading.Thread(target=body, name=f"netns-{ns}")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0]


def _setns(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetError(f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _ipr(ns: str | None) -> IPRoute:
    return IPRoute(netns=ns) if ns else IPRoute()
