"""`dcp-oss`: run the OSS, mint credentials."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path

import click
from aiohttp import web

from oss.accounts import cli as accounts_cli
from oss.accounts import credentials
from oss.billing import cli as billing_cli
from oss.billing.pricing import Rates
from oss.compute import cli as compute_cli
from oss.compute.movers import Rules
from oss.compute.pool import Provider
from oss.db import datadir
from oss.errors import OssError
from oss.listener import GuardedSite, ListenerLimits
from oss.network import cli as network_cli
from oss.server import make_app
from oss.service import Oss, OssConfig
from oss.storage import cli as storage_cli
from oss.telemetry import cli as telemetry_cli

log = logging.getLogger(__name__)
DEFAULT_LIMITS = ListenerLimits()


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter("expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


@click.group()
@click.option("--log-level", default="WARNING", show_default=True, help="Python log level.")
def main(log_level: str) -> None:
    """DCP operating system service: run it (serve, lab), set it up (account,
    instance-token), and operate a running one (programs, instances, pools, logs, bill,
    limits, users, migrate, drain, resume; each takes --oss URL and a token, --json for scripts).

    \b
    Example:
      export DCP_OSS=http://127.0.0.1:8470 DCP_TOKEN_FILE=~/.dcp/token
      dcp-oss programs list
      dcp-oss programs show p-3f2a9c
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option(
    "--listen", default="127.0.0.1:8470", show_default=True, help="HOST:PORT (port 0: any)."
)
@click.option(
    "--data", "data_dir", required=True, type=click.Path(path_type=Path), help="State directory."
)
@click.option(
    "--heartbeat-interval", default=1.0, show_default=True, help="Seconds between agent heartbeats."
)
@click.option(
    "--heartbeat-timeout", default=5.0, show_default=True, help="Silent longer -> instance failed."
)
@click.option(
    "--tick", default=1.0, show_default=True, help="Seconds between metering/availability passes."
)
@click.option(
    "--slots-per-cpu", default=4, show_default=True, help="Processes per CPU on an instance."
)
@click.option("--public-url", default=None, help="OSS URL handed to new instances.")
@click.option(
    "--premium-pct", default=20, show_default=True, help="Premium pricing model surcharge."
)
@click.option(
    "--storage-rate", default=0, show_default=True, help="Micros per GiB-second of storage."
)
@click.option("--net-rate", default=0, show_default=True, help="Micros per GiB of network traffic.")
@click.option(
    "--provider",
    "providers",
    multiple=True,
    metavar="NAME=MODULE:FACTORY",
    help=(
        "Instance provider for pools naming NAME: FACTORY() must return an "
        "oss.compute.pool.Provider."
    ),
)
@click.option(
    "--header-timeout",
    default=DEFAULT_LIMITS.header_timeout,
    show_default=True,
    help="Seconds a new connection has to send its first request's headers.",
)
@click.option(
    "--idle-timeout",
    default=DEFAULT_LIMITS.idle_timeout,
    show_default=True,
    help="Seconds a keep-alive connection may sit without a request.",
)
@click.option(
    "--body-timeout",
    default=DEFAULT_LIMITS.body_timeout,
    show_default=True,
    help="Seconds a request body may take to arrive.",
)
@click.option(
    "--max-connections",
    default=DEFAULT_LIMITS.max_connections,
    show_default=True,
    help="Open connections in total; more are closed on arrival.",
)
@click.option(
    "--max-connections-per-peer",
    default=DEFAULT_LIMITS.max_connections_per_peer,
    show_default=True,
    help="Open connections from one address; more are closed on arrival.",
)
@click.option(
    "--idle-grace",
    default=30.0,
    show_default=True,
    help="Seconds an idle pool instance beyond the warm target is kept (autoscaling).",
)
@click.option(
    "--backoff-base",
    default=1.0,
    show_default=True,
    help="A failing provider: wait min(BASE * 2**n, 60) s after n failed creates.",
)
@click.option(
    "--network-prefix",
    default=None,
    metavar="CIDR",
    help=(
        "Give every program one address from this private IPv4 prefix, redirected to its "
        "VMs on --network-bridge (docs/NETWORK.md). Default: no program addresses."
    ),
)
@click.option(
    "--network-bridge", default="", metavar="DEV", help="The bridge the VMs hang on (this host's)."
)
@click.option(
    "--move-min-gain",
    default=1.5,
    show_default=True,
    metavar="RATIO",
    help="Optimizer moves (issue 12): how much faster a CPU-bound process must run on the "
    "instance it would move to (above 1; a large value turns moves off for all programs).",
)
@click.option(
    "--network-netns", default=None, metavar="NS", help="The namespace that bridge lives in."
)
def serve(
    listen: str,
    data_dir: Path,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    tick: float,
    slots_per_cpu: int,
    public_url: str | None,
    premium_pct: int,
    storage_rate: int,
    net_rate: int,
    providers: tuple[str, ...],
    header_timeout: float,
    idle_timeout: float,
    body_timeout: float,
    max_connections: int,
    max_connections_per_peer: int,
    idle_grace: float,
    backoff_base: float,
    network_prefix: str | None,
    network_bridge: str,
    network_netns: str | None,
    move_min_gain: float,
) -> None:
    """Run the OSS HTTP API (and the web view at /ui).

    \b
    Example:
      dcp-oss serve --data /var/lib/dcp --listen 127.0.0.1:8470
    """
    host, port = _hostport(listen)
    loaded = dict(load_provider(spec) for spec in providers)
    if public_url is None and port != 0:
        public_url = f"http://{host}:{port}"
    try:
        config = OssConfig(
            data_dir=data_dir,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            tick=tick,
            slots_per_cpu=slots_per_cpu,
            public_url=public_url,
            rates=Rates(storage_rate, net_rate, premium_pct),
            idle_grace=idle_grace,
            backoff_base=backoff_base,
            move_rules=Rules(min_gain=move_min_gain),
        )
        limits = ListenerLimits(
            header_timeout=header_timeout,
            idle_timeout=idle_timeout,
            body_timeout=body_timeout,
            max_connections=max_connections,
            max_connections_per_peer=max_connections_per_peer,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    network = None
    if network_prefix is not None:  # issue 13: program addresses on VMs
        from oss.network.vms import NetworkOptionError, vm_network_options

        try:
            prefix, bridge_if = vm_network_options(network_prefix, network_bridge, network_netns)
        except NetworkOptionError as exc:
            raise click.UsageError(str(exc)) from exc
        network = (prefix, network_bridge, bridge_if, network_netns)
    elif network_bridge or network_netns:
        raise click.UsageError("--network-bridge/--network-netns need --network-prefix")
    _private_data_dir(data_dir)
    asyncio.run(_serve(config, host, port, loaded, limits, network))


def _private_data_dir(data_dir: Path) -> None:
    """Create the data directory 0700 or refuse, in one line, one others can read."""
    try:
        datadir.prepare(data_dir)
    except OssError as exc:
        raise click.ClickException(exc.message) from exc


def load_provider(spec: str) -> tuple[str, Provider]:
    """Parse NAME=MODULE:FACTORY, import MODULE, call FACTORY(), check it is a Provider."""
    name, eq, target = spec.partition("=")
    module, colon, attr = target.partition(":")
    if not eq or not colon or not name or not module or not attr:
        raise click.BadParameter(f"{spec!r}: expected NAME=MODULE:FACTORY", param_hint="--provider")
    try:
        factory = getattr(importlib.import_module(module), attr)
        provider = factory()
    except Exception as exc:  # any import/constructor failure is a bad flag value
        raise click.BadParameter(f"{spec!r}: {exc!r}", param_hint="--provider") from exc
    for method in ("create", "destroy"):
        if not inspect.iscoroutinefunction(getattr(provider, method, None)):
            raise click.BadParameter(
                f"{spec!r}: {type(provider).__name__} has no async {method}()",
                param_hint="--provider",
            )
    return name, provider


# The event loop shares the GIL with the SQLite threads; a short switch interval bounds
# how long a loop callback waits for it (the default 5 ms shows up directly in p99).
GIL_SWITCH_INTERVAL = 0.0005
SHUTDOWN_TIMEOUT = 5.0  # seconds open requests (log followers) get on SIGTERM


async def _serve(
    config: OssConfig,
    host: str,
    port: int,
    providers: dict[str, Provider] | None = None,
    limits: ListenerLimits | None = None,
    network: tuple[ipaddress.IPv4Network, str, ipaddress.IPv4Interface, str | None] | None = None,
) -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    limits = limits or ListenerLimits()
    oss = Oss(config, providers)
    if network is not None:
        prefix, bridge_dev, bridge_if, netns = network
        oss.use_vm_network(prefix, bridge_dev, bridge_if.network, str(bridge_if.ip), netns)
    runner = web.AppRunner(
        make_app(oss, limits=limits),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        **limits.runner_args(),
    )
    await runner.setup()
    site = GuardedSite(runner, host, port, limits, backlog=1024)
    await site.start()
    addr = runner.addresses[0]
    if config.public_url is None:
        # Listening on an ephemeral port: new instances get the address it got.
        oss.pools.public_url = f"http://{addr[0]}:{addr[1]}"
    click.echo(f"dcp-oss listening on http://{addr[0]}:{addr[1]}", nl=True)
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        for provider in (providers or {}).values():
            close = getattr(provider, "close", None)
            if callable(close):  # local instances: stop their agents
                await asyncio.to_thread(close)


@main.command("instance-token")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path))
@click.option(
    "--pool", default=None, help="Pool the instance belongs to (sets its type and price)."
)
@click.argument("name")
def instance_token(data_dir: Path, pool: str | None, name: str) -> None:
    """Create instance NAME (or re-key it) and print its bearer token.

    \b
    Example:
      (umask 077; dcp-oss instance-token --data /var/lib/dcp vm1 > vm1.token)
    """
    try:
        click.echo(credentials.mint_instance_token_sync(data_dir, name, pool))
    except OssError as exc:
        raise click.ClickException(exc.message) from exc


