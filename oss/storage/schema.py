"""The storage service's tables: DDL fragments of the one migration sequence (oss.schema)."""

# Issue 14: a program's storage spec (the run's server, pinned host key and key, its
# tiers) and the instances that mount it, so a restarted OSS keeps relaying mounts
# and can order the unmounts at the end.  The key sits in the OSS's private data
# directory (mode 0700), as the accounts' token hashes do; the row goes when the
# run's owner unmounts its storage.
V_SPECS = """
    CREATE TABLE storage_specs(program_id TEXT PRIMARY KEY, spec_json TEXT NOT NULL,
        declared REAL NOT NULL);
    CREATE TABLE storage_mounts(program_id TEXT NOT NULL, instance TEXT NOT NULL,
        PRIMARY KEY(program_id, instance));
"""
