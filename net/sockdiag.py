"""TCP byte counters of sockets by inode, through sock_diag (pyroute2 `DiagSocket`).

`tcp_bytes(inodes)` dumps the TCP sockets of the caller's network namespace (IPv4
and IPv6) with their `tcp_info` and returns (received, acked) payload bytes of those
whose inode is asked for: `tcpi_bytes_received` and `tcpi_bytes_acked` (the kernel
counts the connecting side's SYN as one acked byte).  `socket_inodes(pid)` lists a
process's socket inodes from /proc/PID/fd.  Only TCP has per-socket counters; UDP
and raw traffic are not counted per process.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Collection

from pyroute2 import DiagSocket
from pyroute2.netlink.diag import SS_ALL

INET_DIAG_INFO = 2  # extension number: tcp_info


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds (empty if it is gone)."""
    out: set[int] = set()
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for name in names:
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def tcp_bytes(inodes: Collection[int]) -> dict[int, tuple[int, int]]:
    """(bytes received, bytes acked) of each asked TCP socket still open, by inode."""
    want = set(inodes)
    out: dict[int, tuple[int, int]] = {}
    if not want:
        return out
    with DiagSocket() as ds:
        ds.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ds.get_sock_stats(
                family=family, states=SS_ALL, extensions=1 << (INET_DIAG_INFO - 1)
            ):
                ino = msg["idiag_inode"]
                if ino not in want:
                    continue
                info = msg.get_attr("INET_DIAG_INFO")
                if info is not None:
                    out[ino] = (int(info["tcpi_bytes_received"]), int(info["tcpi_bytes_acked"]))
    return out


def held_counters(pid: int) -> dict[str, int]:
    """`net_rx`/`net_tx` of the TCP sockets process `pid` holds now ({} if none): what
    the instance tracer adds to a process's figures at its exit stop."""
    inodes = socket_inodes(pid)
    if not inodes:
        return {}
    counters = tcp_bytes(inodes)
    if not counters:
        return {}
    return {
        "net_rx": sum(v[0] for v in counters.values()),
        "net_tx": sum(v[1] for v in counters.values()),
    }


class NetMeter:
    """Per-process TCP totals from periodic looks (the agent's samples).

    Each socket keeps the counters of the last look that saw it.  A socket a look
    no longer finds in its process is closed: its figures are final.  At the end of
    a process, `final` adds the closed sockets' figures to what the tracer read at
    the exit stop (the sockets still held then); without an exit-stop reading, every
    socket's last figures count.  A socket opened and closed between two looks, or
    closed after the last look and before the exit, is not (fully) counted: the
    price of not tracing close.
    """

    FORGOTTEN_KEPT = 4096  # ended pids a late look must not bring back

    def __init__(self) -> None:
        # pid -> inode -> (rx, tx, still held at the last look)
        self._seen: dict[int, dict[int, tuple[int, int, bool]]] = {}
        self._forgotten: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()  # looks run on a worker thread

    def look(self, pids: Collection[int]) -> None:
        """Read the counters of every socket the processes hold now."""
        held = {pid: socket_inodes(pid) for pid in pids}
        counters = tcp_bytes(set().union(*held.values()) if held else set())
        with self._lock:
            for pid, inodes in held.items():
                if pid in self._forgotten:
                    continue
                seen = self._seen.setdefault(pid, {})
                for ino, (rx, tx, _open) in list(seen.items()):
                    if ino not in inodes:
                        seen[ino] = (rx, tx, False)
                for ino in inodes:
                    if ino in counters:
                        seen[ino] = (*counters[ino], True)

    def totals(self, pid: int) -> tuple[int, int]:
        """(rx, tx) bytes of a live process so far."""
        with self._lock:
            seen = list(self._seen.get(pid, {}).values())
        return sum(v[0] for v in seen), sum(v[1] for v in seen)

    def final(self, pid: int, at_exit: tuple[int, int] | None) -> tuple[int, int]:
        """The process ended: its (rx, tx), nothing kept.  `at_exit`: the tracer's reading
        of the sockets it held at its exit stop (None: there was none)."""
        with self._lock:
            seen = list(self._seen.pop(pid, {}).values())
            self._forgotten[pid] = None
            if len(self._forgotten) > self.FORGOTTEN_KEPT:
                self._forgotten.popitem(last=False)
        if at_exit is None:
            return sum(v[0] for v in seen), sum(v[1] for v in seen)
        closed = [v for v in seen if not v[2]]
        return at_exit[0] + sum(v[0] for v in closed), at_exit[1] + sum(v[1] for v in closed)
