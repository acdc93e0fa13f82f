"""Telemetry: what the OSS knows about running programs and instances.

It owns the metrics collector (`metrics.py`: per-program and per-instance
counters, Prometheus and JSON exposition) and the consolidated logs (`logs.py`:
zstd chunks, query filtering).
"""
