"""The IPC service's tables: DDL fragments of the one migration sequence (oss.schema)."""

# Leases of the locking service (fencing tokens).
V1 = """
    CREATE TABLE leases(name TEXT PRIMARY KEY, holder TEXT, fencing INTEGER NOT NULL,
        expires REAL NOT NULL);
"""
