"""`dcp-oss storage ls PROGRAM`: each file's tier, size and heat, the moves and their reasons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from oss.local import default_data_dir


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@click.group()
def storage() -> None:
    """A program's storage: files, tiers, moves, billing.

    \b
    Example:
      dcp-oss storage ls
      dcp-oss storage ls s-3f2a9c --json
    """


@storage.command("ls")
@click.argument("program", required=False)
@click.option("--data", "data_dir", type=click.Path(path_type=Path), help="State directory.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def ls(program: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Each file of PROGRAM's storage (its tier, size and heat per instance) and its moves.

    Without PROGRAM, the programs whose storage is recorded.

    \b
    Example:
      dcp-oss storage ls s-3f2a9c
    """
    root = (data_dir or default_data_dir()) / "storage"
    if program is None:
        for d in sorted(root.glob("*")):
            if d.is_dir():
                click.echo(d.name)
        return
    state = root / program
    if "/" in program or program.startswith(".") or not state.is_dir():
        raise click.ClickException(f"no storage recorded for program {program!r} under {root}")
    reports = {p.name[7:-5]: _load(p) for p in sorted(state.glob("report-*.json"))}
    billing = _load(state / "billing.json") or {}
    names = _load(state / "volumes.json") or {}

    def shown(path: str) -> str:  # /v0/rel -> the path the program names
        head, _, rest = path.lstrip("/").partition("/")
        return f"{names[head].rstrip('/')}/{rest}" if head in names else path

    if as_json:
        click.echo(json.dumps({"instances": reports, "billing": billing}, indent=1))
        return
    click.echo(f"{'INSTANCE':10} {'TIER':7} {'SIZE':>12} {'READS':>6} {'WRITES':>6}  PATH")
    moves = []
    for instance, report in reports.items():
        if not isinstance(report, dict):
            continue
        for path, f in sorted(report.get("files", {}).items()):
            click.echo(
                f"{instance:10} {f.get('tier', '?'):7} {f.get('size', 0):>12} "
                f"{f.get('reads', 0):>6} {f.get('writes', 0):>6}  {shown(path)}"
            )
        moves += [(m.get("time", 0), instance, m) for m in report.get("moves", [])]
    click.echo("moves:")
    for _when, instance, m in sorted(moves, key=lambda x: x[0]):
        click.echo(
            f"  {instance}: {shown(str(m.get('path')))} "
            f"{m.get('from')} -> {m.get('to')}: {m.get('reason')}"
        )
    for tier, gs in sorted(billing.get("gib_seconds", {}).items()):
        price = billing.get("prices", {}).get(tier, 0)
        click.echo(f"billing: {tier}: {gs:.6f} GiB-s x {price} micros = {gs * price:.3f} micros")
