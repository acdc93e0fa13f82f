"""Accounts: accounts, users and their bearer tokens, with the account's and user's
spend totals; owns the accounts, users and tokens tables (`schema.py`, the `Accounts`
repository in `store.py`), the /v1/accounts, /v1/users and /v1/tokens routes, and
credential minting against a data directory for the CLI (`credentials.py`).
"""
