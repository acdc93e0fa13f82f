"""`dcp-oss network PROGRAM`: a program's address, its instances and listeners."""

from __future__ import annotations

from typing import Any

import click

from oss import console as con


@click.command("network")
@click.argument("program")
@con.connection()
def network(program: str, target: con.Target) -> None:
    """PROGRAM's address, the instances holding it and its listeners (issue 13).

    --json: {"program_id", "address", "instances", "listeners": [{instance, port,
    proto, bound, pid}]}.

    \b
    Example:
      dcp-oss network p-3f2a9c
    """

    async def go() -> Any:
        async with target.client() as oss:
            return await oss.request("GET", f"/v1/programs/{program}/network")

    shown = con.run(go())
    if target.json:
        return con.emit_json(shown)
    con.fields([("address", shown["address"]), ("instances", " ".join(shown["instances"]))])
    if shown["listeners"]:
        click.echo("")
        con.table(
            ["PROTO", "PORT", "INSTANCE", "BOUND", "PID"],
            [[x["proto"], x["port"], x["instance"], x["bound"], x["pid"]]
             for x in shown["listeners"]],
        )  # fmt: skip
