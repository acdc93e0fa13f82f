"""Metrics collector: per-program and per-instance counters, Prometheus and JSON.

The schema is fixed: a report carries the counters of `MetricsReport` only, keyed
by OSS service (a closed set), so one program on one instance owns a bounded
number of series whatever a tenant sends.  Counters live in memory (they are
rates for the optimizer and the operator, not billing records; billing is
metered separately into SQLite).  Each
collector has its own prometheus registry: no module-level singletons.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from oss.models import Counters, Load, MetricsReport

_NONE = "-"


@dataclass
class _Acc:
    syscalls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    latency_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    cpu_seconds: float = 0.0
    memory_bytes: int = 0
    io_read_bytes: int = 0
    io_write_bytes: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0

    def add(self, r: MetricsReport) -> None:
        for k, v in r.syscalls.items():
            self.syscalls[k] += v
        for k, f in r.latency_seconds.items():
            self.latency_seconds[k] += f
        self.cpu_seconds += r.cpu_seconds
        if r.memory_bytes is not None:
            self.memory_bytes = r.memory_bytes
        self.io_read_bytes += r.io_read_bytes
        self.io_write_bytes += r.io_write_bytes
        self.net_rx_bytes += r.net_rx_bytes
        self.net_tx_bytes += r.net_tx_bytes

    def model(self) -> Counters:
        return Counters(
            syscalls=dict(self.syscalls),
            latency_seconds=dict(self.latency_seconds),
            cpu_seconds=self.cpu_seconds,
            memory_bytes=self.memory_bytes,
            io_read_bytes=self.io_read_bytes,
            io_write_bytes=self.io_write_bytes,
            net_rx_bytes=self.net_rx_bytes,
            net_tx_bytes=self.net_tx_bytes,
        )


class MetricsCollector:
    """Accumulates counters and exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        pl = ["program", "instance"]
        self._sys = Counter(
            "dcp_program_syscalls", "Syscalls by OSS service", [*pl, "service"], registry=r
        )
        self._lat = Counter(
            "dcp_program_call_latency_seconds",
            "Summed call latency by OSS service",
            [*pl, "service"],
            registry=r,
        )
        self._cpu = Counter("dcp_program_cpu_seconds", "CPU seconds", pl, registry=r)
        self._mem = Gauge("dcp_program_memory_bytes", "Resident memory", pl, registry=r)
        self._io = Counter("dcp_program_io_bytes", "I/O bytes", [*pl, "direction"], registry=r)
        self._net = Counter(
            "dcp_program_net_bytes", "Network bytes", [*pl, "direction"], registry=r
        )
        il = ["instance"]
        self._icpu = Gauge("dcp_instance_cpu_percent", "Instance CPU utilisation", il, registry=r)
        self._imem = Gauge("dcp_instance_memory_used_mb", "Instance memory used", il, registry=r)
        self._irq = Gauge("dcp_instance_runqueue", "Instance run-queue length", il, registry=r)
        self._iproc = Gauge("dcp_instance_processes", "Processes on the instance", il, registry=r)
        self._hb = Counter("dcp_heartbeats", "Heartbeats processed", registry=r)
        self.api_latency = Histogram(
            "dcp_api_request_seconds",
            "API request latency",
            ["route"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.decisions = Counter(
            "dcp_optimizer_decisions", "Optimizer decisions", ["action"], registry=r
        )
        self._igauges: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._api_children: dict[str, Any] = {}
        self._programs: dict[str, _Acc] = defaultdict(_Acc)
        self._by_instance: dict[tuple[str, str], _Acc] = defaultdict(_Acc)
        self._on_instance: dict[str, set[str]] = defaultdict(set)  # instance -> programs
        self._instances_of: dict[str, set[str]] = defaultdict(set)  # program -> instances
        self._loads: dict[str, Load] = {}
        self.heartbeats = 0  # heartbeats recorded; `dcp_heartbeats` catches up at render
        self._hb_rendered = 0
        self.render_lock = asyncio.Lock()  # one exposition render at a time
        self.log_chunks_decoded = Counter(
            "dcp_log_chunks_decoded", "Log chunks decompressed to answer reads", registry=r
        )

    def report(self, program: str, r: MetricsReport) -> None:
        """Add a program's counter increments."""
        self._programs[program].add(r)
        inst = r.instance or _NONE
        self._by_instance[(program, inst)].add(r)
        self._on_instance[inst].add(program)
        self._instances_of[program].add(inst)
        for k, v in r.syscalls.items():
            self._sys.labels(program, inst, k).inc(v)
        for k, f in r.latency_seconds.items():
            self._lat.labels(program, inst, k).inc(f)
        self._cpu.labels(program, inst).inc(r.cpu_seconds)
        if r.memory_bytes is not None:
            self._mem.labels(program, inst).set(r.memory_bytes)
        self._io.labels(program, inst, "read").inc(r.io_read_bytes)
        self._io.labels(program, inst, "write").inc(r.io_write_bytes)
        self._net.labels(program, inst, "rx").inc(r.net_rx_bytes)
        self._net.labels(program, inst, "tx").inc(r.net_tx_bytes)

    def heartbeat(self, instance: str, load: Load) -> None:
        """Record an instance's load (the hottest path: a dict store and an int).

        The Prometheus gauges and the heartbeat counter are brought up to date when
        the exposition is rendered (`exposition`), not 4,000 locked sets a second.
        """
        self._loads[instance] = load
        self.heartbeats += 1

    def _sync_instances(self) -> None:
        """Copy the last loads into the instance gauges (at render time, off the loop)."""
        loads = dict(self._loads)  # one C-level copy: consistent while the loop beats on
        beats = self.heartbeats
        self._hb.inc(beats - self._hb_rendered)
        self._hb_rendered = beats
        for instance, load in loads.items():
            g = self._igauges.get(instance)
            if g is None:
                g = self._igauges[instance] = (
                    self._icpu.labels(instance),
                    self._imem.labels(instance),
                    self._irq.labels(instance),
                    self._iproc.labels(instance),
                )
            g[0].set(load.cpu_percent)
            g[1].set(load.memory_used_mb)
            g[2].set(load.runqueue)
            g[3].set(load.processes)

    def observe_api(self, route: str, seconds: float) -> None:
        """Record one API request's latency."""
        h = self._api_children.get(route)
        if h is None:
            h = self._api_children[route] = self.api_latency.labels(route)
        h.observe(seconds)

    def load(self, instance: str) -> Load | None:
        """The last load an instance reported."""
        return self._loads.get(instance)

    def program(self, program: str) -> Counters:
        """A program's accumulated counters."""
        acc = self._programs.get(program)
        return (acc or _Acc()).model()

    def instance(self, instance: str, programs: set[str] | None = None) -> dict[str, float]:
        """An instance's load and the counters of (the given) programs on it."""
        out: dict[str, float] = {}
        load = self._loads.get(instance)
        if load is not None and programs is None:
            out.update(load.model_dump())
        for prog in self._on_instance.get(instance, ()):
            if programs is None or prog in programs:
                acc = self._by_instance[(prog, instance)]
                out["cpu_seconds"] = out.get("cpu_seconds", 0.0) + acc.cpu_seconds
                out["syscalls"] = out.get("syscalls", 0.0) + sum(acc.syscalls.values())
                out["net_bytes"] = out.get("net_bytes", 0.0) + acc.net_rx_bytes + acc.net_tx_bytes
                out["io_bytes"] = out.get("io_bytes", 0.0) + acc.io_read_bytes + acc.io_write_bytes
        return out

    def by_instance(self, program: str) -> dict[str, Counters]:
        """A program's counters on each instance it reported from."""
        return {
            inst: self._by_instance[(program, inst)].model()
            for inst in sorted(self._instances_of.get(program, ()))
        }

    def exposition(self) -> bytes:
        """Prometheus text format (callers serialise renders: `render_lock`)."""
        self._sync_instances()
        return generate_latest(self.registry)
