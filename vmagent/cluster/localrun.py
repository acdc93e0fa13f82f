"""The local instances of `dcptrace --instances N` and their OSS, started now or on first use.

`LocalRun.start()` starts the run's OSS (`oss.local.PrivateOss`, a thread of
this process) and N agents, and waits until every agent registered; it returns
the `LocalProgramLink` the home coordinator places through.

Under `--placement auto` the run starts nothing up front: `LazyLink` is the
coordinator's link and starts the instances the first time the cost model
places a process (`place`).  Local instances share this machine's cores, so the
model keeps work home and a run usually never starts them: `--instances 3 --
true` costs what `dcptrace -- true` costs.  Until they start, the program is not
submitted to the run's OSS; its decisions go to `note` (the local OSS state's
log of the run), and to the run's OSS log once it runs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmagent.cluster.coordinator import Ident
from vmagent.cluster.ossmode import Grant, LocalProgramLink, OssCannotRun, fencing
from vmagent.errors import AgentError
from vmagent.exec.view import View

log = logging.getLogger(__name__)


class LocalRunError(AgentError):
    """The local instances or their OSS did not start."""


class LocalRun:
    """N local agents and the run's OSS (one start, one close)."""

    def __init__(
        self,
        instances: int,
        view: View,
        start_timeout: float,
        make_oss: Callable[[Path, Path, list[str]], Any],
        oss_error: type[Exception],
    ) -> None:
        from vmagent.cluster.local import LocalCluster

        self.cluster = LocalCluster(instances)
        # The run's OSS (`oss.local.PrivateOss`(data_dir, socket_dir, names)) and its
        # start error: tracer.compose wires them.
        self._make_oss = make_oss
        self._oss_error = oss_error
        self.view = view
        self.start_timeout = start_timeout
        self.private: Any = None
        self._stack = contextlib.ExitStack()
        self._stack.callback(self.cluster.close)

    def start(self) -> LocalProgramLink:
        """Start the OSS and the agents; LocalRunError (all torn down) if they do not."""
        cluster = self.cluster
        try:
            private = self._make_oss(cluster.logdir / "oss", cluster.logdir, cluster.names)
            cluster.use_oss(private.url, private.tokens)
            # Before the agents: they register at once (after a failed first try an
            # agent backs off 0.5 s, which costs more than the OSS's imports slow them).
            private.start()
            self._stack.callback(private.close)
            cluster.start()
            private.wait_ready(self.start_timeout)
            missing = private.registered(self.start_timeout)
            if missing:
                raise LocalRunError(f"{', '.join(missing)} did not register with the run's OSS")
            if cluster.lab is not None:  # one address for the program (issue 13)
                self._network(private)
        except (AgentError, self._oss_error) as exc:
            self.close()
            if isinstance(exc, LocalRunError):
                raise
            raise LocalRunError(str(exc)) from exc
        except BaseException:
            self.close()
            raise
        self.private = private
        return LocalProgramLink(private, self.view)

    def _network(self, private: Any) -> None:
        """The program's address on its instances: the lab as one host for the run's OSS;
        should this process die, the reaper removes the host's redirects."""
        from vmagent.network.local import lab_config

        assert self.cluster.lab is not None
        try:
            config, nodes = lab_config(self.cluster.lab)
            self.cluster.reap_prefix(str(config.prefix))
            private.use_network(config, nodes, self.start_timeout)
        except Exception as exc:  # netlink, nft, no free prefix: one line, not a traceback
            raise LocalRunError(f"program network: {exc}") from exc

    def note(self, text: str) -> None:
        """A line for the run's OSS log, if it runs."""
        if self.private is not None:
            self.private.note(text)

    def close(self) -> None:
        """Stop the agents and the OSS (what started)."""
        self._stack.close()

    def remove_logs(self) -> None:
        """The agents' logs of a run that ended well."""
        self.cluster.remove_logs()


class LazyLink:
    """A `ProgramLink` that starts the local instances when a process is first placed.

    Before that the program is not known to the run's OSS: releases, records and
    limits have nothing to act on.  A start that fails is said once and every
    process runs home.
    """

    def __init__(self, run: LocalRun) -> None:
        self.run = run
        self.link: LocalProgramLink | None = None
        self._failed = False
        self._lock = threading.Lock()
        self._submit: tuple[list[str], str] | None = None
        self._watch: tuple[Callable[[str], None], Callable[[str], None] | None] | None = None
        # Issue 12 (failover): handed to the link when the instances start.
        self.checkpoint_every: float | None = None
        self.on_restoring: Callable[[set[str]], None] | None = None
        self.on_restored: Callable[[dict[str, Any]], None] | None = None

    @property
    def program_id(self) -> str | None:
        """The program's id in the run's OSS (None until the instances start)."""
        return self.link.program_id if self.link is not None else None

    @property
    def placed(self) -> int:
        """Processes placed with a ticket."""
        return self.link.placed if self.link is not None else 0

    def submit(self, argv: Sequence[str], cwd: str) -> None:
        """Kept for the start: nothing to submit to before the instances run."""
        self._submit = (list(argv), cwd)

    def _started(self) -> LocalProgramLink | None:
        with self._lock:
            if self.link is not None or self._failed:
                return self.link
            try:
                link = self.run.start()
                link.checkpoint_every = self.checkpoint_every
                link.on_restoring, link.on_restored = self.on_restoring, self.on_restored
                argv, cwd = self._submit or (["?"], "/")
                link.submit(argv, cwd)
            except (LocalRunError, OssCannotRun) as exc:
                self._failed = True
                log.warning("local instances did not start (%s): every process runs here", exc)
                return None
            if self._watch is not None:
                link.watch(*self._watch)
            self.link = link
            return link

    def place(self, avoid: Sequence[str], ident: Ident) -> Grant | None:
        """Start the instances if need be, then one placement (None: runs here)."""
        link = self._started()
        return link.place(avoid, ident) if link is not None else None

    def release(self, instance: str) -> None:
        """As the started link's."""
        if self.link is not None:
            self.link.release(instance)

    def processes(self, final_wait: float) -> dict[str, Any] | None:
        """The placed processes' record (None: nothing was placed)."""
        return self.link.processes(final_wait) if self.link is not None else None

    def finish(self, exit_status: int | None, signal: int | None) -> None:
        """As the started link's."""
        if self.link is not None:
            self.link.finish(exit_status, signal)

    def watch(
        self, on_stop: Callable[[str], None], on_lost: Callable[[str], None] | None = None
    ) -> None:
        """Watch once the instances run."""
        self._watch = (on_stop, on_lost)
        if self.link is not None:
            self.link.watch(on_stop, on_lost)

    def stop_now(self) -> str | None:
        """As the started link's (None before: no limit acts on a program not submitted)."""
        return self.link.stop_now() if self.link is not None else None

    def signal(self, pid: int, sig: int, thread: bool = False, sender: int = 0) -> bool:
        """As the started link's (False before: no process was forked on an instance)."""
        return self.link.signal(pid, sig, thread, sender) if self.link is not None else False


