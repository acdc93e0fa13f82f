"""IPC: the internal locking service (leases with fencing tokens; signals next).  Owns
the leases table (`schema.py`; queries in `locking.py`) and the agents' lease routes
(`routes.py`).
"""
