"""`dcp-oss bill|limits`: the billing service's commands against a running OSS."""

from __future__ import annotations

from typing import Any

import click

from oss import console as con
from oss import models as m

LIMIT_FIELDS = {  # option -> LimitsBody field
    "budget": "budget_micros",
    "hard_budget": "hard_budget_micros",
    "max_instances": "max_instances",
    "max_storage_mb": "max_storage_mb",
    "max_bandwidth_mbps": "max_bandwidth_mbps",
}


async def _user_id(oss: Any, user: str) -> str:
    """A user's id from its name or id (one of the caller's account)."""
    for u in await oss.request("GET", "/v1/users"):
        if user in (u["id"], u["name"]):
            return str(u["id"])
    con.fail(f"no user {user} in this account")


@click.command("bill")
@click.argument("program", required=False)
@click.option("--account", "whole", is_flag=True, help="The whole account (the default).")
@click.option("--user", default=None, help="Only this user's programs (name or id).")
@click.option("--since", default=None, help="Records ending from then on: 30m, 2h, 7d, epoch, ISO.")
@click.option("--records", is_flag=True, help="Every metering record, not the sum by program.")
@con.connection()
def bill(
    program: str | None,
    whole: bool,
    user: str | None,
    since: str | None,
    records: bool,
    target: con.Target,
) -> None:
    """What PROGRAM, a --user or the --account was billed (like sacct): the sum by program
    and the total, in account currency (6 decimals).

    --json: Billing (its records, filtered as asked, and their total).

    \b
    Example:
      dcp-oss bill --user alice --since 7d
    """
    if sum(x is not None and x is not False for x in (program, user, whole or None)) > 1:
        raise click.UsageError("give one of PROGRAM, --user or --account")
    start = con.parse_since(since)

    async def go() -> m.Billing:
        async with target.client() as oss:
            uid = await _user_id(oss, user) if user else None
            path = f"/v1/programs/{program}/billing" if program else "/v1/billing"
            raw = await oss.request("GET", path, params={"since": start, "user_id": uid})
            return m.Billing.model_validate(raw)

    got = con.run(go())
    if target.json:
        return con.emit_json(got)
    if records:
        con.table(
            ["PROGRAM", "USER", "START", "END", "SECONDS", "MODEL", "AMOUNT"],
            [
                [r.program_id, r.user_id, con.when(r.start), con.when(r.end), r.seconds,
                 r.model.value, con.money(r.amount_micros)]
                for r in got.records
            ],
        )  # fmt: skip
    else:
        by: dict[str, list[Any]] = {}
        for r in got.records:
            row = by.setdefault(r.program_id, [r.program_id, r.user_id, 0, 0, 0])
            row[2] += r.seconds
            row[3] += 1
            row[4] += r.amount_micros
        con.table(
            ["PROGRAM", "USER", "SECONDS", "RECORDS", "AMOUNT"],
            [[*row[:4], con.money(row[4])] for row in by.values()],
        )
    click.echo(f"total {con.money(got.total_micros)} ({len(got.records)} records)")


@click.group()
def limits() -> None:
    """Limits and budgets at the three levels: the account (default), a --user, a --program.

    \b
    Example:
      dcp-oss limits set --user alice --budget 5000000 --max-instances 10
      dcp-oss limits show --user alice
    """


def _level(user: str | None, program: str | None) -> None:
    if user and program:
        raise click.UsageError("give at most one of --user and --program")


async def _path(oss: Any, user: str | None, program: str | None) -> str:
    if user:
        return f"/v1/users/{await _user_id(oss, user)}/limits"
    if program:
        return f"/v1/programs/{program}/limits"
    return "/v1/limits"


def _show(level: str, body: m.LimitsBody) -> None:
    values = body.model_dump()
    con.fields(
        [("level", level)]
        + [
            (name, "unlimited" if values[f] is None else values[f])
            for name, f in (
                ("budget (micros)", "budget_micros"),
                ("hard budget (micros)", "hard_budget_micros"),
                ("max instances", "max_instances"),
                ("max storage MB", "max_storage_mb"),
                ("max bandwidth Mbps", "max_bandwidth_mbps"),
            )
        ]
    )


@limits.command("show")
@click.option("--user", default=None, help="A user's limits (name or id).")
@click.option("--program", default=None, help="A program's limits.")
@con.connection()
def limits_show(user: str | None, program: str | None, target: con.Target) -> None:
    """The limits at one level (unlimited where none is set).  --json: LimitsBody.

    \b
    Example:
      dcp-oss limits show --program p-3f2a9c
    """
    _level(user, program)

    async def go() -> m.LimitsBody:
        async with target.client() as oss:
            return m.LimitsBody.model_validate(
                await oss.request("GET", await _path(oss, user, program))
            )

    got = con.run(go())
    if target.json:
        return con.emit_json(got)
    _show(f"user {user}" if user else f"program {program}" if program else "account", got)


NonNeg = click.IntRange(0, 2**62)


@limits.command("set")
@click.option("--user", default=None, help="A user's limits (name or id).")
@click.option("--program", default=None, help="A program's limits.")
@click.option("--budget", type=NonNeg, default=None, help="Soft budget, micros (warns).")
@click.option("--hard-budget", type=NonNeg, default=None, help="Hard budget, micros (stops).")
@click.option("--max-instances", type=NonNeg, default=None)
@click.option("--max-storage-mb", type=NonNeg, default=None)
@click.option("--max-bandwidth-mbps", type=NonNeg, default=None)
@click.option(
    "--clear",
    "cleared",
    multiple=True,
    type=click.Choice(sorted(LIMIT_FIELDS)),
    help="Make this one unlimited (repeatable).",
)
@con.connection()
def limits_set(
    user: str | None,
    program: str | None,
    cleared: tuple[str, ...],
    target: con.Target,
    **given: int | None,
) -> None:
    """Change the limits at one level; the others keep their values.  --json: LimitsBody.

    \b
    Example:
      dcp-oss limits set --hard-budget 20000000 --clear max_instances
    """
    _level(user, program)
    changes = {LIMIT_FIELDS[k]: v for k, v in given.items() if v is not None}
    if not changes and not cleared:
        raise click.UsageError("nothing to set: give a limit option or --clear")

    async def go() -> m.LimitsBody:
        async with target.client() as oss:
            path = await _path(oss, user, program)
            now = m.LimitsBody.model_validate(await oss.request("GET", path)).model_dump()
            now.update(changes)
            for k in cleared:
                now[LIMIT_FIELDS[k]] = None
            body = m.LimitsBody.model_validate(now)
            return m.LimitsBody.model_validate(await oss.request("PUT", path, body))

    got = con.run(go())
    if target.json:
        return con.emit_json(got)
    _show(f"user {user}" if user else f"program {program}" if program else "account", got)
