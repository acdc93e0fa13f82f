"""The network service's tables: DDL fragments of the one migration sequence (oss.schema)."""

# Issue 13: the address of each program (released when it ends), the instances it
# holds that address on, and its listening sockets (one instance per port).
V_NET = """
    CREATE TABLE net_addresses(program_id TEXT PRIMARY KEY, address TEXT NOT NULL UNIQUE,
        allocated REAL NOT NULL);
    CREATE TABLE net_members(program_id TEXT NOT NULL, instance TEXT NOT NULL,
        PRIMARY KEY(program_id, instance));
    CREATE TABLE net_listeners(program_id TEXT NOT NULL, proto INTEGER NOT NULL,
        port INTEGER NOT NULL, instance TEXT NOT NULL, pid INTEGER NOT NULL,
        bound TEXT NOT NULL, since REAL NOT NULL, PRIMARY KEY(program_id, proto, port));
"""

# Issue 13: AF_UNIX paths a program bound on its instances (so that a restarted OSS
# still relays a connect on another kernel to them), and the ports of connections that
# moved with a migrated process (pinned to its instance, in order).
V_UNIX = """
    CREATE TABLE net_unix_paths(program_id TEXT NOT NULL, path TEXT NOT NULL,
        instance TEXT NOT NULL, pid INTEGER NOT NULL, kind TEXT NOT NULL,
        boot TEXT NOT NULL, PRIMARY KEY(program_id, path));
    CREATE TABLE net_pins(program_id TEXT NOT NULL, seq INTEGER NOT NULL,
        instance TEXT NOT NULL, port INTEGER NOT NULL, proto INTEGER NOT NULL,
        PRIMARY KEY(program_id, seq));
"""
