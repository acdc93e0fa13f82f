"""The one module that wires a dcptrace run: the embedded OSS and the cluster.

With neither --instances nor --oss the tracer consults the embedded OSS alone
(`oss.embedded`: the services a run needs, in-process; `oss.local`: the run
recorded in the user's local OSS state).  With --instances N that coordinator is
wrapped by one that places exec'd programs on N local instances; with --oss URL,
on the instances of a running dcp-oss (`vmagent.cluster`).

No other module imports `oss.embedded`, `oss.local` or `vmagent` for the command
(tests/unit/test_layering.py checks it).  The cluster modules are imported only
when a run asks for them: a plain `dcptrace -- prog` never loads `vmagent`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oss.embedded import EmbeddedCoordinator
from oss.local import LocalOss, default_data_dir
from oss.storage.pathmap import PathMap
from tracer.coordinator import Coordinator
from tracer.errors import TracerError, UsageError
from tracer.syscalls import SyscallTable

log = logging.getLogger(__name__)

# The --placement choices: the policies of vmagent.cluster.placement (POLICIES),
# spelled out here so that parsing options loads no vmagent module; a unit test
# checks the two agree.
PLACEMENTS = ("spread", "pack", "local")
START_TIMEOUT = 15.0  # seconds for the run's OSS and its instances to come up


def state_dir(data_dir: str | None) -> Path:
    """Where runs are recorded: --data, else the user's local OSS state directory."""
    return Path(data_dir) if data_dir else default_data_dir()


def local_state(directory: Path, argv: tuple[str, ...], cwd: str) -> LocalOss:
    """The recorder of this run in the local OSS state."""
    return LocalOss(directory, argv, cwd)


def embedded(table: SyscallTable, pathmap: PathMap, local: LocalOss | None) -> Coordinator:
    """The embedded OSS as the tracer's coordinator (recording into `local` if given)."""
    return EmbeddedCoordinator(table, pathmap, local.event if local else None)


@contextlib.contextmanager
def coordinator(
    inner: Coordinator,
    instances: int,
    placement: str,
    oss_url: str | None,
    maps: dict[str, str] | None = None,
    volumes: tuple[str, ...] = (),
    storage: dict[str, int | str] | None = None,
) -> Iterator[Coordinator]:
    """`inner` alone, or wrapped to place exec'd programs on instances.

    `maps` (`--map`, `[map]`) become the program's view, which every placed
    process carries and its instance applies.
    """
    check_volumes(volumes, instances, oss_url, maps or {})
    if instances == 0 and oss_url is None:
        yield inner
        return
    try:
        import vmagent.cluster.coordinator  # noqa: F401  (a missing package: one line)
    except ImportError as exc:
        raise UsageError("--instances/--oss need the vmagent package, which is missing") from exc
    with clustered(
        inner, instances=instances, placement=placement, oss_url=oss_url, maps=maps,
        volumes=volumes, storage=storage,
    ) as coord:  # fmt: skip
        yield coord


def check_volumes(
    volumes: tuple[str, ...], instances: int, oss_url: str | None, maps: dict[str, str]
) -> None:
    """UsageError unless `--volume` can be honoured here (issue 14)."""
    if not volumes:
        return
    if oss_url is None and instances == 0:
        raise UsageError("--volume needs --instances N or --oss URL (instances to share it)")
    # Under --oss the instances' agents mount it (root in their VMs); local ones are here.
    if instances and os.geteuid() != 0:
        raise UsageError("--volume needs root: each instance mounts the namespace (FUSE, tmpfs)")
    volume_dirs(volumes, maps)


