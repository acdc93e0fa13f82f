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
