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
from collections.abc import Callable, Iterator
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
PLACEMENTS = ("auto", "spread", "pack", "local")
# s a deputy of a checkpointed program waits for its instance (issue 12): the OSS's
# failure detection, the restore elsewhere and the home's news of it fit in it.
FAILOVER_WINDOW = 90.0
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
    note: Callable[[str], None] | None = None,
    profiles: Path | None = None,
    keep_profiles: bool = False,
    share_cwd: bool | None = None,
    checkpoint_every: float | None = None,
) -> Iterator[Coordinator]:
    """`inner` alone, or wrapped to place exec'd programs on instances.

    `maps` (`--map`, `[map]`) become the program's view, which every placed
    process carries and its instance applies.  `note` takes the placement
    decisions' log lines (the run's record in the local OSS state); `profiles` the
    file of the programs' past run times the cost model reads (and writes back at
    the end with `keep_profiles`).  Unless `share_cwd` is False the working
    directory joins the declared paths (`with_cwd`).
    `checkpoint_every` (issue 12): checkpoint placed processes that often, to
    restore them elsewhere when their instance is lost.
    """
    check_volumes(volumes, instances, oss_url, maps or {})
    check_checkpoints(checkpoint_every, instances, oss_url)
    if instances == 0 and oss_url is None:
        yield inner
        return
    cwd_note = None
    # The working directory is one namespace on every instance, local or VM, unless
    # --no-share-cwd (docs/STORAGE.md); `/`, which no one shares, goes unsaid unless
    # asked for (a run from `/` means to start placed processes in the instance's).
    if share_cwd is not False:
        volumes, cwd_note = with_cwd(volumes, instances, oss_url, maps or {}, bool(share_cwd))
    try:
        import vmagent.cluster.coordinator  # noqa: F401  (a missing package: one line)
    except ImportError as exc:
        raise UsageError("--instances/--oss need the vmagent package, which is missing") from exc
    with clustered(
        inner,
        instances=instances,
        placement=placement,
        oss_url=oss_url,
        maps=maps,
        volumes=volumes,
        storage=storage,
        note=note,
        profiles=profiles,
        cwd_note=cwd_note,
        checkpoint_every=checkpoint_every,
    ) as coord:
        advisor = getattr(coord, "advisor", None)
        try:
            yield coord
        finally:
            if advisor is not None and profiles is not None and keep_profiles:
                from vmagent.cluster.advisor import save_history

                save_history(profiles, advisor.history)


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


def with_cwd(
    volumes: tuple[str, ...],
    instances: int,
    oss_url: str | None,
    maps: dict[str, str],
    asked: bool = False,
) -> tuple[tuple[str, ...], str | None]:
    """The declared paths and the working directory, when it can be shared (issue 14).

    The program's working directory is one namespace on every instance by default:
    a process placed elsewhere starts in it and finds what the others wrote.  It
    costs nothing until a process is placed (the server and the mounts start with
    the first placement).  Left out, with the line said at the first placement
    (None: nothing to say): a directory that holds the instance's own files or
    the user's private state (`/`, `$HOME` and its ancestors, the DCP state), which
    local instances share through this machine's disk anyway; and, on local
    instances, whenever the agents cannot mount (not root, no mfusepy): the same
    disk shares it then, as before.  `/` goes unsaid unless the sharing was `asked`
    for: a run from `/` starts its placed processes in the instance's own on purpose.
    """
    try:
        cwd = os.path.normpath(os.getcwd())
    except OSError:
        return volumes, None
    declared = [os.path.normpath(os.path.abspath(v)) for v in volumes]
    if any(cwd == v or cwd.startswith(v.rstrip("/") + "/") for v in declared):
        return volumes, None
    local = oss_url is None
    if local and (os.geteuid() != 0 or not _fuse_client()):
        return volumes, None
    why = _private_dir(cwd)
    if why is not None:
        if local or (cwd == "/" and not asked):
            return volumes, None  # the instances share this machine's disk, or nobody asked
        return volumes, (
            f"the working directory {cwd} is not shared with the instances ({why}): "
            "processes placed there start in their instance's own; --volume DIR shares one"
        )
    for prefix in (*maps, *maps.values()):
        if cwd == prefix or cwd.startswith(prefix.rstrip("/") + "/"):
            return volumes, None  # --map shows it under another name: declare it there
    return (*volumes, cwd), None