@main.group()
def account() -> None:
    """Manage accounts (on the OSS's data directory).

    \b
    Example:
      dcp-oss account create --data /var/lib/dcp --admin ops
    """


@account.command("create")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path))
@click.option("--admin", is_flag=True, help="An operator account (manages accounts, pools).")
@click.option("--pricing", type=click.Choice(["sum", "premium"]), default="sum", show_default=True)
@click.option("--user", default="admin", show_default=True, help="Name of the first user.")
@click.option(
    "--allow-root",
    is_flag=True,
    help="Its processes may run as uid/gid 0 on instances (default: refused).",
)
@click.argument("name")
def account_create(
    data_dir: Path, admin: bool, pricing: str, user: str, allow_root: bool, name: str
) -> None:
    """Create account NAME and print its first user's token (ids on stderr).

    \b
    Example:
      (umask 077; dcp-oss account create --data /var/lib/dcp acme > acme.token)
    """
    try:
        cred = credentials.create_account_sync(
            data_dir, name, admin=admin, pricing_model=pricing, user=user, allow_root=allow_root
        )
    except OssError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(f"account {cred.account_id} user {cred.user_id}", err=True)
    click.echo(cred.token)


@main.command()
@click.option(
    "--config",
    "config_file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Lab file (TOML): [libvirt], optional [libvirtd] and [[pools]] (docs/VMS.md).",
)
@click.option(
    "--data", "data_dir", required=True, type=click.Path(path_type=Path), help="State directory."
)
@click.option(
    "--listen",
    default="127.0.0.1:8470",
    show_default=True,
    help="HOST:PORT on the host for operators and clients (port 0: any; 'none': not served).",
)
@click.option(
    "--guest-port",
    default=8470,
    show_default=True,
    help="Port on the bridge's gateway address (in the lab namespace) the instances use.",
)
@click.option(
    "--public-url", default=None, help="OSS URL for the instances instead of the bridge gateway."
)
@click.option("--heartbeat-interval", default=1.0, show_default=True)
@click.option("--heartbeat-timeout", default=5.0, show_default=True)
@click.option("--tick", default=1.0, show_default=True)
@click.option("--slots-per-cpu", default=4, show_default=True)
@click.option(
    "--network-prefix",
    default=None,
    metavar="CIDR",
    help="Program addresses from this private IPv4 prefix, on the lab's bridge (NETWORK.md).",
)
def lab(
    config_file: Path,
    data_dir: Path,
    listen: str,
    guest_port: int,
    public_url: str | None,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    tick: float,
    slots_per_cpu: int,
    network_prefix: str | None,
) -> None:
    """Run the OSS with libvirt VMs: own libvirtd, provider, warm pools (stopped on exit).

    \b
    Example:
      dcp-oss lab --config docs/lab.example.toml --data /var/lib/dcp-lab
    """
    from oss import lab as labmod
    from oss.compute.providers.libvirtd import LibvirtdError

    addr = None if listen == "none" else _hostport(listen)
    prefix = None
    if network_prefix is not None:
        from oss.network.vms import NetworkOptionError, checked_prefix

        try:
            prefix = checked_prefix(network_prefix)
        except NetworkOptionError as exc:
            raise click.UsageError(str(exc)) from exc
    try:
        cfg = labmod.load_config(config_file)
        labmod.check_files(cfg)
        oss_config = OssConfig(
            data_dir=data_dir,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            tick=tick,
            slots_per_cpu=slots_per_cpu,
            public_url=public_url,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    except OssError as exc:
        raise click.ClickException(exc.message) from exc

    def announce(a: labmod.LabAddresses) -> None:
        if a.url is not None:
            click.echo(f"dcp-oss listening on {a.url}")
        click.echo(f"dcp-oss instances use {a.guest_url} (netns {a.netns or '-'})")
        if a.daemon_pids:
            click.echo(
                "dcp-oss libvirtd pid {libvirtd} virtlogd pid {virtlogd}".format(**a.daemon_pids)
            )
        sys.stdout.flush()

    async def run() -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        owner = os.getpid()

        # Not loop.add_signal_handler: pyroute2 forks helpers to work inside a namespace
        # and SIGTERMs them when done; with the loop's wakeup fd (shared after fork) a
        # helper's SIGTERM would reach this loop as ours. A helper dies as by default.
        def on_signal(signum: int, _frame: object) -> None:
            if os.getpid() != owner:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            loop.call_soon_threadsafe(stop.set)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        await labmod.serve_lab(cfg, oss_config, addr, guest_port, stop, announce, prefix)

    try:
        asyncio.run(run())
    except OssError as exc:
        raise click.ClickException(exc.message) from exc
    except ImportError as exc:
        raise click.ClickException(f"{exc} (pip install '.[vm]')") from exc
    except (LibvirtdError, OSError) as exc:
        raise click.ClickException(str(exc) or type(exc).__name__) from exc
    except Exception as exc:  # net.bridge's NetError, libvirt: still one line, not a trace
        log.debug("lab failed", exc_info=True)
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


if __name__ == "__main__":
    main()


COMPLETION_HELP = """Print the shell completion script for SHELL (click's).

\b
Example (bash; zsh and fish alike):
  eval "$(dcp-oss completion bash)"
  dcp-oss completion bash > /etc/bash_completion.d/dcp-oss
"""


@main.command("completion", help=COMPLETION_HELP)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(main, {}, "dcp-oss", "_DCP_OSS_COMPLETE").source())


def _account_token() -> str:
    """The account token from DCP_TOKEN (kept for commands written before oss.console:
    new ones take `@oss.console.connection()`, which adds --oss and --token-file)."""
    from oss import console

    return console.account_token(None)


MIGRATE_WAIT = compute_cli.MIGRATE_WAIT  # s: where the migrate/drain commands wait

# Commands against a running OSS (--oss URL, token file or DCP_TOKEN: oss.console), each
# in its service's room; one line per command or group here.
main.add_command(compute_cli.programs)
main.add_command(compute_cli.instances)
main.add_command(compute_cli.pools)
main.add_command(compute_cli.migrate)
main.add_command(compute_cli.drain)
main.add_command(compute_cli.resume)
main.add_command(telemetry_cli.logs)
main.add_command(billing_cli.bill)
main.add_command(billing_cli.limits)
main.add_command(accounts_cli.users)
main.add_command(network_cli.network)
main.add_command(storage_cli.storage)  # issue 14: a program's files, tiers, moves
