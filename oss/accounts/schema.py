"""The accounts service's tables: DDL fragments of the one migration sequence (oss.schema)."""

# accounts, users, tokens.
V1 = """
    CREATE TABLE accounts(id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, admin INTEGER NOT NULL,
        pricing_model TEXT NOT NULL, created REAL NOT NULL);
    CREATE TABLE users(id TEXT PRIMARY KEY, account_id TEXT NOT NULL REFERENCES accounts(id),
        name TEXT NOT NULL, created REAL NOT NULL, UNIQUE(account_id, name));
    CREATE TABLE tokens(id TEXT PRIMARY KEY, user_id TEXT NOT NULL REFERENCES users(id),
        account_id TEXT NOT NULL REFERENCES accounts(id), hash TEXT NOT NULL UNIQUE,
        label TEXT NOT NULL, created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
"""

# Running spend totals, so limit checks do not sum the billing table each time
# (back-filled once from billing's records: the one time accounts reads them).
V2 = """
    ALTER TABLE accounts ADD COLUMN spent_micros INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE users ADD COLUMN spent_micros INTEGER NOT NULL DEFAULT 0;
    UPDATE accounts SET spent_micros=(SELECT coalesce(sum(amount_micros), 0) FROM billing
        WHERE billing.account_id=accounts.id);
    UPDATE users SET spent_micros=(SELECT coalesce(sum(amount_micros), 0) FROM billing
        WHERE billing.user_id=users.id);
"""

# May the account's exec tickets name uid/gid 0 (set by the operator only)?
V6 = """
    ALTER TABLE accounts ADD COLUMN allow_root INTEGER NOT NULL DEFAULT 0;
"""
