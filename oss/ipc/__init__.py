"""IPC: the internal locking service (leases with fencing tokens); signals next."""
