"""`dcp-oss users`: the accounts service's commands against a running OSS."""

from __future__ import annotations

import click

from oss import console as con
from oss import models as m


@click.group()
def users() -> None:
    """The users of the account: list them, add one, mint a token for one.

    \b
    Example:
      dcp-oss users create alice
      dcp-oss users token alice --label laptop > ~/.dcp/alice.token
    """


@users.command("list")
@con.connection()
def users_list(target: con.Target) -> None:
    """Users: ID NAME CREATED.  --json: a list of User.

    \b
    Example:
      dcp-oss users list
    """

    async def go() -> list[m.User]:
        async with target.client() as oss:
            return [m.User.model_validate(u) for u in await oss.request("GET", "/v1/users")]

    got = con.run(go())
    if target.json:
        return con.emit_json(got)
    con.table(["ID", "NAME", "CREATED"], [[u.id, u.name, con.when(u.created)] for u in got])


@users.command("create")
@click.argument("name")
@con.connection()
def users_create(name: str, target: con.Target) -> None:
    """Add user NAME to the account and print its id.  --json: User.

    \b
    Example:
      dcp-oss users create alice
    """
    try:
        body = m.UserCreate(name=name)
    except ValueError:
        raise click.BadParameter(
            f"{name!r}: letters, digits, '_', '.', '-' (first a letter or digit), at most 63",
            param_hint="NAME",
        ) from None

    async def go() -> m.User:
        async with target.client() as oss:
            return m.User.model_validate(await oss.request("POST", "/v1/users", body))

    u = con.run(go())
    if target.json:
        return con.emit_json(u)
    click.echo(f"user {u.name}: {u.id}")


@users.command("token")
@click.argument("user", required=False)
@click.option("--label", default="", help="What the token is for (shown by token lists).")
@con.connection()
def users_token(user: str | None, label: str, target: con.Target) -> None:
    """Mint a token for USER (name or id; default: the caller) and print it on stdout, once.

    Keep it in a file only its owner may read (`umask 077`), as --token-file wants.
    --json: TokenCreated.

    \b
    Example:
      (umask 077; dcp-oss users token alice --label ci > alice.token)
    """

    async def go() -> m.TokenCreated:
        async with target.client() as oss:
            uid = None
            if user:
                everyone = await oss.request("GET", "/v1/users")
                found = [u for u in everyone if user in (u["id"], u["name"])]
                if not found:
                    con.fail(f"no user {user} in this account")
                uid = found[0]["id"]
            return await oss.create_token(uid, label)  # type: ignore[no-any-return]

    t = con.run(go())
    if target.json:
        return con.emit_json(t)
    click.echo(t.token)
