"""The accounts repository: accounts, users, bearer tokens and spend totals.

`Accounts` runs its queries through the shared store (oss.db); the conn-level
functions (`spent`, `add_spent`, `pricing_model`) run inside another service's
transaction (billing's limit checks and metering) so those stay one transaction.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from oss.db.store import Conn, Store, new_id
from oss.errors import Conflict, NotFound, Unauthorized


def hash_token(token: str) -> str:
    """Tokens are 256-bit random, so a plain SHA-256 is a sound verifier."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an account user."""

    account_id: str
    user_id: str
    admin: bool
    token_id: str


class Accounts:
    """Accounts, their users and tokens."""

    def __init__(self, db: Store) -> None:
        self._db = db

    # -- accounts, users, tokens ---------------------------------------------

    async def create_account(
        self, name: str, admin: bool, pricing_model: str, user: str, allow_root: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any], str]:
        """Create an account, its first user and a token; return (account, user, token)."""
        token = "dcp_" + secrets.token_urlsafe(32)
        now = self._db.clock()

        def op(c: Conn) -> tuple[dict[str, Any], dict[str, Any], str]:
            if c.execute("SELECT 1 FROM accounts WHERE name=?", (name,)).fetchone():
                raise Conflict(f"account {name!r} exists")
            aid, uid = new_id("acct"), new_id("user")
            c.execute(
                "INSERT INTO accounts(id, name, admin, pricing_model, created, allow_root)"
                " VALUES(?,?,?,?,?,?)",
                (aid, name, int(admin), pricing_model, now, int(allow_root)),
            )
            c.execute(
                "INSERT INTO users(id, account_id, name, created) VALUES(?,?,?,?)",
                (uid, aid, user, now),
            )
            c.execute(
                "INSERT INTO tokens VALUES(?,?,?,?,?,?,0)",
                (new_id("tok"), uid, aid, hash_token(token), "initial", now),
            )
            acct = dict(id=aid, name=name, admin=admin, pricing_model=pricing_model, created=now)
            return acct, dict(id=uid, account_id=aid, name=user, created=now), token

        return await self._db.write(op)

    async def authenticate(self, token: str) -> Principal:
        """The principal a bearer token stands for (Unauthorized if none)."""
        h = hash_token(token)

        def op(c: Conn) -> Principal:
            r = c.execute(
                "SELECT t.id, t.user_id, t.account_id, a.admin FROM tokens t JOIN accounts a"
                " ON a.id=t.account_id WHERE t.hash=? AND t.revoked=0",
                (h,),
            ).fetchone()
            if r is None:
                raise Unauthorized()
            return Principal(r["account_id"], r["user_id"], bool(r["admin"]), r["id"])

        return await self._db.read(op, short=True)

    async def accounts(self, account_id: str | None) -> list[dict[str, Any]]:
        """All accounts (None) or one."""

        def op(c: Conn) -> list[dict[str, Any]]:
            q = (
                "SELECT id, name, admin, pricing_model, created FROM accounts"
                + (" WHERE id=?" if account_id else "")
                + " ORDER BY created"
            )
            rows = c.execute(q, (account_id,) if account_id else ()).fetchall()
            return [dict(r) | {"admin": bool(r["admin"])} for r in rows]

        return await self._db.read(op)

    async def create_user(self, account_id: str, name: str) -> dict[str, Any]:
        """Add a user to an account."""
        now = self._db.clock()

        def op(c: Conn) -> dict[str, Any]:
            if c.execute(
                "SELECT 1 FROM users WHERE account_id=? AND name=?", (account_id, name)
            ).fetchone():
                raise Conflict(f"user {name!r} exists")
            uid = new_id("user")
            c.execute(
                "INSERT INTO users(id, account_id, name, created) VALUES(?,?,?,?)",
                (uid, account_id, name, now),
            )
            return dict(id=uid, account_id=account_id, name=name, created=now)

        return await self._db.write(op)

    async def users(self, account_id: str, user_id: str | None = None) -> list[dict[str, Any]]:
        """The account's users (or one of them; NotFound if not in the account)."""

        def op(c: Conn) -> list[dict[str, Any]]:
            if user_id is None:
                rows = c.execute(
                    "SELECT id, account_id, name, created FROM users WHERE account_id=?"
                    " ORDER BY created",
                    (account_id,),
                ).fetchall()
            else:
                rows = c.execute(
                    "SELECT id, account_id, name, created FROM users WHERE account_id=? AND id=?",
                    (account_id, user_id),
                ).fetchall()
                if not rows:
                    raise NotFound(f"user {user_id}")
            return [dict(r) for r in rows]

        return await self._db.read(op)

    async def create_token(self, account_id: str, user_id: str, label: str) -> dict[str, Any]:
        """Mint a token for a user of the account."""
        token = "dcp_" + secrets.token_urlsafe(32)
        now = self._db.clock()

        def op(c: Conn) -> dict[str, Any]:
            if not c.execute(
                "SELECT 1 FROM users WHERE id=? AND account_id=?", (user_id, account_id)
            ).fetchone():
                raise NotFound(f"user {user_id}")
            tid = new_id("tok")
            c.execute(
                "INSERT INTO tokens VALUES(?,?,?,?,?,?,0)",
                (tid, user_id, account_id, hash_token(token), label, now),
            )
            return dict(
                id=tid, user_id=user_id, label=label, created=now, revoked=False, token=token
            )

        return await self._db.write(op)

    async def tokens(self, account_id: str) -> list[dict[str, Any]]:
        """The account's tokens (metadata only)."""

        def op(c: Conn) -> list[dict[str, Any]]:
            rows = c.execute(
                "SELECT id, user_id, label, created, revoked FROM tokens WHERE account_id=?"
                " ORDER BY created",
                (account_id,),
            ).fetchall()
            return [dict(r) | {"revoked": bool(r["revoked"])} for r in rows]

        return await self._db.read(op)

    async def revoke_token(self, account_id: str, token_id: str) -> None:
        """Revoke a token of the account."""

        def op(c: Conn) -> None:
            cur = c.execute(
                "UPDATE tokens SET revoked=1 WHERE id=? AND account_id=?", (token_id, account_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"token {token_id}")

        await self._db.write(op)

    async def allows_root(self, account_id: str) -> bool:
        """May the account's exec tickets name uid 0 or gid 0 (operator's choice)?"""

        def op(c: Conn) -> bool:
            r = c.execute("SELECT allow_root FROM accounts WHERE id=?", (account_id,)).fetchone()
            return bool(r and r[0])

        return await self._db.read(op)


# -- run inside another service's transaction ----------------------------------


def spent(c: Conn, scope: str, scope_id: str) -> int:
    """Total spent by an account (`scope` "account") or a user ("user"), in micros."""
    table = "accounts" if scope == "account" else "users"
    return int(c.execute(f"SELECT spent_micros FROM {table} WHERE id=?", (scope_id,)).fetchone()[0])


def add_spent(c: Conn, account_id: str, user_id: str, amount_micros: int) -> None:
    """Add a charge to the account's and the user's spend totals."""
    c.execute(
        "UPDATE accounts SET spent_micros=spent_micros+? WHERE id=?", (amount_micros, account_id)
    )
    c.execute("UPDATE users SET spent_micros=spent_micros+? WHERE id=?", (amount_micros, user_id))


def pricing_model(c: Conn, account_id: str) -> str:
    """The account's pricing model name."""
    return str(
        c.execute("SELECT pricing_model FROM accounts WHERE id=?", (account_id,)).fetchone()[0]
    )
