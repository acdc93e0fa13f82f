"""The billing service's tables: DDL fragments of the one migration sequence (oss.schema)."""

# Limits at every scope, billing records.
V1 = """
    CREATE TABLE limits(scope TEXT NOT NULL, scope_id TEXT NOT NULL, body TEXT NOT NULL,
        PRIMARY KEY(scope, scope_id));
    CREATE TABLE billing(id INTEGER PRIMARY KEY AUTOINCREMENT, program_id TEXT NOT NULL,
        account_id TEXT NOT NULL, user_id TEXT NOT NULL, start REAL NOT NULL, end REAL NOT NULL,
        seconds INTEGER NOT NULL, model TEXT NOT NULL, amount_micros INTEGER NOT NULL,
        detail TEXT NOT NULL);
    CREATE INDEX billing_account ON billing(account_id);
    CREATE INDEX billing_user ON billing(user_id);
    CREATE INDEX billing_program ON billing(program_id);
"""
