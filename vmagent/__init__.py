"""The instance layer: the agent on every compute instance and the home side of exec.

It owns the agent daemon (`agent.py`: exec sessions and a small HTTP API on one
port; `cli.py`/`config.py` for `dcp-agent`; `osslink.py`, which registers with the
OSS and heartbeats with `load.py`'s load), `exec/` (both ends of the deputy link:
the home deputy that stands in for a remote program, and the instance side that
starts it), and `cluster/` (the home side that decides where an exec'd program
runs: local instances, placement policies, the coordinators for `--instances` and
`--oss`).  Layer 3: it imports `tracer` (the seam), `oss` (the client and models,
for `--oss`) and `net`, never the `dcptrace` command.

Keep this file empty of imports: the deputy imports `vmagent.exec.protocol` while it
starts inside a traced program's process, and every import costs latency there.
"""
