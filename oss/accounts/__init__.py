"""Accounts: accounts, users and their tokens; credentials for the CLI."""
