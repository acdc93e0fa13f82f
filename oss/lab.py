"""`dcp-oss lab`: the OSS with a libvirt provider, a private libvirtd and warm pools.

A lab file (TOML) says what to start:

    [libvirt]          # oss.compute.providers.domain.config_from_mapping (unknown keys rejected)
    [libvirtd]         # optional: our own virtlogd + libvirtd, in a namespace we create
    [[pools]]          # optional: pools created/resized at start-up (provider "libvirt")

Pure part first (`parse_config`: TOML data -> a frozen, validated `LabConfig`),
then the adapter `serve_lab`, which starts, in order, the private libvirtd, the
provider (bridge, overlay pool), the OSS (serving on the host and on the
bridge's gateway inside the lab namespace) and the pools, and on stop releases
them in reverse order: the HTTP sites, the pools' instances (marked destroyed),
the OSS, the provider (every domain, overlay, the bridge), the daemons (by PID)
and the namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from net import bridge
from net.bridge import NetError
from oss.compute.instances import Instances
from oss.compute.pool import InstanceType
from oss.compute.providers.domain import (
    LibvirtConfig,
    ProviderError,
    config_from_mapping,
    parse_uri,
)
from oss.compute.providers.libvirt import LibvirtProvider
from oss.compute.providers.libvirtd import LibvirtdConfig, PrivateLibvirtd
from oss.errors import OssError
from oss.listener import GuardedSite, GuardedSockSite, ListenerLimits
from oss.server import make_app
from oss.service import Oss, OssConfig

log = logging.getLogger(__name__)

PROVIDER = "libvirt"  # the provider name the lab's pools use
TOP_LEVEL = ("libvirt", "libvirtd", "pools")
LIVE = ("pending", "ready")
# Destroying every domain and the bridge; each libvirt call has its own call_timeout too.
PROVIDER_CLOSE_TIMEOUT = 120.0


class LabConfigError(OssError):
    """Bad lab configuration."""

    code = "lab_config"


# ---- the file's tables (wire types) ---------------------------------------------------

_Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LibvirtdTable(_Strict):
    """`[libvirtd]`: start our own virtlogd + libvirtd (no systemd)."""

    netns: str | None = "dcp-lab"  # "" runs the daemons in the host's namespace
    run_dir: str = str(LibvirtdConfig.run_dir)  # pid files
    start_timeout: Annotated[float, Field(gt=0)] = LibvirtdConfig.start_timeout
    stop_timeout: Annotated[float, Field(gt=0)] = LibvirtdConfig.stop_timeout


class PoolTable(_Strict):
    """One `[[pools]]` entry: a pool of `instance_type` VMs kept `warm_target` idle."""

    name: _Name
    instance_type: _Name
    cpus: Annotated[int, Field(ge=1, le=4096)] = 1
    memory_mb: Annotated[int, Field(ge=128, le=2**20)] = 512
    price_micros_per_s: Annotated[int, Field(ge=0)] = 0
    storage: _Name | None = None
    warm_target: Annotated[int, Field(ge=0, le=1000)] = 0
    max_size: Annotated[int, Field(ge=0, le=1000)] = 10


@dataclass(frozen=True)
class PoolSpec:
    """A pool the lab creates (or resizes) at start-up."""

    name: str
    instance_type: InstanceType
    warm_target: int
    max_size: int


@dataclass(frozen=True)
class LabConfig:
    """Everything `dcp-oss lab` starts, validated."""

    libvirt: LibvirtConfig
    libvirtd: LibvirtdConfig | None
    pools: tuple[PoolSpec, ...]

    @property
    def guest_netns(self) -> str | None:
        """The namespace where the guests' bridge lives (the OSS listens there for them)."""
        return self.libvirt.bridge_netns

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The bridge's address: the guests reach the OSS there."""
        return self.libvirt.subnet[1]


def load_config(path: Path) -> LabConfig:
    """Read and validate a lab file."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise LabConfigError(f"{path}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LabConfigError(f"{path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise LabConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse_config(data)
    except LabConfigError as exc:
        raise LabConfigError(f"{path}: {exc.detail}") from exc


def parse_config(data: Mapping[str, Any]) -> LabConfig:
    """A `LabConfig` from the file's data; unknown keys and bad values are errors."""
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise LabConfigError(
            f"unknown table(s) {', '.join(unknown)} (known: {', '.join(TOP_LEVEL)})"
        )
    daemon = _libvirtd(data.get("libvirtd"))
    libvirt = _libvirt(data.get("libvirt"), daemon)
    pools = _pools(data.get("pools", []), libvirt)
    return LabConfig(libvirt, daemon, pools)


def _libvirtd(raw: Any) -> LibvirtdConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise LabConfigError("[libvirtd] must be a table")
    t = _validate(LibvirtdTable, raw, "libvirtd")
    if t.netns is not None and ("/" in t.netns or len(t.netns) > 64):
        raise LabConfigError(f"libvirtd.netns: bad namespace name {t.netns!r}")
    return LibvirtdConfig(
        netns=t.netns or None,
        run_dir=Path(t.run_dir),
        start_timeout=t.start_timeout,
        stop_timeout=t.stop_timeout,
    )


