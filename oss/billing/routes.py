"""The billing service's HTTP routes: limits at account, user and program level, billing records."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import Field

from oss import models as m
from oss.accounts.store import Principal
from oss.api import PROGRAM_PATH, Route, principal
from oss.service import Oss


async def _limits_scope(oss: Oss, r: web.Request, p: Principal) -> tuple[str, str]:
    if "user_id" in r.match_info:
        uid = r.match_info["user_id"]
        await oss.accounts.users(p.account_id, uid)
        return "user", uid
    if "program_id" in r.match_info:
        pid = r.match_info["program_id"]
        await oss.programs.program(p.account_id, pid)
        return "program", pid
    return "account", p.account_id


async def h_get_limits(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.LimitsBody:
    scope, sid = await _limits_scope(oss, r, principal(who))
    return m.LimitsBody(**await oss.billing.get_limits(scope, sid))


async def h_put_limits(oss: Oss, r: web.Request, who: Any, b: m.LimitsBody, q: Any) -> m.LimitsBody:
    scope, sid = await _limits_scope(oss, r, principal(who))
    await oss.billing.set_limits(scope, sid, b.model_dump(exclude_none=True))
    return b


async def h_billing(oss: Oss, r: web.Request, who: Any, b: Any, q: m.BillingQuery) -> m.Billing:
    p = principal(who)
    if q.user_id is not None:
        await oss.accounts.users(p.account_id, q.user_id)  # 404 for another account's
    total, recs = await oss.billing.billing(
        p.account_id, r.match_info.get("program_id"), q.since, q.user_id
    )
    return m.Billing(total_micros=total, records=[m.BillingRecord(**x) for x in recs])


class SpendQuery(m.Api):
    """`?limit=N`: the newest N programs."""

    limit: int = Field(200, ge=1, le=10_000)


async def h_spend(oss: Oss, r: web.Request, who: Any, b: Any, q: SpendQuery) -> m.SpendReport:
    p = principal(who)
    users = {u["id"]: u["name"] for u in await oss.accounts.users(p.account_id)}
    acct = await oss.accounts.accounts(p.account_id)
    got = await oss.billing.spend(p.account_id, users, q.limit)
    got["account"]["name"] = acct[0]["name"] if acct else ""
    return m.SpendReport.model_validate(got)


P = PROGRAM_PATH
ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/users/{user_id}/limits",
        h_get_limits,
        "account",
        "User limits",
        response=m.LimitsBody,
    ),
    Route(
        "PUT",
        "/v1/users/{user_id}/limits",
        h_put_limits,
        "account",
        "Set user limits",
        m.LimitsBody,
        m.LimitsBody,
    ),
    Route("GET", "/v1/limits", h_get_limits, "account", "Account limits", response=m.LimitsBody),
    Route(
        "PUT",
        "/v1/limits",
        h_put_limits,
        "account",
        "Set account limits",
        m.LimitsBody,
        m.LimitsBody,
    ),
    Route("GET", P + "/limits", h_get_limits, "account", "Program limits", response=m.LimitsBody),
    Route(
        "PUT",
        P + "/limits",
        h_put_limits,
        "account",
        "Set program limits",
        m.LimitsBody,
        m.LimitsBody,
    ),
    Route(
        "GET",
        P + "/billing",
        h_billing,
        "account",
        "Program billing",
        response=m.Billing,
        query=m.BillingQuery,
    ),
    Route(
        "GET",
        "/v1/billing",
        h_billing,
        "account",
        "Account billing",
        response=m.Billing,
        query=m.BillingQuery,
    ),
    Route(
        "GET",
        "/v1/spend",
        h_spend,
        "account",
        "Spend against budget: the account, its users, its newest programs",
        response=m.SpendReport,
        query=SpendQuery,
    ),
)