def _fuse_client() -> bool:
    """dcpfs can run here (mfusepy and libfuse; the local instances' mounts need them)."""
    import importlib.util

    return importlib.util.find_spec("mfusepy") is not None and os.path.exists("/dev/fuse")


def _private_dir(path: str) -> str | None:
    """Why `path` may not be shared as the working directory (None: it may)."""
    if path == "/" or any(path == p or path.startswith(p + "/") for p in NOT_VOLUMES):
        return "it holds the instance's own files"
    home = os.path.normpath(os.path.expanduser("~"))
    data = os.path.normpath(str(default_data_dir()))
    for private in (home, data):
        if private == path or private.startswith(path.rstrip("/") + "/"):
            return "it holds the user's private files"
    return None


@contextlib.contextmanager
def clustered(
    inner: Coordinator,
    instances: int,
    placement: str,
    oss_url: str | None,
    maps: dict[str, str] | None = None,
    volumes: tuple[str, ...] = (),
    storage: dict[str, int | str] | None = None,
    note: Callable[[str], None] | None = None,
    profiles: Path | None = None,
    cwd_note: str | None = None,
    checkpoint_every: float | None = None,
) -> Iterator[Coordinator]:
    """Start `instances` local instances (or use the OSS's) and place execs on them.

    Set-up failures come out as the tracer's own errors (UsageError for bad
    options, TracerError for instances that do not start), so dcptrace prints
    one line instead of a traceback.
    """
    import socket  # not on a plain run's start-up

    from vmagent.exec.view import View

    # The program sees its home's hostname on every instance, local or VM (issue 11
    # item 8); a guest's own name stays in its /etc/hostname, a local instance's in
    # its agent's command line.
    home = socket.gethostname()
    view = View.of("", dict(maps or {}), placement, home=home)
    if oss_url is not None and instances == 0:
        from vmagent.cluster.ossmode import oss_clustered  # the OSS client only where it is used

        with contextlib.ExitStack() as stack:
            run_storage = None
            if volumes:  # issue 14: served from here, mounted by each VM's agent via the OSS
                view, run_storage = _oss_storage(stack, view, volumes, maps or {}, oss_url, storage)
            with oss_clustered(
                inner, placement, oss_url, view=view, storage=run_storage,
                cwd_note=cwd_note,
                reconnect_window=FAILOVER_WINDOW if checkpoint_every else None,
                checkpoint_every=checkpoint_every,
            ) as coord:  # fmt: skip
                told: Callable[[str], None] | None = None
                if placement == "auto":
                    from vmagent.cluster.advisor import Advisor, load_history

                    # The OSS knows the instances (it picks); decisions go to the program's log.
                    told = getattr(getattr(coord, "_link", None), "note", None)
                    coord.advisor = Advisor("home", note=told, history=load_history(profiles))
                try:
                    yield coord
                finally:
                    if coord.advisor is not None and coord.advisor.counts and told is not None:
                        told(coord.advisor.summary())
        return
    from oss.local import PrivateOss, PrivateOssError
    from vmagent.cluster.coordinator import OssModeUnavailable
    from vmagent.cluster.localrun import LazyLink, LocalRun, LocalRunError, StorageLink
    from vmagent.cluster.ossmode import LocalProgramLink, OssCoordinator, ProgramLink
    from vmagent.cluster.placement import Placement, UnknownPolicy
    from vmagent.errors import AgentError
    from vmagent.network.home import HomeListeners

    # Always an OSS (issue 10): the run's own, on a thread of this process, serving
    # its agents on a unix socket; it places every exec, from home or an instance.
    # Under auto (the cost model) the OSS and the instances start on the first
    # placement (`vmagent.cluster.localrun`): local instances share this machine's
    # cores, so most runs never need them.
    stack = contextlib.ExitStack()
    try:
        Placement(placement, [])  # validate the policy before starting anything
        run_storage = None
        if volumes:  # issue 14: the declared paths are one namespace on every instance
            view, run_storage = _local_storage(stack, view, volumes, maps or {}, storage or {})
        # Each agent traces what it runs (vmagent.trace): nothing to ask for here.
        run = LocalRun(instances, view, START_TIMEOUT, PrivateOss, PrivateOssError)
    except (UnknownPolicy, OssModeUnavailable) as exc:
        stack.close()
        raise UsageError(str(exc)) from exc
    except AgentError as exc:
        stack.close()
        raise TracerError(f"local instances: {exc}") from exc
    except BaseException:
        stack.close()
        raise
    link: ProgramLink
    if placement == "auto":
        link = LazyLink(run)
    else:
        try:
            link = run.start()
        except LocalRunError as exc:
            stack.close()
            run.close()
            raise TracerError(f"local instances: {exc}") from exc
        except BaseException:
            stack.close()
            run.close()
            raise
    link.checkpoint_every = checkpoint_every  # issue 12: submitted with the program
    if run_storage is not None:
        # The server and every instance's mount start with the first placement.
        link = StorageLink(link, run_storage, run)
    window = run.cluster.reconnect_window
    if checkpoint_every:  # a deputy waits out the loss, the restore and the news of it
        window = max(window, FAILOVER_WINDOW)
    try:
        local = OssCoordinator(inner, placement, link, os.getcwd(), window, view=view)
        started = link.link if isinstance(link, StorageLink) else link  # under the storage
        if isinstance(started, LocalProgramLink) and started.private.oss.network is not None:
            local.home_listeners = HomeListeners(started.home_listener)  # issue 13
        if placement == "auto":
            local.advisor = local_advisor(run, note, profiles)
        try:
            yield local
        finally:
            if local.advisor is not None and local.advisor.counts:
                line = local.advisor.summary()
                run.note(line)
                if note is not None:
                    note(line)
            local.close()
    finally:
        # The storage goes first (unmounts while the agents still run), then the run.
        try:
            stack.close()
        finally:
            run.close()
    run.remove_logs()