class StorageLink:
    """A `ProgramLink` that mounts the run's storage on every local instance before the
    first process is placed (issue 14): the storage server and the instances' dcpfs
    start then, not with the run, so a run that places nothing pays nothing for them.

    Every instance mounts at once (an instance may place an exec on another, which
    must find the namespace there).  A mount that fails is said once and every
    process runs here, where the real directories are.
    """

    def __init__(self, link: Any, storage: Any, run: LocalRun) -> None:
        self.link = link
        self.storage = storage  # oss.storage.run.RunStorage, lazy
        self.run = run
        self._mounted = False
        self._failed = False
        self._lock = threading.Lock()

    @property
    def program_id(self) -> str | None:
        """The wrapped link's."""
        return getattr(self.link, "program_id", None)

    @property
    def placed(self) -> int:
        """The wrapped link's."""
        return int(getattr(self.link, "placed", 0))

    # Issue 12's failover settings are the wrapped link's: the coordinator sets its
    # restore callbacks here and reads the checkpoint period.
    @property
    def checkpoint_every(self) -> float | None:
        """The wrapped link's."""
        return getattr(self.link, "checkpoint_every", None)

    @checkpoint_every.setter
    def checkpoint_every(self, value: float | None) -> None:
        self.link.checkpoint_every = value

    @property
    def on_restoring(self) -> Callable[[set[str]], None] | None:
        """The wrapped link's."""
        return getattr(self.link, "on_restoring", None)

    @on_restoring.setter
    def on_restoring(self, value: Callable[[set[str]], None] | None) -> None:
        self.link.on_restoring = value

    @property
    def on_restored(self) -> Callable[[dict[str, Any]], None] | None:
        """The wrapped link's."""
        return getattr(self.link, "on_restored", None)

    @on_restored.setter
    def on_restored(self, value: Callable[[dict[str, Any]], None] | None) -> None:
        self.link.on_restored = None if value is None else fencing(self.storage, value)

    def _mount(self) -> bool:
        from oss.storage import StorageError
        from oss.storage.run import Agent

        with self._lock:
            if self._mounted or self._failed:
                return self._mounted
            cluster = self.run.cluster
            self.storage.listen = f"unix:{cluster.logdir}/storage.sock"
            try:
                agents = [Agent(i.name, i.address, i.token) for i in cluster.instances]
                self.storage.mount_on(agents)
            except StorageError as exc:
                self._failed = True
                log.warning("the program's storage is not mounted (%s): processes run here", exc)
                return False
            self._mounted = True
            return True

    def submit(self, argv: Sequence[str], cwd: str) -> None:
        """As the wrapped link's."""
        self.link.submit(argv, cwd)

    def place(self, avoid: Sequence[str], ident: Ident) -> Grant | None:
        """A placement, once the instances mount the storage (None: runs here)."""
        grant: Grant | None = self.link.place(avoid, ident)
        if grant is not None and not self._mount():
            self.link.release(grant.instance)
            return None
        return grant

    def release(self, instance: str) -> None:
        """As the wrapped link's."""
        self.link.release(instance)

    def processes(self, final_wait: float) -> dict[str, Any] | None:
        """As the wrapped link's."""
        result: dict[str, Any] | None = self.link.processes(final_wait)
        return result

    def finish(self, exit_status: int | None, signal: int | None) -> None:
        """As the wrapped link's."""
        self.link.finish(exit_status, signal)

    def watch(
        self, on_stop: Callable[[str], None], on_lost: Callable[[str], None] | None = None
    ) -> None:
        """As the wrapped link's."""
        self.link.watch(on_stop, on_lost)

    def stop_now(self) -> str | None:
        """As the wrapped link's."""
        reason: str | None = self.link.stop_now()
        return reason

    def signal(self, pid: int, sig: int, thread: bool = False, sender: int = 0) -> bool:
        """As the wrapped link's."""
        return bool(self.link.signal(pid, sig, thread, sender))
