"""A heartbeat only records the load; `/metrics` brings the gauges and the counter up to date."""

from __future__ import annotations

from oss.models import Load
from oss.telemetry.metrics import MetricsCollector


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the exposition")


def test_render_shows_each_instance_last_load_and_every_heartbeat() -> None:
    mc = MetricsCollector()
    mc.heartbeat("a", Load(cpu_percent=10, memory_used_mb=100, runqueue=1, processes=2))
    mc.heartbeat("a", Load(cpu_percent=55, memory_used_mb=300, runqueue=2, processes=4))
    mc.heartbeat("b", Load(cpu_percent=5, memory_used_mb=50, runqueue=0, processes=1))
    text = mc.exposition().decode()
    assert _value(text, 'dcp_instance_cpu_percent{instance="a"}') == 55
    assert _value(text, 'dcp_instance_memory_used_mb{instance="a"}') == 300
    assert _value(text, 'dcp_instance_processes{instance="b"}') == 1
    assert _value(text, "dcp_heartbeats_total") == 3
    mc.heartbeat("b", Load(cpu_percent=7, memory_used_mb=50, runqueue=0, processes=1))
    text = mc.exposition().decode()  # a second render counts only the new heartbeat
    assert _value(text, "dcp_heartbeats_total") == 4
    assert _value(text, 'dcp_instance_cpu_percent{instance="b"}') == 7
    assert mc.load("a") == Load(cpu_percent=55, memory_used_mb=300, runqueue=2, processes=4)
