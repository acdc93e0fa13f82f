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
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oss.embedded import EmbeddedCoordinator
from oss.local import LocalOss, default_data_dir
from oss.storage.pathmap import PathMap
from tracer.coordinator import Coordinator
from tracer.errors import TracerError, UsageError
from tracer.syscalls import SyscallTable

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
) -> Iterator[Coordinator]:
    """`inner` alone, or wrapped to place exec'd programs on instances.

    `maps` (`--map`, `[map]`) become the program's view, which every placed
    process carries and its instance applies.
    """
    if instances == 0 and oss_url is None:
        yield inner
        return
    try:
        import vmagent.cluster.coordinator  # noqa: F401  (a missing package: one line)
    except ImportError as exc:
        raise UsageError("--instances/--oss need the vmagent package, which is missing") from exc
    with clustered(
        inner, instances=instances, placement=placement, oss_url=oss_url, maps=maps
    ) as coord:
        yield coord


@contextlib.contextmanager
def clustered(
    inner: Coordinator,
    instances: int,
    placement: str,
    oss_url: str | None,
    maps: dict[str, str] | None = None,
) -> Iterator[Coordinator]:
    """Start `instances` local instances (or use the OSS's) and place execs on them.

    Set-up failures come out as the tracer's own errors (UsageError for bad
    options, TracerError for instances that do not start), so dcptrace prints
    one line instead of a traceback.
    """
    from vmagent.exec.view import View

    # The program sees its home's hostname on every local instance (issue 11).  Not yet
    # with --oss: VM and Vagrant lab users still tell their instances by hostname.
    home = socket.gethostname() if instances else ""
    view = View.of("", dict(maps or {}), placement, home=home)
    if oss_url is not None and instances == 0:
        from vmagent.cluster.ossmode import oss_clustered  # the OSS client only where it is used

        with oss_clustered(inner, placement, oss_url, view=view) as coord:
            yield coord
        return
    from oss.local import PrivateOss, PrivateOssError
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
        if cluster.lab is not None:  # one address for the program on its instances (issue 13)
            from vmagent.network.local import lab_config

            try:
                net_config, nodes = lab_config(cluster.lab)
                cluster.reap_prefix(str(net_config.prefix))
                private.use_network(net_config, nodes, START_TIMEOUT)
            except Exception as exc:  # one line, not a traceback (netlink, nft, no prefix)
                raise TracerError(f"local instances: program network: {exc}") from exc
    except (UnknownPolicy, OssModeUnavailable) as exc:
        stack.close()
        raise UsageError(str(exc)) from exc
    except (AgentError, PrivateOssError) as exc:
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


RECORD_FINAL_WAIT = 2.0  # seconds the record waits for placed processes' final figures


def measured(coordinator: Coordinator) -> dict[str, Any] | None:
    """What the OSS measured of the run's placed processes (None: nothing was placed
    through an OSS)."""
    from vmagent.cluster.ossmode import OssCoordinator

    if isinstance(coordinator, OssCoordinator):
        return coordinator.measured(RECORD_FINAL_WAIT)
    return None
