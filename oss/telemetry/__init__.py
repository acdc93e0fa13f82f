"""Telemetry: the metrics collector (counters, Prometheus) and the consolidated logs
(zstd chunks, paged queries).  Owns the log_chunks table (`schema.py`; the `Logs`
repository in `store.py`) and the log and metrics routes (`routes.py`).
"""
