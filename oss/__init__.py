"""DCP's operating system service (dcp-oss): accounts, compute, billing, telemetry,
IPC and storage services on one SQLite database, behind one HTTP API.

Each service is a subpackage owning its pure deciding modules, its tables (DDL in
`schema.py`, queries in its repository modules) and its HTTP routes (`routes.py`).
Shared: `db/` (the store), `schema.py` (the one ordered migration sequence),
`api.py` + `server.py` (route vocabulary, dispatch, error statuses, /openapi.json),
`models.py` (the wire contract), `service.py` (`Oss`, which wires the repositories
and runs the background duties), `embedded.py`/`local.py` (the OSS inside dcptrace).
"""
