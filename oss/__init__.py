"""The OSS: the services that serve a program's OS interfaces across the cluster.

It owns one subpackage per service the seed names, each with its pure decisions
(and, as the store split lands, its SQL and routes): `compute/` (instance pools and
providers, the process scheduler, availability, the optimizer, exec tickets),
`billing/` (pricing, limits, budgets), `accounts/` (accounts, users, tokens),
`storage/` (path mapping), `ipc/` (locks), `telemetry/` (metrics, logs), on the
shared `db/` layer (SQLite, group commit, migrations).  Around them: `service.py`
(`Oss`, which wires the services and runs their loops), `server.py` (the HTTP API,
the one error->status table, `/openapi.json`), `models.py` + `client.py` (the wire
contract and its typed client), `errors.py` (the one error tree), `listener.py`
(connection limits), the commands `cli.py` (`dcp-oss`) and `lab.py`
(`dcp-oss lab`), and the OSS embedded in `dcptrace`: `embedded.py` serves the
tracer's `Coordinator` seam in-process and `local.py` records the run in the
user's local state.  Layer 2: it imports `tracer` (the seam's values, the syscall
table), `net` and `images`, never `vmagent` or the `dcptrace` command.
"""
