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


class NetMeter:
    """Per-process TCP totals: the last counters seen of every socket it held.

    A socket closed between two looks keeps the figures of the last look, so a
    process's total never goes down; a socket opened and closed between two looks
    is not seen at all (the price of not tracing close).
    """

    FORGOTTEN_KEPT = 4096  # ended pids a late look must not bring back

    def __init__(self) -> None:
        self._seen: dict[int, dict[int, tuple[int, int]]] = {}  # pid -> inode -> counters
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
                for ino in inodes:
                    if ino in counters:
                        seen[ino] = counters[ino]

    def merge(self, pid: int, counters: dict[int, tuple[int, int]]) -> None:
        """Counters of the process's sockets read elsewhere (the tracer's exit stop)."""
        with self._lock:
            self._forgotten.pop(pid, None)  # a reused pid is a new process
            seen = self._seen.setdefault(pid, {})
            for ino, (rx, tx) in counters.items():
                old = seen.get(ino, (0, 0))
                seen[ino] = (max(old[0], rx), max(old[1], tx))

    def totals(self, pid: int) -> tuple[int, int]:
        """(rx, tx) bytes of a process so far."""
        with self._lock:
            seen = list(self._seen.get(pid, {}).values())
        return sum(v[0] for v in seen), sum(v[1] for v in seen)

    def forget(self, pid: int) -> tuple[int, int]:
        """The process ended: its totals, and nothing kept."""
        out = self.totals(pid)
        with self._lock:
            self._seen.pop(pid, None)
            self._forgotten[pid] = None
            if len(self._forgotten) > self.FORGOTTEN_KEPT:
                self._forgotten.popitem(last=False)
        return out


def encode_counters(counters: dict[int, tuple[int, int]]) -> bytes:
    """`ino:rx:tx,...` (the tracer's usage record field `tcp`)."""
    return ",".join(f"{i}:{rx}:{tx}" for i, (rx, tx) in sorted(counters.items())).encode()


def decode_counters(raw: bytes) -> dict[int, tuple[int, int]]:
    """The inverse of `encode_counters`; malformed items are skipped."""
    out: dict[int, tuple[int, int]] = {}
    for item in raw.split(b","):
        parts = item.split(b":")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            out[int(parts[0])] = (int(parts[1]), int(parts[2]))
    return out