def volume_dirs(
    volumes: tuple[str, ...], maps: dict[str, str]
) -> tuple[tuple[str, ...], list[str]]:
    """The declared paths (absolute, each once) and the real directories behind them."""
    virtuals = tuple(dict.fromkeys(os.path.normpath(os.path.abspath(v)) for v in volumes))
    pathmap = PathMap(maps) if maps else None
    reals = []
    for v in virtuals:
        if v == "/" or any(v == p or v.startswith(p + "/") for p in NOT_VOLUMES):
            raise UsageError(f"--volume {v}: not a directory of the program's own")
        real = os.fsdecode(pathmap.to_real(os.fsencode(v)) or v.encode()) if pathmap else v
        if not os.path.isdir(real):
            raise UsageError(f"--volume {v}: {real} is not a directory")
        reals.append(real)
    return virtuals, reals


@contextlib.contextmanager
def clustered(
    inner: Coordinator,
    instances: int,
    placement: str,
    oss_url: str | None,
    maps: dict[str, str] | None = None,
    volumes: tuple[str, ...] = (),
    storage: dict[str, int | str] | None = None,
) -> Iterator[Coordinator]:
    """Start `instances` local instances (or use the OSS's) and place execs on them.

    Set-up failures come out as the tracer's own errors (UsageError for bad
    options, TracerError for instances that do not start), so dcptrace prints
    one line instead of a traceback.
    """
    import socket  # not on a plain run's start-up

    from vmagent.exec.view import View

    # The program sees its home's hostname on every local instance (issue 11).  Not yet
    # with --oss: VM and Vagrant lab users still tell their instances by hostname.
    home = socket.gethostname() if instances else ""
    view = View.of("", dict(maps or {}), placement, home=home)
    if oss_url is not None and instances == 0:
        from vmagent.cluster.ossmode import oss_clustered  # the OSS client only where it is used

        with contextlib.ExitStack() as stack:
            run_storage = None
            if volumes:  # issue 14: served from here, mounted by each VM's agent via the OSS
                view, run_storage = _oss_storage(stack, view, volumes, maps or {}, oss_url, storage)
            with oss_clustered(inner, placement, oss_url, view=view, storage=run_storage) as coord:
                yield coord
        return
    from oss.local import PrivateOss, PrivateOssError
    from oss.storage.server import StorageError
    from vmagent.cluster.coordinator import OssModeUnavailable
    from vmagent.cluster.local import LocalCluster
    from vmagent.cluster.ossmode import LocalProgramLink, OssCoordinator
    from vmagent.cluster.placement import Placement, UnknownPolicy
    from vmagent.errors import AgentError

    # Always an OSS (issue 10): the run's own, on a thread of this process, serving
    # its agents on a unix socket; it places every exec, from home or an instance.
    stack = contextlib.ExitStack()
    try:
        Placement(placement, [])  # validate the policy before starting anything
        # Each agent traces what it runs (vmagent.trace): nothing to ask for here.
        cluster = LocalCluster(instances)
        stack.callback(cluster.close)
        private = PrivateOss(cluster.logdir / "oss", cluster.logdir, cluster.names)
        cluster.use_oss(private.url, private.tokens)
        # Before the agents: they register at once (after a failed first try an
        # agent backs off 0.5 s, which costs more than the OSS's imports slow them).
        private.start()
        stack.callback(private.close)
        cluster.start()
        private.wait_ready(START_TIMEOUT)
        missing = private.registered(START_TIMEOUT)
        if missing:
            raise TracerError(
                f"local instances: {', '.join(missing)} did not register with the run's OSS"
            )
        if volumes:  # issue 14: the declared paths are one namespace on every instance
            view = _with_storage(stack, view, volumes, maps or {}, cluster, storage or {})
    except (UnknownPolicy, OssModeUnavailable) as exc:
        stack.close()
        raise UsageError(str(exc)) from exc
    except (AgentError, PrivateOssError, StorageError) as exc:
        stack.close()
        raise TracerError(f"local instances: {exc}") from exc
    except BaseException:
        stack.close()
        raise
    with stack:
        link = LocalProgramLink(private, view)
        local = OssCoordinator(
            inner, placement, link, os.getcwd(), cluster.reconnect_window, view=view
        )
        try:
            yield local
        finally:
            local.close()
        stack.close()
        cluster.remove_logs()


