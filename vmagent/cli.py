"""`dcp-agent` / `python3 -m vmagent`: the daemon on every compute instance."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from secrets import token_hex

import click

from vmagent.agent import Agent
from vmagent.config import AgentConfig, ConfigError, parse_hostport, read_token
from vmagent.cpuscore import CpuScore
from vmagent.osslink import OssLink, advertised_address
from vmagent.telemetry.reporter import Reporter
from vmagent.telemetry.uplink import HttpPost, Uplink
from vmagent.trace.listeners import trap_relayed
from vmagent.trace.zygote import Tracing

log = logging.getLogger(__name__)


async def serve(config: AgentConfig, tracing: Tracing) -> None:
    """Run the agent until SIGTERM/SIGINT."""
    if config.hostname:
        socket.sethostname(config.hostname)
    agent = Agent(config, tracing)
    address = await agent.start()
    # The parent (LocalCluster, an init script) reads this line to learn the port.
    print(f"listening {address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.lifeline is not None:
        lifeline = config.lifeline

        def parent_gone() -> None:
            try:
                if os.read(lifeline, 64):
                    return
            except BlockingIOError:
                return
            except OSError:
                pass
            log.warning("the process that started this agent is gone: stopping")
            loop.remove_reader(lifeline)
            stop.set()

        os.set_blocking(lifeline, False)
        loop.add_reader(lifeline, parent_gone)
    try:
        async with asyncio.TaskGroup() as tasks:
            link_task = None
            telemetry = None
            if config.oss_url:
                port = int(address.rpartition(":")[2])
                link = OssLink(
                    config.oss_url,
                    config.instance,
                    config.token,
                    advertised_address(config.listen_host, port, config.oss_url),
                    agent.sampler.sample,
                    agent.sampler.memory_mb(),
                    config.call_timeout,
                    config.exec_key,
                    on_commands=agent.on_commands,
                    can_checkpoint=agent.can_checkpoint,
                    # issue 12: optimizer moves compare speeds
                    speed=CpuScore().once if config.cpu_score else None,
                )
                link_task = tasks.create_task(link.run())
                telemetry = start_telemetry(agent, config, tasks)
            await stop.wait()
            if link_task is not None:
                link_task.cancel()
            if telemetry is not None:
                await telemetry.stop()
    finally:
        await agent.close()


class Telemetry:
    """The agent's telemetry: the reporter observing sessions and its uplink to the OSS."""

    def __init__(self, reporter: Reporter, post: HttpPost, tasks: list[asyncio.Task[None]]) -> None:
        self.reporter = reporter
        self.post = post
        self.tasks = tasks

    async def stop(self) -> None:
        """Send what waits (briefly), then stop."""
        await self.reporter.uplink.drain(2.0)
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.post.close()


def start_telemetry(agent: Agent, config: AgentConfig, tasks: asyncio.TaskGroup) -> Telemetry:
    """Report every OSS program's usage, output and events (issue 10)."""
    assert config.oss_url is not None
    post = HttpPost(config.oss_url, config.token, config.call_timeout)
    uplink = Uplink(config.instance, post)
    reporter = Reporter(uplink)
    agent.service.hooks.add(reporter)
    # Limits act: the enforcer's frozen/killed acts become the program's events.
    agent.enforcer.on_event = reporter.program_event
    return Telemetry(
        reporter,
        post,
        [
            tasks.create_task(uplink.run(), name="telemetry-uplink"),
            tasks.create_task(reporter.run(), name="telemetry-sampler"),
        ],
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--oss", "oss_url", envvar="DCP_OSS_URL", default=None, help="OSS base URL.")
@click.option("--instance", envvar="DCP_INSTANCE", required=True, help="Instance name.")
@click.option(
    "--token-file",
    default=None,
    help="File holding the instance token (a regular file, mode 0600, owned by this user).",
)
@click.option(
    "--token-fd",
    type=int,
    default=None,
    help="Read the instance token from this inherited fd to EOF (the starter writes it).",
)
@click.option("--listen", envvar="DCP_LISTEN", default="0.0.0.0:7070", show_default=True)
@click.option("--hostname", default=None, help="Set the UTS hostname first (own namespace).")
@click.option(
    "--reconnect-window",
    default=10.0,
    show_default=True,
    type=float,
    help="Seconds a session waits for its deputy to reconnect.",
)
@click.option(
    "--lifeline",
    type=int,
    default=None,
    help="Stop when this inherited fd reaches EOF (the starter died).",
)
@click.option(
    "--migrate-fast/--no-migrate-fast",
    envvar="DCP_MIGRATE_FAST",
    default=True,
    show_default=True,
    help="Migrations: pre-copy rounds and pages through the target's CRIU page server "
    "(off: one frozen dump, its images packed over HTTP).",
)
@click.option(
    "--cpu-score/--no-cpu-score",
    envvar="DCP_CPU_SCORE",
    default=True,
    show_default=True,
    help="Measure this instance's CPU speed (~1 s of CPU) and send it when registering "
    "(the optimizer compares instances by it).",
)
@click.option("-v", "--verbose", is_flag=True)
def main(
    oss_url: str | None,
    instance: str,
    token_file: str | None,
    token_fd: int | None,
    listen: str,
    hostname: str | None,
    reconnect_window: float,
    lifeline: int | None,
    migrate_fast: bool,
    cpu_score: bool,
    verbose: bool,
) -> None:
    """Serve exec sessions for deputies; register and heartbeat with the OSS."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format=f"%(asctime)s agent[{instance}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        host, port = parse_hostport(listen)
        config = AgentConfig(
            instance=instance,
            token=read_token(token_file, token_fd),
            listen_host=host,
            listen_port=port,
            oss_url=oss_url or None,
            # With an OSS, clients get exec tickets from it, MAC'd with this key.
            exec_key=token_hex(32) if oss_url else None,
            hostname=hostname,
            reconnect_window=reconnect_window,
            lifeline=lifeline,
            migrate_fast=migrate_fast,
            cpu_score=cpu_score,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    # Issue 13: sendmsg is checked for descriptors only where AF_UNIX relays can exist.
    trap_relayed(bool(config.oss_url) and not str(config.oss_url).startswith("unix:"))
    # The instance tracer's zygote: forked here, before the loop or any thread.
    tracing = Tracing.fork(config.instance)
    try:
        asyncio.run(serve(config, tracing))
    except OSError as exc:
        click.echo(f"dcp-agent: {exc}", err=True)
        sys.exit(1)
