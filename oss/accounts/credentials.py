"""Credential minting against an OSS data directory (for the CLI, providers, tests).

These open the SQLite store directly, so they work whether or not a
`dcp-oss serve` is running on the same directory (WAL + BEGIN IMMEDIATE make
the two processes safe together).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from oss.accounts.store import Accounts
from oss.compute.instances import Instances
from oss.db.store import Store
from oss.schema import VERSIONS


@dataclass(frozen=True, slots=True)
class AccountCredentials:
    """A new account's ids and its first user's bearer token."""

    account_id: str
    user_id: str
    token: str


@contextlib.asynccontextmanager
async def _opened(data_dir: Path) -> AsyncIterator[Store]:
    """The store of `data_dir`, open for the duration of the block."""
    store = Store(data_dir, VERSIONS)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def mint_instance_token(data_dir: Path, name: str, pool: str | None = None) -> str:
    """Create instance `name` (or re-key it) and return its bearer token (stored hashed)."""
    async with _opened(data_dir) as store:
        return await Instances(store).mint_instance_token(name, pool)


async def create_account(
    data_dir: Path,
    name: str,
    *,
    admin: bool = False,
    pricing_model: str = "sum",
    user: str = "admin",
    allow_root: bool = False,
) -> AccountCredentials:
    """Create an account with a first user and return its token."""
    async with _opened(data_dir) as store:
        acct, usr, token = await Accounts(store).create_account(
            name, admin, pricing_model, user, allow_root
        )
        return AccountCredentials(acct["id"], usr["id"], token)


def mint_instance_token_sync(data_dir: Path, name: str, pool: str | None = None) -> str:
    """Blocking `mint_instance_token` (not from inside a running event loop)."""
    return asyncio.run(mint_instance_token(data_dir, name, pool))


def create_account_sync(
    data_dir: Path,
    name: str,
    *,
    admin: bool = False,
    pricing_model: str = "sum",
    user: str = "admin",
    allow_root: bool = False,
) -> AccountCredentials:
    """Blocking `create_account` (not from inside a running event loop)."""
    return asyncio.run(
        create_account(
            data_dir,
            name,
            admin=admin,
            pricing_model=pricing_model,
            user=user,
            allow_root=allow_root,
        )
    )
