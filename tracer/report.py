"""What a run produced: per-syscall statistics, the --summary table, the --record JSON."""

from __future__ import annotations

import signal
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any, Protocol

from tracer.machine import Machine
from tracer.syscalls import SyscallTable


class Writer(Protocol):
    """Where text output goes: a file, stderr, or a `tracer.outputs.Output`."""

    def write(self, text: str, /) -> object:
        """Write `text`."""


class RunStats:
    """Counts, errors and in-call time per syscall number."""

    def __init__(self, table: SyscallTable) -> None:
        self.table = table
        self.calls: Counter[int] = Counter()
        self.errors: Counter[int] = Counter()
        self.seconds: defaultdict[int, float] = defaultdict(float)

    def add(self, nr: int, rval: int, seconds: float) -> None:
        """Count one finished call."""
        self.calls[nr] += 1
        self.seconds[nr] += seconds
        if -4096 < rval < 0:
            self.errors[nr] += 1

    def name(self, nr: int) -> str:
        """The syscall's name, or syscall_N for numbers outside the table."""
        spec = self.table.get(nr)
        return spec.name if spec else f"syscall_{nr}"

    def by_name(self) -> dict[str, int]:
        """Call counts by syscall name."""
        return {self.name(nr): n for nr, n in self.calls.most_common()}

    def grouped(self, key: Callable[[int], str]) -> dict[str, dict[str, float]]:
        """Calls, errors and seconds summed by a grouping of syscall numbers."""
        out: dict[str, dict[str, float]] = {}
        for nr, n in self.calls.items():
            g = out.setdefault(key(nr), {"calls": 0, "errors": 0, "seconds": 0.0})
            g["calls"] += n
            g["errors"] += self.errors[nr]
            g["seconds"] += self.seconds[nr]
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["calls"]))

    def category(self, nr: int) -> str:
        """The category of a syscall number."""
        spec = self.table.get(nr)
        return spec.category.value if spec else "other"

    def service(self, nr: int) -> str:
        """The OSS service of a syscall number."""
        spec = self.table.get(nr)
        return spec.service.value if spec else "local"


def write_summary(stats: RunStats, out: Writer) -> None:
    """An `strace -c`-like table, then totals by category and by OSS service."""
    total = sum(stats.seconds.values()) or 1e-12
    out.write(
        f"{'% time':>7} {'seconds':>11} {'usecs/call':>11} {'calls':>9} {'errors':>9} syscall\n"
    )
    out.write(f"{'-' * 7} {'-' * 11} {'-' * 11} {'-' * 9} {'-' * 9} {'-' * 16}\n")
    for nr, secs in sorted(stats.seconds.items(), key=lambda kv: -kv[1]):
        calls = stats.calls[nr]
        errs = stats.errors[nr] or ""
        out.write(
            f"{100 * secs / total:7.2f} {secs:11.6f} {1e6 * secs / calls:11.0f} "
            f"{calls:9d} {errs!s:>9} {stats.name(nr)}\n"
        )
    out.write(f"{'-' * 7} {'-' * 11} {'-' * 11} {'-' * 9} {'-' * 9} {'-' * 16}\n")
    out.write(
        f"{100.0:7.2f} {sum(stats.seconds.values()):11.6f} {'':>11} "
        f"{sum(stats.calls.values()):9d} {sum(stats.errors.values()) or '':>9} total\n"
    )
    for title, key in (("category", stats.category), ("OSS service", stats.service)):
        out.write(f"\nby {title}:\n")
        for name, g in stats.grouped(key).items():
            out.write(
                f"  {name:<10} {int(g['calls']):9d} calls {int(g['errors']):7d} errors "
                f"{g['seconds']:11.6f} s\n"
            )


def build_record(
    argv: tuple[str, ...],
    exit_status: int | None,
    sig: int | None,
    machine: Machine,
    stats: RunStats,
    wall_seconds: float,
    instance_of: Callable[[int], str],
    scope: str,
    *,
    remote: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON run record; `remote` is the OSS's processes record of the placed processes
    (`GET /v1/programs/{id}/processes`: their measured usage, issue 10)."""
    processes = [
        {
            "pid": p.pid,
            "ppid": p.ppid,
            "argv": list(p.argv),
            "instance": instance_of(p.pid),
            "exit_status": p.exit_status,
            "signal": signal.Signals(p.signal).name if p.signal else None,
        }
        for p in machine.processes.values()
    ]
    record: dict[str, Any] = {
        "argv": list(argv),
        "exit_status": exit_status,
        "signal": signal.Signals(sig).name if sig else None,
        "wall_seconds": round(wall_seconds, 6),
        "processes": processes,
        "syscalls": {
            "scope": scope,
            "total": sum(stats.calls.values()),
            "by_name": stats.by_name(),
            "by_category": {k: int(v["calls"]) for k, v in stats.grouped(stats.category).items()},
            "by_service": {k: int(v["calls"]) for k, v in stats.grouped(stats.service).items()},
            "errors_by_name": {stats.name(nr): n for nr, n in stats.errors.most_common()},
        },
    }
    if remote is not None:
        add_remote(record, remote)
    return record


REMOTE_FIELDS = (
    "pid", "instance", "parent", "session", "argv", "exit_status", "signal", "cpu_seconds",
    "max_rss_kb",
    "io_read_bytes", "io_write_bytes", "net_rx_bytes", "net_tx_bytes", "syscalls_by_service",
)  # fmt: skip


def add_remote(record: dict[str, Any], remote: dict[str, Any]) -> None:
    """Add the placed processes as the OSS measured them, their syscalls by instance and
    the processes whose final figures had not arrived (`incomplete`)."""
    rows = [{k: p.get(k) for k in REMOTE_FIELDS} for p in remote.get("processes", [])]
    for row, p in zip(rows, remote.get("processes", []), strict=True):
        if p.get("state") == "migrated":  # issue 12: it left that instance, running
            row["migrated"] = {
                "from": p.get("instance"),
                "to": p.get("moved_to"),
                "at": p.get("ended"),
                "freeze_ms": p.get("freeze_ms"),
                "reason": p.get("move_reason"),  # the optimizer's, or who asked
            }
    for row in rows:
        if isinstance(row["signal"], int):
            row["signal"] = signal.Signals(row["signal"]).name
    record["placed_processes"] = rows
    by_instance: dict[str, dict[str, int]] = {}
    for row in rows:
        acc = by_instance.setdefault(str(row["instance"]), {})
        for svc, n in (row["syscalls_by_service"] or {}).items():
            acc[svc] = acc.get(svc, 0) + int(n)
    record["syscalls"]["by_instance"] = by_instance
    record["incomplete"] = list(remote.get("incomplete", []))
    if remote.get("address"):  # issue 13: the program's one address on its instances
        record["program_address"] = remote["address"]


def render_record(record: dict[str, Any]) -> str:
    """The record as the JSON text of a --record file."""
    import json  # only for --record: not on every start-up

    return json.dumps(record, indent=2) + "\n"
