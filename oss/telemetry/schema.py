"""The telemetry service's tables: DDL fragments of the one migration sequence (oss.schema)."""

# Log chunks (zstd) of programs and of the OSS itself.
V1 = """
    CREATE TABLE log_chunks(id INTEGER PRIMARY KEY AUTOINCREMENT, account_id TEXT,
        program_id TEXT, instance TEXT, ts_min REAL NOT NULL, ts_max REAL NOT NULL,
        n INTEGER NOT NULL, data BLOB NOT NULL);
    CREATE INDEX log_program ON log_chunks(program_id, ts_max);
"""

# Log reads in chunk order without a sort.
V4 = """
    CREATE INDEX log_program_chunk ON log_chunks(program_id, id);
"""

# Measured usage (issue 10): one row per process an agent ran for a program, with its
# highest reported totals; the last report batch applied per instance (a replayed batch
# is dropped); per program, the measured network bytes and how many are billed, and the
# storage its view holds as each instance last walked it.
V7 = """
    CREATE TABLE processes(program_id TEXT NOT NULL, instance TEXT NOT NULL,
        pid INTEGER NOT NULL, started REAL NOT NULL, parent_instance TEXT, parent_pid INTEGER,
        session_pid INTEGER,
        argv TEXT NOT NULL, ended REAL, exit_status INTEGER, signal INTEGER,
        cpu_us INTEGER NOT NULL DEFAULT 0, maxrss_kb INTEGER NOT NULL DEFAULT 0,
        rchar INTEGER NOT NULL DEFAULT 0, wchar INTEGER NOT NULL DEFAULT 0,
        rbytes INTEGER NOT NULL DEFAULT 0, wbytes INTEGER NOT NULL DEFAULT 0,
        net_rx INTEGER NOT NULL DEFAULT 0, net_tx INTEGER NOT NULL DEFAULT 0,
        syscalls_json TEXT NOT NULL DEFAULT '{}', state TEXT NOT NULL,
        PRIMARY KEY(program_id, instance, pid, started));
    CREATE INDEX processes_instance ON processes(instance, state);
    CREATE TABLE report_seq(instance TEXT PRIMARY KEY, seq INTEGER NOT NULL);
    CREATE TABLE measured_net(program_id TEXT PRIMARY KEY, bytes INTEGER NOT NULL,
        billed INTEGER NOT NULL);
    CREATE TABLE measured_storage(program_id TEXT NOT NULL, instance TEXT NOT NULL,
        kb INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY(program_id, instance));
"""

# Migration (issue 12): a process's row on the instance it left says where it went and
# how long it was frozen (its state is `migrated`; the target's row carries it on).
V10 = """
    ALTER TABLE processes ADD COLUMN moved_to TEXT;
    ALTER TABLE processes ADD COLUMN freeze_ms REAL;
"""

# Issue 12 (optimizer moves): why a process moved (the optimizer's reason, or who asked).
V_MOVE_REASON = """
    ALTER TABLE processes ADD COLUMN move_reason TEXT;
"""