def _libvirt(raw: Any, daemon: LibvirtdConfig | None) -> LibvirtConfig:
    if not isinstance(raw, Mapping):
        raise LabConfigError("a [libvirt] table is required (image_dir, state_dir, ...)")
    values = dict(raw)
    for key in ("image_dir", "state_dir"):
        if key not in values:
            raise LabConfigError(f"libvirt.{key} is required")
    if daemon is not None:
        # Our own daemon answers on the local system socket, inside its namespace.
        uri = values.setdefault("uri", "qemu:///system")
        if uri != "qemu:///system":
            raise LabConfigError(
                f"libvirt.uri is {uri!r}, but with [libvirtd] the lab's own daemon is"
                " qemu:///system (drop one of them)"
            )
        ns = values.setdefault("bridge_netns", daemon.netns)
        if ns != daemon.netns:
            raise LabConfigError(
                f"libvirt.bridge_netns {ns!r} differs from libvirtd.netns {daemon.netns!r}:"
                " the VMs' taps live in the daemon's namespace, so must the bridge"
            )
    elif "uri" not in values:
        raise LabConfigError("libvirt.uri is required without a [libvirtd] table")
    _check_scalar_types(values)
    try:
        return config_from_mapping(values)
    except (ProviderError, NetError) as exc:
        raise LabConfigError(f"[libvirt]: {exc}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise LabConfigError(f"[libvirt]: bad value: {exc}") from exc


def _check_scalar_types(values: Mapping[str, Any]) -> None:
    """Keys whose default is a bool/int/float/str take only that type (ints for floats)."""
    for f in dataclasses.fields(LibvirtConfig):
        if f.name not in values or f.default is dataclasses.MISSING:
            continue
        kind = type(f.default)
        if kind not in (bool, int, float, str):
            continue
        v = values[f.name]
        ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            raise LabConfigError(f"libvirt.{f.name}: expected {kind.__name__}, got {v!r}")


def _pools(raw: Any, libvirt: LibvirtConfig) -> tuple[PoolSpec, ...]:
    if not isinstance(raw, list):
        raise LabConfigError("pools must be an array of tables ([[pools]])")
    specs: list[PoolSpec] = []
    types: dict[str, InstanceType] = {}
    for i, entry in enumerate(raw):
        where = f"pools[{i}]"
        if not isinstance(entry, Mapping):
            raise LabConfigError(f"{where} must be a table")
        p = _validate(PoolTable, entry, where)
        if any(s.name == p.name for s in specs):
            raise LabConfigError(f"{where}: pool {p.name!r} is defined twice")
        if p.cpus > libvirt.max_cpus or p.memory_mb > libvirt.max_memory_mb:
            raise LabConfigError(
                f"{where}: {p.cpus} cpus / {p.memory_mb} MiB is more than the provider allows"
                f" (libvirt.max_cpus {libvirt.max_cpus}, max_memory_mb {libvirt.max_memory_mb})"
            )
        if p.warm_target > p.max_size:
            raise LabConfigError(f"{where}: warm_target {p.warm_target} > max_size {p.max_size}")
        itype = InstanceType(p.instance_type, p.cpus, p.memory_mb, p.price_micros_per_s, p.storage)
        if types.setdefault(itype.name, itype) != itype:
            raise LabConfigError(
                f"{where}: instance type {itype.name!r} is defined differently by another pool"
            )
        specs.append(PoolSpec(p.name, itype, p.warm_target, p.max_size))
    return tuple(specs)


def _validate(model: type[_Strict], raw: Mapping[str, Any], where: str) -> Any:
    try:
        return model.model_validate(dict(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in (where, *first["loc"]))
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise LabConfigError(f"{loc}: {msg}{more}") from exc


def check_files(config: LabConfig) -> None:
    """Local hosts: the image files must exist (checked before anything starts)."""
    if parse_uri(config.libvirt.uri).remote:
        return
    for f in config.libvirt.image.files():
        if not f.is_file():
            raise LabConfigError(f"guest image file {f} does not exist (run dcp-image build)")


# ---- the adapter ----------------------------------------------------------------------


@dataclass(frozen=True)
class LabAddresses:
    """Where the lab's OSS answers."""

    url: str | None  # on the host (operators, dcp-oss clients); None: not served there
    guest_url: str  # what the instances are given (inside the lab namespace)
    netns: str | None
    daemon_pids: Mapping[str, int]


async def retire_instances(instances: Instances, reason: str) -> list[str]:
    """Mark the live instances of the lab's pools destroyed (their VMs are gone).

    At start-up these are left over from a previous run (the provider starts with
    no VMs); at shutdown they are the ones the provider is about to destroy.
    Ready ones are failed first, so programs placed on them go to recovery.
    """
    pools = {p["name"] for p in await instances.pools() if p["provider"] == PROVIDER}
    rows = [i for i in await instances.instances(None) if i["pool"] in pools and i["state"] in LIVE]
    ready = [i["name"] for i in rows if i["state"] == "ready"]
    if ready:
        await instances.fail_instances(ready, reason)
    for i in rows:
        await instances.set_instance_state(i["name"], "destroyed")
    return [i["name"] for i in rows]


async def serve_lab(
    config: LabConfig,
    oss_config: OssConfig,
    listen: tuple[str, int] | None,
    guest_port: int,
    stop: asyncio.Event,
    announce: Callable[[LabAddresses], None],
    network_prefix: ipaddress.IPv4Network | None = None,
) -> None:
    """Start the lab, call `announce`, serve until `stop` is set, then release everything.

    A `stop` during start-up cancels the step in progress (each step undoes itself)
    and releases the steps already done.
    """
    async with contextlib.AsyncExitStack() as stack:
        starting = asyncio.create_task(
            _start(stack, config, oss_config, listen, guest_port, network_prefix)
        )
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
        if starting.cancelled():
            stopping.cancel()
            return
        try:
            addresses = starting.result()  # a start-up error propagates; the stack unwinds
        except BaseException:
            stopping.cancel()
            raise
        announce(addresses)
        await stopping
        log.info("lab stopping")


async def _start(
    stack: contextlib.AsyncExitStack,
    config: LabConfig,
    oss_config: OssConfig,
    listen: tuple[str, int] | None,
    guest_port: int,
    network_prefix: ipaddress.IPv4Network | None = None,
) -> LabAddresses:
    pids: dict[str, int] = {}
    if config.libvirtd is not None:
        daemon = PrivateLibvirtd(config.libvirtd)
        await daemon.start()
        stack.push_async_callback(daemon.stop)
        pids = dict(daemon.pids)

    provider = LibvirtProvider(config.libvirt)
    await provider.open()  # creates the bridge the guests' OSS address lives on
    stack.push_async_callback(_bounded, "provider close", provider.close, PROVIDER_CLOSE_TIMEOUT)

    public_url = oss_config.public_url
    guest_sock = None
    if public_url is None:
        if config.libvirt.bridge is None:
            raise LabConfigError("no bridge configured: give --public-url for the instances")
        host = str(config.gateway)
        guest_sock = await asyncio.to_thread(
            bridge.listening_socket, config.guest_netns, host, guest_port
        )
        stack.callback(guest_sock.close)
        public_url = f"http://{host}:{guest_sock.getsockname()[1]}"
    oss = Oss(dataclasses.replace(oss_config, public_url=public_url), {PROVIDER: provider})
    if network_prefix is not None:  # issue 13: program addresses on the lab's VMs
        if config.libvirt.bridge is None:
            raise LabConfigError("--network-prefix needs the lab's bridge ([libvirt] bridge)")
        if network_prefix.overlaps(config.libvirt.subnet):
            raise LabConfigError(
                f"--network-prefix {network_prefix} overlaps the lab's subnet"
                f" {config.libvirt.subnet}"
            )
        oss.use_vm_network(network_prefix, config.libvirt.bridge, config.libvirt.subnet,
                           str(config.gateway), config.guest_netns)  # fmt: skip
    await oss.start()
    stack.push_async_callback(oss.close)
    stack.push_async_callback(_retire, oss, "lab stopped: its VM was destroyed")
    retired = await retire_instances(oss.instances, "lab restarted: its VM is gone")
    if retired:
        oss.oss_log(f"lab: {len(retired)} instance(s) of a previous run marked destroyed")

    limits = ListenerLimits()
    runner = web.AppRunner(
        make_app(oss, manage=False, limits=limits),
        access_log=None,
        handle_signals=False,
        **limits.runner_args(),
    )
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    url = None
    if guest_sock is not None:
        await GuardedSockSite(runner, guest_sock, limits).start()
    if listen is not None:
        site = GuardedSite(runner, listen[0], listen[1], limits)
        await site.start()
        host_addr = runner.addresses[-1]
        url = f"http://{host_addr[0]}:{host_addr[1]}"

    for p in config.pools:
        await oss.instances.put_instance_type(p.instance_type)
        await oss.instances.put_pool(
            p.name, p.instance_type.name, p.warm_target, p.max_size, PROVIDER
        )
        oss.oss_log(f"lab: pool {p.name} warm_target {p.warm_target} max_size {p.max_size}")
    return LabAddresses(url, public_url, config.guest_netns, pids)


async def _retire(oss: Oss, reason: str) -> None:
    try:
        names = await retire_instances(oss.instances, reason)
    except OssError as exc:  # the store may be failing: the next start-up retires them
        log.error("could not mark the lab's instances destroyed: %s", exc)
        return
    if names:
        log.info("instances destroyed with the lab: %s", ", ".join(names))


async def _bounded(what: str, fn: Callable[[], Awaitable[None]], timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await fn()
    except TimeoutError:
        log.error("%s did not finish within %.0f s", what, timeout)