def _with_storage(
    stack: contextlib.ExitStack,
    view: Any,
    volumes: tuple[str, ...],
    maps: dict[str, str],
    cluster: Any,
    table: dict[str, int | str],
) -> Any:
    """Serve the declared paths from a storage server, mount them on every instance,
    and return the view that maps them there (the home keeps the real directories)."""
    import dataclasses

    from oss.storage.run import Agent, RunStorage, options_from_table

    virtuals, reals = volume_dirs(volumes, maps)
    try:
        options = options_from_table(virtuals, table)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    storage = RunStorage(
        options, reals, default_data_dir() / "storage", f"unix:{cluster.logdir}/storage.sock"
    )
    stack.callback(_remove_instance_dirs, storage.name)  # runs after storage.close
    stack.callback(storage.close)
    storage.mount_on([Agent(i.name, i.address, i.token) for i in cluster.instances])
    log.info("storage %s: %s", storage.name, ", ".join(virtuals))
    maps_now = {**dict(view.maps), **storage.view_maps()}
    return dataclasses.replace(view, maps=tuple(sorted(maps_now.items())))


STORAGE_HOST_ENV = "DCP_STORAGE_HOST"  # the address VMs reach this machine at (--oss)


def _oss_storage(
    stack: contextlib.ExitStack,
    view: Any,
    volumes: tuple[str, ...],
    maps: dict[str, str],
    oss_url: str,
    table: dict[str, int | str] | None,
) -> tuple[Any, Any]:
    """Under --oss: serve the declared paths on TCP at an address the OSS's instances
    reach (this machine's on the route to the OSS, or $DCP_STORAGE_HOST); the view that
    maps them to the namespace and the run's storage (the OSS relays it to each VM)."""
    import dataclasses

    from oss.storage.run import RunStorage, options_from_table
    from oss.storage.server import StorageError
    from vmagent.osslink import advertised_address

    virtuals, reals = volume_dirs(volumes, maps)
    try:
        options = options_from_table(virtuals, table or {})
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    host = os.environ.get(STORAGE_HOST_ENV, "").strip()
    try:
        if not host:
            host = advertised_address("0.0.0.0", 0, oss_url).rpartition(":")[0]
        address = f"[{host}]:0" if ":" in host else f"{host}:0"
        storage = RunStorage(options, reals, default_data_dir() / "storage", address)
    except (OSError, StorageError) as exc:
        raise TracerError(f"--volume: the storage server did not start: {exc}") from exc
    stack.callback(storage.close)
    log.info("storage %s at %s: %s", storage.name, storage.address, ", ".join(virtuals))
    maps_now = {**dict(view.maps), **storage.view_maps()}
    return dataclasses.replace(view, maps=tuple(sorted(maps_now.items()))), storage


# The instance's own: what a volume must not be (nor contain, for "/").
NOT_VOLUMES = ("/proc", "/sys", "/dev", "/run/dcp")


def _remove_instance_dirs(name: str) -> None:
    """What the instances' storage left on this machine's disk (a lost instance unmounts
    nothing; local instances share this disk)."""
    import shutil

    from vmagent.storage.mounts import DISK_ROOT, FS_ROOT, TIER_ROOT

    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    for root in (DISK_ROOT, TIER_ROOT, FS_ROOT):
        where = str(root / name)
        # Never through a mount here: a namespace mounted in this one is the user's files.
        if not any(m == where or m.startswith(where + "/") for m in mounts):
            shutil.rmtree(where, ignore_errors=True)


RECORD_FINAL_WAIT = 2.0  # seconds the record waits for placed processes' final figures


def measured(coordinator: Coordinator) -> dict[str, Any] | None:
    """What the OSS measured of the run's placed processes (None: nothing was placed
    through an OSS)."""
    if "vmagent.cluster.ossmode" not in sys.modules:
        return None  # no run through an OSS started: not worth importing it to say so
    from vmagent.cluster.ossmode import OssCoordinator

    if isinstance(coordinator, OssCoordinator):
        return coordinator.measured(RECORD_FINAL_WAIT)
    return None
