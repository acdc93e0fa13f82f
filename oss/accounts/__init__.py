"""Accounts: who may call the OSS.

It owns accounts, their users and their bearer tokens (identity), and
`credentials.py`, which mints them against an OSS data directory for the `dcp-oss`
command line, the lab and tests.
"""
