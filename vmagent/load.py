"""Instance load from /proc (a thin adapter; the parsing is pure and tested)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Load:
    """What the agent reports in a heartbeat."""

    cpu_percent: float
    memory_used_mb: int
    runqueue: float
    processes: int

    def as_json(self) -> dict[str, float | int]:
        """The heartbeat's `load` object (CONTRACTS.md)."""
        return {
            "cpu_percent": self.cpu_percent,
            "memory_used_mb": self.memory_used_mb,
            "runqueue": self.runqueue,
            "processes": self.processes,
        }


def parse_cpu_times(stat: str) -> tuple[int, int]:
    """(busy, total) jiffies from the `cpu` line of /proc/stat."""
    for line in stat.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return sum(values) - idle, sum(values)
    raise ValueError("no cpu line in /proc/stat")


def parse_meminfo(meminfo: str) -> tuple[int, int]:
    """(total_mb, used_mb) from /proc/meminfo (used = total - available)."""
    fields: dict[str, int] = {}
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            fields[name] = int(parts[0])
    total = fields["MemTotal"]
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    return total // 1024, (total - available) // 1024


def parse_loadavg(loadavg: str) -> tuple[float, int]:
    """(1-minute run queue average, number of tasks) from /proc/loadavg."""
    parts = loadavg.split()
    return float(parts[0]), int(parts[3].split("/")[1])


def cpu_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Busy share of CPU time between two samples, in percent."""
    busy = after[0] - before[0]
    total = after[1] - before[1]
    return round(100.0 * busy / total, 1) if total > 0 else 0.0


class LoadSampler:
    """Reads /proc; remembers the previous CPU sample to compute a rate."""

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._last = self._cpu()

    def _read(self, name: str) -> str:
        with open(os.path.join(self._proc, name)) as f:
            return f.read()

    def _cpu(self) -> tuple[int, int]:
        return parse_cpu_times(self._read("stat"))

    def memory_mb(self) -> int:
        """Total memory of this instance in MiB."""
        return parse_meminfo(self._read("meminfo"))[0]

    def sample(self) -> Load:
        """The load now (CPU share since the previous sample)."""
        now = self._cpu()
        cpu = cpu_percent(self._last, now)
        self._last = now
        runqueue, _ = parse_loadavg(self._read("loadavg"))
        processes = sum(1 for n in os.listdir(self._proc) if n.isdigit())
        return Load(cpu, parse_meminfo(self._read("meminfo"))[1], runqueue, processes)
