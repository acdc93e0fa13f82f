"""`dcp-oss logs`: the telemetry service's command against a running OSS."""

from __future__ import annotations

import asyncio
import sys

import click

from oss import console as con
from oss import models as m

REPORT_INTERVAL = 1.0  # seconds between an agent's telemetry batches (vmagent uplink)


@click.command("logs")
@click.argument("program")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the program ends.")
@click.option("--instance", default=None, help="Only lines from this instance.")
@click.option(
    "--stream",
    type=click.Choice(["stdout", "stderr", "log", "event"]),
    default=None,
    help="Only this stream.",
)
@click.option(
    "--since", default=None, help="Only lines from then on: 30m, 2h, epoch seconds, ISO date."
)
@con.connection()
def logs(
    program: str,
    follow: bool,
    instance: str | None,
    stream: str | None,
    since: str | None,
    target: con.Target,
) -> None:
    """Print PROGRAM's log in time order: `HH:MM:SS.mmm INSTANCE PID STREAM text`
    (like kubectl logs).

    --json: one LogLineOut per line (NDJSON), in the same order.

    \b
    Example:
      dcp-oss logs p-3f2a9c --follow --instance vm2 --stream stderr
    """
    start = con.parse_since(since)
    con.run(_print_logs(target, program, follow, instance, stream, start))


async def _print_logs(
    target: con.Target,
    program: str,
    follow: bool,
    instance: str | None,
    stream: str | None,
    since: float | None,
) -> None:
    from oss.telemetry import logs as logmod

    def line_of(x: m.LogLineOut) -> logmod.LogLine:
        return logmod.LogLine(x.ts, x.stream, x.text, x.instance, x.pid)

    def render(ln: logmod.LogLine) -> str:
        if target.json:
            out = m.LogLineOut(
                ts=ln.ts, stream=ln.stream, text=ln.text, instance=ln.instance, pid=ln.pid
            )
            return out.model_dump_json()
        return logmod.render(ln)

    def emit(lines: list[logmod.LogLine]) -> None:
        if lines:
            sys.stdout.write("".join(render(ln) + "\n" for ln in lines))
            sys.stdout.flush()

    async with target.client() as oss:

        async def links() -> list[tuple[logmod.SessionKey, logmod.SessionKey]]:
            # A nested placement's lines come twice (its instance, the relaying one).
            return logmod.relay_links((await oss.processes(program)).processes)

        if not follow:
            cursor, got = 0, []
            while True:
                page = await oss.logs(
                    program, stream, instance=instance, since=since, cursor=cursor
                )
                got += [line_of(x) for x in page.lines]
                if not page.lines:
                    break
                cursor = page.cursor
            emit(logmod.drop_relayed(sorted(got, key=lambda ln: ln.ts), await links()))
            return
        held = logmod.Reorder(REPORT_INTERVAL + 0.5)
        loop = asyncio.get_running_loop()
        drop = logmod.RelayDropper(REPORT_INTERVAL)
        drop.link(await links())
        looked = loop.time()
        stream_iter = oss.follow(program, stream, instance=instance, since=since).__aiter__()
        nxt: asyncio.Task[m.LogLineOut] | None = None
        try:
            while True:
                if nxt is None:
                    nxt = asyncio.ensure_future(stream_iter.__anext__())
                done, _ = await asyncio.wait({nxt}, timeout=0.25)
                if done:
                    try:
                        x = nxt.result()
                    except StopAsyncIteration:
                        break
                    finally:
                        nxt = None
                    held.push(line_of(x), loop.time())
                ready = held.ready(loop.time())
                if ready and loop.time() - looked >= REPORT_INTERVAL:
                    drop.link(await links())  # sessions placed since the last look
                    looked = loop.time()
                emit(drop(ready, loop.time()))
        finally:
            if nxt is not None:
                nxt.cancel()
        drop.link(await links())
        emit(sorted(drop(held.rest(), loop.time()) + drop.rest(), key=lambda ln: ln.ts))
