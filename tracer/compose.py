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
from collections.abc import Iterator
from pathlib import Path

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
    inner: Coordinator, instances: int, placement: str, oss_url: str | None
) -> Iterator[Coordinator]:
    """`inner` alone, or wrapped to place exec'd programs on instances."""
    if instances == 0 and oss_url is None:
        yield inner
        return
    try:
        import vmagent.cluster.coordinator  # noqa: F401  (a missing package: one line)
    except ImportError as exc:
        raise UsageError("--instances/--oss need the vmagent package, which is missing") from exc
    with clustered(inner, instances=instances, placement=placement, oss_url=oss_url) as coord:
        yield coord


@contextlib.contextmanager
def clustered(
    inner: Coordinator, instances: int, placement: str, oss_url: str | None
) -> Iterator[Coordinator]:
    """Start `instances` local instances (or use the OSS's) and place execs on them.

    Set-up failures come out as the tracer's own errors (UsageError for bad
    options, TracerError for instances that do not start), so dcptrace prints
    one line instead of a traceback.
    """
    if oss_url is not None and instances == 0:
        from vmagent.cluster.ossmode import oss_clustered  # the OSS client only where it is used

        with oss_clustered(inner, placement, oss_url) as coord:
            yield coord
        return
    from vmagent.cluster.coordinator import (
        ClusterCoordinator,
        OssModeUnavailable,
        Target,
    )
    from vmagent.cluster.local import LocalCluster
    from vmagent.cluster.placement import Placement, UnknownPolicy
    from vmagent.errors import AgentError

    stack = contextlib.ExitStack()
    try:
        Placement(placement, [])  # validate the policy before starting anything
        # Each agent traces what it runs (vmagent.trace): nothing to ask for here.
        cluster = stack.enter_context(LocalCluster(instances))
    except (UnknownPolicy, OssModeUnavailable) as exc:
        stack.close()
        raise UsageError(str(exc)) from exc
    except AgentError as exc:
        stack.close()
        raise TracerError(f"local instances: {exc}") from exc
    with stack:
        policy = Placement(placement, [(i.name, i.cpus) for i in cluster.instances])
        targets = [Target(i.name, i.address, i.token, i.cpus) for i in cluster.instances]
        local = ClusterCoordinator(inner, targets, policy, cluster.reconnect_window)
        try:
            yield local
        finally:
            local.close()
        cluster.remove_logs()
