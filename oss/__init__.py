"""DCP's operating system service (dcp-oss): the services that serve a program's OS
interfaces across the cluster, on one SQLite database, behind one HTTP API.

One subpackage per service the seed names, each owning its pure deciding modules,
its tables (DDL in `schema.py`, queries in its repository modules) and its HTTP
routes (`routes.py`): `compute/` (instance pools and providers, the process
scheduler, availability, the optimizer, exec tickets), `billing/` (pricing, limits,
budgets), `accounts/` (accounts, users, tokens), `storage/` (path mapping), `ipc/`
(locks), `telemetry/` (metrics, logs).  Shared: `db/` (the store, group commit,
migrations), `schema.py` (the one ordered migration sequence), `api.py` +
`server.py` (route vocabulary, dispatch, the one error->status table,
`/openapi.json`), `listener.py` (connection limits), `models.py` + `client.py` (the
wire contract and its typed client), `errors.py`, `service.py` (`Oss`, which wires
the repositories and runs the background duties), the commands `cli.py` and
`lab.py`, and the OSS inside dcptrace: `embedded.py` serves the tracer's
`Coordinator` seam in-process and `local.py` records the run in the user's local
state.  Layer 2: it imports the tracer engine, `net` and `images`, never `vmagent`
or the dcptrace command (`tests/unit/test_layering.py`).
"""
