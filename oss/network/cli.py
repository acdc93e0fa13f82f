"""`dcp-oss network PROGRAM`: a program's address, its instances and listeners."""

from __future__ import annotations

import asyncio
import os
import sys

import click

from oss.errors import OssError


@click.command("network")
@click.argument("program")
@click.option("--url", envvar="DCP_OSS_URL", required=True, help="OSS base URL.")
def network(program: str, url: str) -> None:
    """Show PROGRAM's address, the instances holding it and its listeners (DCP_TOKEN)."""
    from oss.client import OssClient

    token = os.environ.get("DCP_TOKEN", "").strip()
    if not token:
        raise click.UsageError("set the account token in the environment variable DCP_TOKEN")

    async def go() -> object:
        async with OssClient(url, token, timeout=30) as oss:
            return await oss.request("GET", f"/v1/programs/{program}/network")

    try:
        shown = asyncio.run(go())
    except OssError as exc:
        click.echo(f"dcp-oss network: {exc}", err=True)
        sys.exit(1)
    assert isinstance(shown, dict)
    click.echo(f"address {shown['address']}")
    click.echo(f"instances {' '.join(shown['instances']) or '-'}")
    for x in shown["listeners"]:
        click.echo(
            f"listen {x['proto']}/{x['port']} on {x['instance']} ({x['bound']}, pid {x['pid']})"
        )