def check_checkpoints(every: float | None, instances: int, oss_url: str | None) -> None:
    """`--checkpoint-every` (issue 12): with instances, and where CRIU works (local
    instances checkpoint with this machine's CRIU; an OSS says for its own)."""
    if every is None:
        return
    if instances == 0 and oss_url is None:
        raise UsageError("--checkpoint-every needs --instances N or --oss URL")
    if instances:
        from vmagent.checkpoint import criu

        try:
            criu.check()
        except criu.CriuUnavailable as exc:
            raise UsageError(f"--checkpoint-every: {exc}") from exc


def local_advisor(run: Any, note: Callable[[str], None] | None, profiles: Path | None) -> Any:
    """The cost model's adapter for local instances: they share this machine's cores."""
    from oss.compute.costmodel import Site
    from vmagent.cluster.advisor import Advisor, load_history, machine_id
    from vmagent.cluster.advisor import log as placement_log

    here = machine_id()
    sites = [Site(n, run.cluster.cpus, 0.0, here) for n in run.cluster.names]

    def noted(text: str) -> None:
        run.note(text)
        if note is not None:
            note(text)

    advisor = Advisor(
        "home", others=lambda: sites, note=noted, machine=here, history=load_history(profiles)
    )
    if not advisor.may_place():
        line = (
            f"placement on home: {', '.join(run.cluster.names)} share this machine's cores: "
            "no exec is worth placing, every one runs home"
        )
        placement_log.info("%s", line)
        noted(line)
    return advisor


def _local_storage(
    stack: contextlib.ExitStack,
    view: Any,
    volumes: tuple[str, ...],
    maps: dict[str, str],
    table: dict[str, int | str],
) -> tuple[Any, Any]:
    """The declared paths' storage on local instances (started at the first placement:
    `StorageLink`), and the view that maps them there (the home keeps the real
    directories)."""
    import dataclasses

    from oss.storage.run import RunStorage, options_from_table

    virtuals, reals = volume_dirs(volumes, maps)
    try:
        options = options_from_table(virtuals, table)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    # The socket's directory is the run's (vmagent.cluster.local.LocalCluster.logdir),
    # made when the instances start, before the first placement starts the server.
    storage = RunStorage(options, reals, default_data_dir() / "storage", "", lazy=True)
    stack.callback(_remove_instance_dirs, storage.name)  # runs after storage.close
    stack.callback(storage.close)
    log.info("storage %s: %s", storage.name, ", ".join(virtuals))
    maps_now = {**dict(view.maps), **storage.view_maps()}
    return dataclasses.replace(view, maps=tuple(sorted(maps_now.items()))), storage


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

    from oss.storage import StorageError
    from oss.storage.run import RunStorage, options_from_table
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
        # The server starts with the first mount (`OssProgramLink._mount_on`).
        storage = RunStorage(options, reals, default_data_dir() / "storage", address, lazy=True)
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
    nothing; local instances share this disk: its disk tier always, `/run/dcp` only
    for an agent not isolated, as a namespaced one mounts its own: `own_run_root`)."""
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
