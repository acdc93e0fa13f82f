"""Telemetry: the metrics collector (counters, Prometheus) and the consolidated logs
(zstd chunks, queries).
"""
