"""The accounts service's HTTP routes: accounts, users, tokens."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from oss import models as m
from oss.api import Route, principal
from oss.errors import NotFound
from oss.service import Oss


async def h_create_account(
    oss: Oss, r: web.Request, who: Any, b: m.AccountCreate, q: Any
) -> m.AccountCreated:
    acct, user, token = await oss.accounts.create_account(
        b.name, b.admin, b.pricing_model.value, b.user
    )
    return m.AccountCreated(account=m.Account(**acct), user=m.User(**user), token=token)


async def h_accounts(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> list[m.Account]:
    p = principal(who)
    return [m.Account(**a) for a in await oss.accounts.accounts(None if p.admin else p.account_id)]


async def h_account(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Account:
    p = principal(who)
    aid = r.match_info["account_id"]
    if not p.admin and aid != p.account_id:
        raise NotFound(f"account {aid}")
    rows = await oss.accounts.accounts(aid)
    if not rows:
        raise NotFound(f"account {aid}")
    return m.Account(**rows[0])


async def h_create_user(oss: Oss, r: web.Request, who: Any, b: m.UserCreate, q: Any) -> m.User:
    return m.User(**await oss.accounts.create_user(principal(who).account_id, b.name))


async def h_users(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> list[m.User]:
    return [m.User(**u) for u in await oss.accounts.users(principal(who).account_id)]


async def h_user(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.User:
    return m.User(
        **(await oss.accounts.users(principal(who).account_id, r.match_info["user_id"]))[0]
    )


async def h_create_token(
    oss: Oss, r: web.Request, who: Any, b: m.TokenCreate, q: Any
) -> m.TokenCreated:
    p = principal(who)
    return m.TokenCreated(
        **await oss.accounts.create_token(p.account_id, b.user_id or p.user_id, b.label)
    )


async def h_tokens(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> list[m.TokenInfo]:
    return [m.TokenInfo(**t) for t in await oss.accounts.tokens(principal(who).account_id)]


async def h_revoke_token(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Ok:
    await oss.accounts.revoke_token(principal(who).account_id, r.match_info["token_id"])
    oss.forget_tokens()
    return m.Ok()


ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/accounts",
        h_create_account,
        "admin",
        "Create an account",
        m.AccountCreate,
        m.AccountCreated,
    ),
    Route(
        "GET",
        "/v1/accounts",
        h_accounts,
        "account",
        "List visible accounts",
        response=m.Account,
        many=True,
    ),
    Route(
        "GET",
        "/v1/accounts/{account_id}",
        h_account,
        "account",
        "Inspect an account",
        response=m.Account,
    ),
    Route("POST", "/v1/users", h_create_user, "account", "Create a user", m.UserCreate, m.User),
    Route("GET", "/v1/users", h_users, "account", "List users", response=m.User, many=True),
    Route("GET", "/v1/users/{user_id}", h_user, "account", "Inspect a user", response=m.User),
    Route(
        "POST",
        "/v1/tokens",
        h_create_token,
        "account",
        "Mint a token",
        m.TokenCreate,
        m.TokenCreated,
    ),
    Route("GET", "/v1/tokens", h_tokens, "account", "List tokens", response=m.TokenInfo, many=True),
    Route(
        "DELETE",
        "/v1/tokens/{token_id}",
        h_revoke_token,
        "account",
        "Revoke a token",
        response=m.Ok,
    ),
)
