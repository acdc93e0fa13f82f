"""`dcptrace --oss URL`: processes placed on the instances of a running dcp-oss.

The run becomes a program of the caller's account (token in `DCP_TOKEN`):
- set-up checks the URL and the token (GET /v1/limits) before the program runs,
  so a wrong one is one clear line and no run;
- the program's first exec (the tracer starting it) submits it, in the
  background, with its argv and cwd.  The root process runs here, so the slot
  the submission reserved for it is released at once;
- each exec the home coordinator would place asks the OSS for one placement
  (`POST /v1/programs/{id}/placements`, processes=1): the OSS scheduler picks
  the instance and answers with its agent's address and a single-use exec
  ticket MAC'd with the agent's exec key.  The execve becomes the deputy, as
  with local instances (`ClusterCoordinator`);
- a placed process's end releases its placement (in the background);
- the run's end finishes the program with the root's exit status.

Every call runs under the OSS client's timeout.  During the run an OSS error
never disturbs the program: the process runs here instead, and the reason is
said once.  At the start it is different: when the OSS cannot take the program
(every instance failed, none is registered, or none has room), the submission
is made before the program runs and dcptrace stops with that reason, unless
`DCP_OSS_FALLBACK=local` asks for the whole run on this machine instead.

`--placement spread` submits the program with a fixed target width (the
account's instance limit, at most SPREAD_WIDTH) and hints the OSS away from the
instance used last, so concurrent and sequential children spread; `pack`
leaves the width to the account's scaling policy (locality first); `local`
never places anything remotely.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from tracer.coordinator import (
    Allow,
    Complete,
    Coordinator,
    Decision,
    Defer,
    ProcessEvent,
    ProcessExited,
    Rewrite,
    SyscallCall,
)
from tracer.decode import signed
from tracer.errors import TracerError, UsageError
from vmagent.cluster.coordinator import EXEC_CALLS, ClusterCoordinator, Ident, Target
from vmagent.cluster.placement import HOME, Placement, UnknownPolicy
from vmagent.errors import AgentError
from vmagent.exec import protocol as P
from vmagent.exec.remote import credentials
from vmagent.exec.view import EMPTY, View
from vmagent.network.home import HomeListeners
from vmagent.trace.pidspace import PID_MAX_LIMIT

log = logging.getLogger(__name__)
T = TypeVar("T")

TOKEN_ENV = "DCP_TOKEN"
TIMEOUT_ENV = "DCP_OSS_TIMEOUT"
FALLBACK_ENV = "DCP_OSS_FALLBACK"  # "local": without OSS instances, run everything here
LOST_STATUS = 255  # a deputy's exit status when its instance was lost
LOST_REASON = re.compile(r"instance (\S+) failed: ")  # the OSS's status of such a program
WATCH_INTERVAL = 0.25  # seconds between looks at the program's state (limits act)
WATCHED = ("pending", "running", "recovering", "suspended")  # states the home waits through


def say_suspended(program_id: str) -> None:
    """The program was checkpointed at its hard budget (issue 12): the home waits for
    `dcp-oss resume`; said once on stderr."""
    print(
        f"dcptrace: suspended at its budget: dcp-oss resume {program_id} after raising it",
        file=sys.stderr,
        flush=True,
    )


SPREAD_WIDTH = 64  # target width of a spread program when the account sets no instance limit
ARG_MAX = 4096  # the OSS's limits on argv items and their length
STORAGE_TIMEOUT = 100.0  # seconds for the OSS to have an instance mount (or unmount) storage


class OssModeError(AgentError):
    """`--oss` cannot be used as configured."""


class OssRefused(OssModeError):
    """The OSS refused the account token."""


class OssUnreachable(OssModeError):
    """The OSS could not be reached or answered with an error."""


class OssCannotRun(OssModeError):
    """The OSS cannot take the program now (no ready instance with room, or it refused)."""


@dataclass(frozen=True, slots=True)
class OssModeConfig:
    """Settings of one `dcptrace --oss` run (loaded from flags and the environment)."""

    url: str  # the OSS base URL
    token: str = field(repr=False)  # the account's bearer token (DCP_TOKEN)
    placement: str = "auto"  # auto | spread | pack | local
    timeout: float = 10.0  # seconds, every call to the OSS
    fallback_local: bool = False  # DCP_OSS_FALLBACK=local: no OSS instance -> run here

    @classmethod
    def load(cls, url: str, placement: str, environ: Mapping[str, str]) -> OssModeConfig:
        """Validate the URL, the placement, the token and the timeout; OssModeError if bad."""
        if not url.startswith(("http://", "https://")):
            raise OssModeError(f"--oss must be an http(s) URL, got {url!r}")
        try:
            Placement(placement, [])
        except UnknownPolicy as exc:
            raise OssModeError(str(exc)) from exc
        token = environ.get(TOKEN_ENV, "").strip()
        if not token:
            raise OssModeError(
                f"--oss {url} needs an account token in the environment variable {TOKEN_ENV} "
                "(`dcp-oss account create` prints one)"
            )
        raw = environ.get(TIMEOUT_ENV, "10")
        try:
            timeout = float(raw)
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= 3600:
            raise OssModeError(f"{TIMEOUT_ENV} must be seconds in (0, 3600], got {raw!r}")
        fallback = environ.get(FALLBACK_ENV, "").strip()
        if fallback not in ("", "none", "local"):
            raise OssModeError(f"{FALLBACK_ENV} must be 'local' or 'none', got {fallback!r}")
        return cls(url.rstrip("/"), token, placement, timeout, fallback == "local")


@dataclass(frozen=True, slots=True)
class Grant:
    """One placed process: where to start it and the ticket its agent accepts."""

    instance: str
    address: str
    ticket: str


class ProgramLink(Protocol):
    """The OSS as the coordinator uses it (blocking calls, made on the tracer thread)."""

    # Issue 12 (failover): the program's checkpoint interval (submitted with it), and
    # the coordinator's callbacks for sessions being restored (their ticket nonces) and
    # restored (`oss.models.Restoration` as a dict), called from the link's watcher.
    checkpoint_every: float | None
    on_restoring: Callable[[set[str]], None] | None
    on_restored: Callable[[dict[str, Any]], None] | None

    def submit(self, argv: Sequence[str], cwd: str) -> None:
        """Start submitting the program; OssCannotRun if it must not run at all."""
        ...

    def place(self, avoid: Sequence[str], ident: Ident) -> Grant | None:
        """One process placed with a ticket bound to `ident`, or None: it runs here."""
        ...

    def release(self, instance: str) -> None:
        """A placed process ended (returns at once)."""
        ...

    def processes(self, final_wait: float) -> dict[str, Any] | None:
        """The OSS's record of the placed processes (`GET /v1/programs/{id}/processes`)."""
        ...

    def finish(self, exit_status: int | None, signal: int | None) -> None:
        """The run ended: record the root's status (None, None: cancel)."""
        ...

    def watch(
        self, on_stop: Callable[[str], None], on_lost: Callable[[str], None] | None = None
    ) -> None:
        """Call `on_stop(reason)` (once, on another thread) if a limit stops the program,
        and `on_lost(instance)` once per instance of the program that failed."""
        ...

    def stop_now(self) -> str | None:
        """Why a limit stopped the program, asking the OSS once now; None if it did not."""
        ...

    def signal(self, pid: int, sig: int, thread: bool = False, sender: int = 0) -> bool:
        """Send `sig` to the program's `pid` forked on an instance (a thread's id if
        `thread`: that thread alone gets it) from its process `sender`; False: it runs
        nowhere."""
        ...


# Issue 11: a pid forked on an instance (`vmagent.trace.pidspace`, above every home
# pid) is signalled from home through the OSS.  Call -> index of its signal; tkill and
# tgkill of a thread other than its main one name that thread, rt_sigqueueinfo is a
# kill (no value).
SIGNAL_CALLS = {"kill": 1, "tkill": 1, "tgkill": 2, "rt_sigqueueinfo": 1}


class OssPlacement(Placement):
    """`Placement` whose choices come from the OSS (grants kept for the ticket)."""

    def __init__(self, policy: str, link: ProgramLink, targets: dict[str, Target]) -> None:
        super().__init__(policy, [])
        self._link = link
        self._targets = targets  # the coordinator's: a grant's address goes in here
        self._recent: list[str] = []  # instances granted, most recent first
        self.granted: dict[str, str] = {}  # instance -> the ticket of its latest grant

    def choose(self) -> str:
        """Without the exec's identity no ticket can be had: the process runs here."""
        return HOME

    def choose_for(self, ident: Ident) -> str:
        """Ask the OSS for one placement (HOME for `local` or when it cannot place)."""
        if self.policy == "local":
            return HOME
        # Spread: the OSS ranks the instances used last after the others (most
        # recent last), so sequential processes go round the instances.
        avoid = list(self._recent) if self.policy in ("spread", "auto") else []
        grant = self._link.place(avoid, ident)
        if grant is None:
            return HOME
        self._recent = [grant.instance, *(n for n in self._recent if n != grant.instance)][:64]
        self._targets[grant.instance] = Target(grant.instance, grant.address, "", 0)
        self.granted[grant.instance] = grant.ticket
        return grant.instance

    def started(self, name: str) -> None:
        """The OSS counted the slot when it placed the process."""

    def finished(self, name: str) -> None:
        """Give the slot back to the OSS."""
        self._link.release(name)


class OssCoordinator(ClusterCoordinator):
    """ClusterCoordinator over the OSS's instances; records the run as an OSS program."""

    def __init__(
        self,
        inner: Coordinator,
        placement: str,
        link: ProgramLink,
        cwd: str,
        reconnect_window: float | None = None,
        *,
        creds: Callable[[int], tuple[int, int, tuple[int, ...]]] = credentials,
        view: View = EMPTY,
    ) -> None:
        super().__init__(
            inner, [], Placement(placement, []), reconnect_window, creds=creds, view=view
        )
        self._base_view = view  # the OSS stored it with the program; its id goes in
        self.oss_placement = OssPlacement(placement, link, self.targets)
        self.placement = self.oss_placement
        self._link = link
        self._cwd = cwd
        self._root: int | None = None
        self._root_status: tuple[int | None, int | None] | None = None
        self.refused: str | None = None  # why the OSS could not take the program
        # Issue 13: servers at home reached at the program's address (local runs as
        # root; set by whoever builds this coordinator, before the run starts).
        self.home_listeners: HomeListeners | None = None
        # Placed processes: pid -> (instance, argv, end status or None while running);
        # read by the watcher thread (lost instances).
        self._placed: dict[int, tuple[str, str, int | None]] = {}
        self._placed_lock = threading.Lock()
        # Issue 12 (failover): exec ticket nonce -> placed pid; nonces being restored.
        self._nonces: dict[str, int] = {}
        self._restoring: set[str] = set()
        self._last_nonce = ""
        link.on_restoring = self._restoring.update
        link.on_restored = self._restored

    def interception(self) -> frozenset[str]:
        """ClusterCoordinator's, plus the calls that signal a pid (issue 11), and listen
        when servers at home are steered (issue 13)."""
        home = frozenset({"listen"}) if self.home_listeners is not None else frozenset()
        return super().interception() | frozenset(SIGNAL_CALLS) | home

    def _home_listen(self, call: SyscallCall) -> bool:
        return (call.name == "listen" and self.home_listeners is not None
                and call.name not in self._inner_calls)  # fmt: skip

    def on_result(self, call: SyscallCall, result: int, output: bytes | None) -> Complete | None:
        """A listen at home is steered (issue 13); the rest as ClusterCoordinator."""
        if self._home_listen(call):
            assert self.home_listeners is not None
            return self.home_listeners.on_result(call, signed(result))
        return super().on_result(call, result, output)

    def on_syscall(self, call: SyscallCall) -> Decision | Defer:
        """The program's first exec submits it; a signal for a pid forked on an
        instance goes through the OSS; then as ClusterCoordinator."""
        index = SIGNAL_CALLS.get(call.name)
        if index is not None and call.name not in self._inner_calls:
            return self._signal(call, index)
        if self._home_listen(call):
            return Allow(observe_result=True)
        if self._root is None and call.name in EXEC_CALLS:
            self._root = call.pid
            argv = [a.decode(errors="replace")[:ARG_MAX] for a in (call.argv or ())[:ARG_MAX]]
            try:
                self._link.submit(argv or ["?"], self._cwd)
            except OssCannotRun as exc:
                # The program never starts: its exec fails and dcptrace reports it.
                self.refused = str(exc)
                log.error("%s", exc)
                return Complete(-errno.EHOSTDOWN)
        return super().on_syscall(call)

    def _signal(self, call: SyscallCall, index: int) -> Decision:
        """A pid of this machine runs as it is; one forked on an instance goes to the OSS."""
        thread = call.name == "tkill" or (call.name == "tgkill" and call.args[0] != call.args[1])
        pid = signed(call.args[1 if call.name == "tgkill" else 0], 32)
        if pid < PID_MAX_LIMIT:
            return Allow()
        sig = call.args[index]
        if not 0 <= sig < 65:
            return Complete(-errno.EINVAL)
        return Complete(0 if self._link.signal(pid, sig, thread, call.pid) else -errno.ESRCH)

    def watch_limits(self, on_stop: Callable[[str], None]) -> None:
        """Limits act: `on_stop(reason)` once the OSS stops the program (a hard budget...).

        Lost instances are said here too: one line per failed instance naming the
        processes that ended with it (beside each deputy's own line).
        """
        self._link.watch(on_stop, self._say_lost)

    def final_stop(self) -> str | None:
        """Asked as the program's main process ends: did a limit stop it?  A stop order
        can end the program (its children killed on their instances) before the watcher's
        next look, and the end must still be reported as the limit's."""
        return self._link.stop_now()

    def _place(self, call: SyscallCall, decision: Allow | Rewrite) -> Rewrite | None:
        placed = super()._place(call, decision)
        if placed is not None:
            self._nonces[self._last_nonce] = call.pid
        if placed is not None and call.argv is not None:
            argv = b" ".join(a for a in call.argv[:8]).decode(errors="replace")
            with self._placed_lock:
                self._placed[call.pid] = (self.instance_of(call.pid), argv[:80], None)
        return placed

    def lost_on(self, instance: str) -> list[str]:
        """The placed processes on `instance` still running, or ended lost (status 255)."""
        restoring = {pid for nonce, pid in self._nonces.items() if nonce in self._restoring}
        with self._placed_lock:
            return [
                argv
                for pid, (where, argv, status) in self._placed.items()
                if where == instance and status in (None, LOST_STATUS) and pid not in restoring
            ]

    def _gone(self, instance: str) -> None:
        """Deputies of processes lost with `instance` and not to be restored (no
        checkpoint) end now, not at the end of their long failover window (issue 12)."""
        restoring = {pid for nonce, pid in self._nonces.items() if nonce in self._restoring}
        with self._placed_lock:
            gone = [
                pid
                for pid, (where, _argv, status) in self._placed.items()
                if where == instance and status is None and pid not in restoring
            ]
        for pid in gone:
            path = self._ticket_files.get(pid)
            if path is not None and self.drop.redirect(path, P.GONE):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGRTMIN + P.WAKE_RT)

    def _restored(self, restored: dict[str, Any]) -> None:
        """A placed process was restored from its checkpoint on another instance (issue
        12): its deputy is told where (a note beside its ticket) and resumes there.  If
        the OSS gave its restore up, the deputy ends now with the OSS's reason."""
        pid = self._nonces.get(str(restored["nonce"]))
        path = self._ticket_files.get(pid) if pid is not None else None
        if pid is None or path is None:
            return
        if restored.get("error"):
            self._restoring.discard(str(restored["nonce"]))
            cause = str(restored["error"]).encode(errors="replace")[:2000]
            if self.drop.redirect(path, P.GONE + b":" + cause):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGRTMIN + P.WAKE_RT)
            return
        note = P.unpairs(
            {
                b"addr": str(restored["address"]).encode(),
                b"instance": str(restored["instance"]).encode(),
                b"salt": str(restored["salt"]).encode(),
            }
        )
        if not self.drop.redirect(path, note):
            return
        with contextlib.suppress(OSError):  # its old connection may look alive: hang up
            os.kill(pid, signal.SIGRTMIN + P.WAKE_RT)
        with self._placed_lock:
            if pid in self._placed:
                _where, argv, status = self._placed[pid]
                self._placed[pid] = (str(restored["instance"]), argv, status)
        self._where[pid] = str(restored["instance"])
        age = max(0.0, time.time() - float(restored["taken"]))
        print(
            f"dcptrace: pid {pid} restored on {restored['instance']} from its checkpoint"
            f" of {age:.1f} s before (instance {restored['lost']} lost): what it wrote"
            " since then comes again",
            file=sys.stderr,
            flush=True,
        )

    def _say_lost(self, instance: str) -> None:
        if self._link.checkpoint_every is not None:
            self._gone(instance)
        names = self.lost_on(instance)
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        n = len(names)
        with self._placed_lock:
            back = sum(
                1
                for nonce, pid in self._nonces.items()
                if nonce in self._restoring and self._placed.get(pid, ("",))[0] == instance
            )
        print(
            f"dcptrace: instance {instance} lost: {n} process{'es' if n != 1 else ''} ended"
            + (f" ({shown})" if names else "")
            + (f"; {back} to be restored from checkpoints" if back else ""),
            file=sys.stderr,
            flush=True,
        )

    def _choose(self, ident: Ident, call: SyscallCall) -> str:
        name = self.oss_placement.choose_for(ident)
        program = getattr(self._link, "program_id", None)
        if program and self.view.program != program:
            # The tickets bind the OSS's program id: the deputies' view names it too.
            self.view = dataclasses.replace(self._base_view, program=program)
        return name

    def _ticket(self, target: Target, ident: Ident) -> str:
        ticket = self.oss_placement.granted.pop(target.name)
        self._last_nonce = ticket.split(".")[2] if ticket.count(".") >= 2 else ""
        return ticket

    def on_process(self, event: ProcessEvent) -> None:
        """Note the root's end status; release placements (ClusterCoordinator)."""
        if isinstance(event, ProcessExited) and event.pid == self._root:
            self._root_status = (event.exit_status, event.signal)
        if isinstance(event, ProcessExited):
            with self._placed_lock:
                if event.pid in self._placed:
                    where, argv, _ = self._placed[event.pid]
                    end = event.exit_status
                    if end is None:
                        end = 128 + (event.signal or 0)
                    self._placed[event.pid] = (where, argv, end)
            if self.home_listeners is not None and self.home_listeners.watched:
                self.home_listeners.exited(event.pid)
        super().on_process(event)

    def measured(self, final_wait: float) -> dict[str, Any] | None:
        """The placed processes as the OSS measured them (for --record)."""
        if self._root is None:
            return None
        return self._link.processes(final_wait)

    def close(self) -> None:
        """Finish the program with the root's status (cancel it if the root was not seen)."""
        super().close()
        if self._root is None:
            return  # never submitted
        status, sig = self._root_status or (None, None)
        self._link.finish(status, sig)


class _Bridge:
    """A private event loop in a thread, running OSS client calls for the tracer thread."""

    def __init__(self) -> None:
        import asyncio  # here: a run that never asks the OSS does not load asyncio

        self._asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="dcp-oss-client", daemon=True
        )
        self._thread.start()
        self._later: set[concurrent.futures.Future[Any]] = set()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coro` on the loop and wait (the coroutine enforces its own timeout too)."""
        fut = self._asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def later(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Run `coro` on the loop without waiting; `drain` waits for it."""
        fut = self._asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._later.add(fut)
        fut.add_done_callback(self._later.discard)
        return fut

    def drain(self, timeout: float) -> None:
        """Wait (bounded) for everything started with `later`."""
        if self._later:
            concurrent.futures.wait(list(self._later), timeout)

    def close(self, timeout: float) -> None:
        """Cancel what is left, stop the loop, join the thread."""
        for fut in list(self._later):
            fut.cancel()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


def stop_line(stop: Any, status_reason: str) -> str:
    """`stopped: program hard budget of 1000 micros reached (spent 1100) [level program]`."""
    from oss.billing.limits import Breach, Level

    if stop is None:
        return status_reason or "stopped by the OSS"
    b = Breach(Level(stop.level), stop.resource, stop.limit, stop.value)
    return f"stopped: {b.message()} [level {stop.level}]"


def _reason(exc: BaseException) -> str:
    """One line for an OSS client error (the cause of an unreachable OSS, not its repr)."""
    from oss.client import Unreachable

    if isinstance(exc, TimeoutError) or isinstance(exc.__cause__, TimeoutError):
        return "timed out"
    if isinstance(exc, Unreachable) and exc.__cause__ is not None:
        return str(exc.__cause__) or type(exc.__cause__).__name__
    return str(exc) or type(exc).__name__


def follow_restorations(
    news: Sequence[dict[str, Any]],
    seen: set[str],
    on_restoring: Callable[[set[str]], None] | None,
    on_restored: Callable[[dict[str, Any]], None] | None,
) -> set[str]:
    """Hand the OSS's restorations of the program to the coordinator (issue 12): those
    under way (no `instance` yet, no `error`) as a set of nonces, each done or given-up
    one once; the nonces handed on so far."""
    pending = {str(r["nonce"]) for r in news if not r.get("instance") and not r.get("error")}
    if pending and on_restoring is not None:
        on_restoring(pending)
    for r in news:
        if (r.get("instance") or r.get("error")) and str(r["nonce"]) not in seen:
            seen = seen | {str(r["nonce"])}
            if on_restored is not None:
                on_restored(r)
    return seen


def fencing(
    storage: Any, on_restored: Callable[[dict[str, Any]], None]
) -> Callable[[dict[str, Any]], None]:
    """`on_restored`, then the lost instance is fenced from the run's storage
    (`RunStorage.fence`): the deputy follows the restored copy now, and the old one,
    if its instance is only frozen or cut off, writes nothing more into the program's
    files until it is killed when its instance is back."""

    def restored(news: dict[str, Any]) -> None:
        on_restored(news)
        if not news.get("error") and news.get("lost"):
            storage.fence(str(news["lost"]))

    return restored


class OssProgramLink:
    """`ProgramLink` over HTTP: the typed `oss.client.OssClient` on a private loop."""

    def __init__(
        self,
        config: OssModeConfig,
        view: View = EMPTY,
        storage: Any = None,
        cwd_note: str | None = None,
    ) -> None:
        from oss.client import OssClient  # pydantic and aiohttp only in --oss mode

        self.config = config
        self.view = view  # submitted with the program (issue 10)
        self._bridge = _Bridge()
        self._client = OssClient(config.url, config.token, timeout=config.timeout)
        # Issue 14: the run's storage (oss.storage.run.RunStorage), which the OSS relays
        # to each instance a process is placed on before that process starts there.
        self.storage = storage
        self._spec_given = False  # the spec goes to the OSS with the first mount
        self._cwd_note = cwd_note  # why the cwd is not shared: said at the first placement
        self._mounted: set[str] = set()
        # A mount failed there: said once, avoided by every later placement.
        self._unmountable: set[str] = set()
        self._storage_client = (
            OssClient(config.url, config.token, timeout=STORAGE_TIMEOUT) if storage else None
        )
        self._submitted: concurrent.futures.Future[str | None] | None = None
        self._width = SPREAD_WIDTH
        self._warned: set[str] = set()
        self.program_id: str | None = None
        self._on_stop: Callable[[str], None] | None = None
        self._on_lost: Callable[[str], None] | None = None
        self._lost_said: set[str] = set()
        self._watching = False
        self.stopped: str | None = None  # why a limit stopped the program (then no finish)
        self.placed = 0  # processes placed with a ticket (the record waits for their rows)
        self.checkpoint_every: float | None = None  # issue 12 (failover)
        self.on_restoring: Callable[[set[str]], None] | None = None
        self.on_restored: Callable[[dict[str, Any]], None] | None = None
        self._restored_seen: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._bridge.call(coro, self.config.timeout + 5)

    def check(self) -> int | None:
        """Reach the OSS with the token before the program runs; the account's instance limit."""
        from oss import errors

        try:
            limits = self._call(self._client.request("GET", "/v1/limits"))
        except errors.Unauthorized as exc:
            raise OssRefused(
                f"the OSS at {self.config.url} refused the token in {TOKEN_ENV}: {exc}"
            ) from exc
        except (errors.OssError, TimeoutError) as exc:
            reason = _reason(exc)
            raise OssUnreachable(f"cannot use the OSS at {self.config.url}: {reason}") from exc
        limit = limits.get("max_instances") if isinstance(limits, dict) else None
        return limit if isinstance(limit, int) else None

    def start(self, width: int | None) -> None:
        """Remember the spread width (from `check`)."""
        self._width = max(1, min(SPREAD_WIDTH, width if width is not None else SPREAD_WIDTH))

    def submit(self, argv: Sequence[str], cwd: str) -> None:
        """Submit (in the background with a local fallback: the first placement waits).

        Without the fallback the answer is awaited: when the OSS has no instance
        for the program, it is cancelled there and OssCannotRun says why.
        """
        if self.config.fallback_local:
            self._submitted = self._bridge.later(self._submit(list(argv), cwd))
            return
        from oss import errors

        try:
            prog = self._call(self._submit_now(list(argv), cwd))
        except (errors.OssError, ValueError, TimeoutError) as exc:
            raise OssCannotRun(
                f"the OSS at {self.config.url} did not take the program ({_reason(exc)}): "
                f"nothing ran ({FALLBACK_ENV}=local runs it on this machine instead)"
            ) from exc
        if prog.state == "pending":
            with contextlib.suppress(errors.OssError, TimeoutError):
                self._call(self._client.cancel(prog.id))
            raise OssCannotRun(
                f"the OSS at {self.config.url} has no ready instance with room for the program "
                "(every instance failed, none is registered, or all are full): nothing ran "
                f"({FALLBACK_ENV}=local runs it on this machine instead)"
            )
        self.program_id = prog.id
        self._bridge.loop.call_soon_threadsafe(self._start_watch)
        done: concurrent.futures.Future[str | None] = concurrent.futures.Future()
        done.set_result(prog.id)
        self._submitted = done

    async def _submit_now(self, argv: list[str], cwd: str) -> Any:
        """Submit the program; release what it reserved for the root (which runs here)."""
        from oss import models as m

        spec: dict[str, Any] = {"argv": argv, "cwd": cwd or "/"}
        v = self.view
        spec["view"] = m.ViewSpec.model_validate(
            {"maps": list(v.maps), "placement": v.placement, "metering": v.metering, "home": v.home}
        )
        if self.config.placement == "spread":
            spec["scaling_policy"] = m.ScalingPolicy(
                min_instances=self._width, max_instances=self._width
            )
        if self.checkpoint_every is not None:  # issue 12: failover from checkpoints
            spec["checkpoint_every"] = self.checkpoint_every
        prog = await self._client.submit(m.ProgramSubmit(**spec))
        for p in prog.placements:
            await self._client.release(prog.id, p.instance, p.processes)
        return prog

    async def _submit(self, argv: list[str], cwd: str) -> str | None:
        from oss import errors

        try:
            prog = await self._submit_now(argv, cwd)
        except (errors.OssError, ValueError) as exc:
            self._warn_once(
                "submit", f"the OSS did not take the program ({_reason(exc)}): it all runs here"
            )
            return None
        if prog.state == "pending":
            self._warn_once(
                "pending", f"no OSS instance has room for program {prog.id}: processes run here"
            )
        self.program_id = prog.id
        self._start_watch()
        return prog.id

    def _program(self) -> str | None:
        if self._submitted is None:
            return None
        try:
            return self._submitted.result(self.config.timeout * 2 + 5)
        except (Exception, concurrent.futures.CancelledError) as exc:
            # Never the program's problem: its processes run here.
            self._warn_once("submit", f"the OSS did not take the program: {_reason(exc)}")
            return None

    def place(self, avoid: Sequence[str], ident: Ident) -> Grant | None:
        """One placement with its exec ticket, or None (this process runs here)."""
        from oss import errors

        pid = self._program()
        if pid is None:
            return None
        try:
            got = self._call(
                self._client.place(
                    pid,
                    1,
                    [*avoid, *sorted(self._unmountable)],  # where the storage is not: never
                    exec_as={
                        "uid": ident.uid,
                        "gid": ident.gid,
                        "groups": list(ident.groups),
                        "digest": ident.digest,
                    },
                )
            )
        except errors.BudgetExhausted as exc:
            # A soft budget reached: no new instance for the program; it runs here.
            said = str(exc).removeprefix(errors.BudgetExhausted().message + ": ")
            self._warn_once("soft", f"{said}: no new instances")
            return None
        except Exception as exc:  # an OSS failure must not fail the program's exec
            code = exc.code if isinstance(exc, errors.OssError) else type(exc).__name__
            self._warn_once(
                f"place:{code}", f"the OSS placed no process ({_reason(exc)}): they run here"
            )
            return None
        for g in got.exec_grants:
            if g.tickets:
                if not self._mount_on(pid, g.instance):
                    self.release(g.instance)
                    return None
                if self._cwd_note is not None:
                    self._warn_once("cwd", self._cwd_note)
                self.placed += 1
                return Grant(g.instance, g.address, g.tickets[0])
        for a in got.assignments:  # placed where no ticket can be had: give it back
            self.release(a.instance)
            self._warn_once(
                f"noticket:{a.instance}",
                f"instance {a.instance} takes no exec tickets (its agent sent no exec key): "
                "processes placed there run here",
            )
        return None

    def _mount_on(self, pid: str, instance: str) -> bool:
        """The run's storage is mounted on `instance` (the first time: the OSS relays it
        there and waits for the agent); False: it is not, the process runs here."""
        from oss import errors
        from oss.storage import StorageError

        if self.storage is None or instance in self._mounted:
            return True
        if instance in self._unmountable:
            return False  # said once: no second wait for a mount that failed
        assert self._storage_client is not None
        path = f"/v1/programs/{pid}/storage/mounts"
        try:
            if not self._spec_given:  # the server starts now: the first process placed
                spec = self.storage.spec()
                self._bridge.call(
                    self._storage_client.request("PUT", f"/v1/programs/{pid}/storage", spec),
                    STORAGE_TIMEOUT + 5,
                )
                self._spec_given = True
            self._bridge.call(
                self._storage_client.request("POST", path, {"instance": instance}),
                STORAGE_TIMEOUT + 5,
            )
        except (errors.OssError, TimeoutError, StorageError) as exc:
            self._unmountable.add(instance)
            self._warn_once(
                f"mount:{instance}",
                f"the program's storage is not mounted on {instance} ({_reason(exc)}): "
                "processes placed there run here",
            )
            return False
        self._mounted.add(instance)
        return True

    def unmount(self) -> None:
        """Unmount the run's storage on every instance (each publishes what is still open)."""
        from oss import errors

        pid = self.program_id
        if self.storage is None or self._storage_client is None or pid is None:
            return
        if not self._spec_given:
            return  # nothing was placed: no server ran, no instance mounted
        try:
            got = self._bridge.call(
                self._storage_client.request("DELETE", f"/v1/programs/{pid}/storage"),
                STORAGE_TIMEOUT + 5,
            )
        except (errors.OssError, TimeoutError) as exc:
            log.warning("the program's storage was not unmounted: %s", _reason(exc))
            return
        for instance, why in (got.get("failed") or {}).items():
            log.warning("the program's storage on %s was not unmounted: %s", instance, why)
        # Measured bytes per tier over time, into the OSS's ledger (billing.json keeps them too).
        used = self.storage.gib_seconds()
        if any(used.values()):
            try:
                self._bridge.call(
                    self._storage_client.request(
                        "POST", f"/v1/programs/{pid}/storage/usage", {"gib_seconds": used}
                    ),
                    self.config.timeout + 5,
                )
            except (errors.OssError, TimeoutError) as exc:
                log.warning("the program's storage was not billed by the OSS: %s", _reason(exc))

    def signal(self, pid: int, sig: int, thread: bool = False, sender: int = 0) -> bool:
        """`POST /v1/programs/{id}/signals`; False if the OSS refused or did not answer."""
        program = self._program()
        if program is None:
            return False
        try:
            self._call(self._client.signal(program, pid, sig, thread, sender))
        except Exception as exc:  # kill then fails ESRCH; the program goes on
            log.debug("signal %d for pid %d: %s", sig, pid, _reason(exc))
            return False
        return True

    def release(self, instance: str) -> None:
        """Release one process's placement in the background."""
        if self.program_id is not None:
            self._bridge.later(self._release(self.program_id, instance))

    def note(self, text: str) -> None:
        """A line for the program's log in the OSS (in the background; the placement
        decisions of the cost model).  Dropped before the program is submitted."""
        if self.program_id is not None:
            self._bridge.later(self._note(self.program_id, text))

    async def _note(self, pid: str, text: str) -> None:
        from oss import errors
        from oss import models as m

        try:
            await self._client.append_logs(pid, [m.LogLineIn(text=text[:4000])])
        except errors.OssError as exc:
            log.debug("placement note for %s: %s", pid, exc)

    async def _release(self, pid: str, instance: str) -> None:
        from oss import errors

        try:
            await self._client.release(pid, instance, 1)
        except errors.OssError as exc:
            log.debug("release of %s on %s: %s", pid, instance, exc)

    def processes(self, final_wait: float) -> dict[str, Any] | None:
        """The OSS's record of the placed processes, once each has its final figures (at
        most `final_wait` s); None without a program or when the OSS cannot say."""
        from oss import errors

        pid = self._program()
        if pid is None:
            return None
        try:
            got = self._call(self._client.processes(pid, final_wait, self.placed))
        except (errors.OssError, TimeoutError) as exc:
            log.warning("the OSS did not give the processes of %s: %s", pid, _reason(exc))
            return None
        return got.model_dump(mode="json")

    def finish(self, exit_status: int | None, signal: int | None) -> None:
        """Wait for the releases, then finish (or cancel) the program."""
        from oss import errors

        pid = self._program()
        if pid is None or self.stopped is not None:
            return  # a stopped program's end is already recorded by the OSS
        self._bridge.drain(self.config.timeout + 5)
        try:
            if exit_status is None and signal is None:
                self._call(self._client.cancel(pid))
            else:
                self._call(self._client.finish(pid, exit_status, signal))
        except (errors.OssError, TimeoutError) as exc:
            log.warning("the OSS did not record the end of program %s: %s", pid, _reason(exc))

    def watch(
        self, on_stop: Callable[[str], None], on_lost: Callable[[str], None] | None = None
    ) -> None:
        """Poll the program's state (each WATCH_INTERVAL): a limit stopped it, or an
        instance it ran on failed (its status names the instance: said once each)."""
        self._on_stop = on_stop
        self._on_lost = on_lost
        self._bridge.loop.call_soon_threadsafe(self._start_watch)

    def _start_watch(self) -> None:
        """On the bridge loop: start the watcher once both the program and the callback exist."""
        if self._watching or self._on_stop is None or self.program_id is None:
            return
        self._watching = True
        self._bridge.later(self._watch(self.program_id, self._on_stop))

    async def _watch(self, pid: str, on_stop: Callable[[str], None]) -> None:
        import asyncio

        from oss import errors

        suspended = False  # said once per suspension
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                prog = await self._client.program(pid)
            except errors.OssError as exc:
                log.debug("watching program %s: %s", pid, _reason(exc))
                continue
            if prog.state in ("stopped_budget", "stopped_limit"):
                self.stopped = stop_line(prog.stop, prog.status_reason)
                on_stop(self.stopped)
                return
            if prog.state == "suspended" and not suspended:
                say_suspended(pid)
            suspended = prog.state == "suspended"
            if self.checkpoint_every is not None and self.on_restored is not None:
                with contextlib.suppress(errors.OssError, TimeoutError):
                    news = await self._client.request("GET", f"/v1/programs/{pid}/restorations")
                    restored = self.on_restored
                    if self.storage is not None and restored is not None:
                        restored = fencing(self.storage, restored)
                    self._restored_seen = follow_restorations(
                        news, self._restored_seen, self.on_restoring, restored
                    )
            failed = LOST_REASON.match(prog.status_reason)
            if failed and self._on_lost and failed[1] not in self._lost_said:
                self._lost_said.add(failed[1])
                self._on_lost(failed[1])
            if prog.state not in WATCHED:
                return

    def stop_now(self) -> str | None:
        """As `ProgramLink.stop_now`: one read of the program (bounded by the timeout)."""
        from oss import errors

        pid = self.program_id
        if self.stopped is not None or pid is None:
            return self.stopped
        try:
            prog = self._call(self._client.program(pid))
        except (errors.OssError, TimeoutError) as exc:
            log.debug("reading program %s at its end: %s", pid, _reason(exc))
            return None
        if prog.state in ("stopped_budget", "stopped_limit"):
            self.stopped = stop_line(prog.stop, prog.status_reason)
        return self.stopped

    def close(self) -> None:
        """Unmount the run's storage; close the clients and the private loop."""
        self.unmount()
        with contextlib.suppress(Exception):
            self._call(self._client.close())
        if self._storage_client is not None:
            with contextlib.suppress(Exception):
                self._call(self._storage_client.close())
        self._bridge.close(5.0)


class LocalProgramLink:
    """`ProgramLink` to the OSS of a `dcptrace --instances` run: direct calls, no HTTP.

    The OSS (`oss.local.PrivateOss`) runs on a loop thread of this process;
    every call runs there under `timeout`.  Failures never fail the program:
    the process runs here, and the reason is logged once.
    """

    def __init__(self, private: Any, view: View = EMPTY, timeout: float = 10.0) -> None:
        self.private = private
        self.view = view
        self.timeout = timeout
        self.program_id: str | None = None
        self._later: set[concurrent.futures.Future[Any]] = set()
        self._warned: set[str] = set()
        self._watch: tuple[Callable[[str], None], Callable[[str], None] | None] | None = None
        self._watcher: concurrent.futures.Future[Any] | None = None
        self.stopped: str | None = None  # why a limit stopped the program (then no finish)
        self.placed = 0  # processes placed with a ticket (the record waits for their rows)
        self.checkpoint_every: float | None = None  # issue 12 (failover)
        self.on_restoring: Callable[[set[str]], None] | None = None
        self.on_restored: Callable[[dict[str, Any]], None] | None = None
        self._restored_seen: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def _failover_news(self, pid: str) -> None:
        """Sessions of the program being restored, and those restored since the last
        look, to the coordinator (issue 12); on the OSS's loop."""
        news = [r.model_dump(mode="json") for r in self.private.oss.failover.of_program(pid)]
        self._restored_seen = follow_restorations(
            news, self._restored_seen, self.on_restoring, self.on_restored
        )

    def submit(self, argv: Sequence[str], cwd: str) -> None:
        """Submit the program with its view; release the root's slot (it runs here)."""
        from oss import errors

        try:
            prog = self.private.call(self._submit(list(argv), cwd), self.timeout)
        except (errors.OssError, ValueError, TimeoutError) as exc:
            raise OssCannotRun(f"the OSS of this run did not take the program: {exc}") from exc
        if prog is None:
            raise OssCannotRun(
                "no local instance has room for the program (every one failed): nothing ran"
            )
        self.program_id = prog
        if self._watch is not None:
            self._start_watch(prog, *self._watch)

    def watch(
        self, on_stop: Callable[[str], None], on_lost: Callable[[str], None] | None = None
    ) -> None:
        """As `OssProgramLink.watch`, reading the run's own OSS directly."""
        self._watch = (on_stop, on_lost)
        if self.program_id is not None:
            self._start_watch(self.program_id, on_stop, on_lost)

    def _start_watch(
        self, pid: str, on_stop: Callable[[str], None], on_lost: Callable[[str], None] | None
    ) -> None:
        # Not among `_later` (what finish waits for): it ends with the program's state.
        self._watcher = self.private.later(self._watching(pid, on_stop, on_lost))

    async def _watching(
        self, pid: str, on_stop: Callable[[str], None], on_lost: Callable[[str], None] | None
    ) -> None:
        import asyncio

        from oss import errors
        from oss import models as m

        said: set[str] = set()
        suspended = False  # said once per suspension
        who = self.private.principal
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                prog = await self.private.oss.programs.program(who.account_id, pid)
            except errors.OssError:
                continue
            if prog["state"] in ("stopped_budget", "stopped_limit"):
                stop = m.StopInfo.model_validate(prog["stop"]) if prog["stop"] else None
                self.stopped = stop_line(stop, prog["status_reason"])
                # Off the OSS's loop: the callback kills tracees and waits for them.
                threading.Thread(target=on_stop, args=(self.stopped,), daemon=True).start()
                return
            if prog["state"] == "suspended" and not suspended:
                say_suspended(pid)
            suspended = prog["state"] == "suspended"
            self._failover_news(pid)
            failed = LOST_REASON.match(prog["status_reason"])
            if failed and on_lost is not None and failed[1] not in said:
                said.add(failed[1])
                on_lost(failed[1])
            if prog["state"] not in WATCHED:
                return

    def stop_now(self) -> str | None:
        """As `ProgramLink.stop_now`, reading the run's own OSS directly."""
        pid = self.program_id
        if self.stopped is not None or pid is None:
            return self.stopped
        try:
            reason = self.private.call(self._stop_reason(pid), self.timeout)
        except Exception as exc:  # noqa: BLE001 - the end is reported either way
            log.debug("reading program %s at its end: %s", pid, exc)
            return None
        if reason is not None:
            self.stopped = reason
        return self.stopped

    async def _stop_reason(self, pid: str) -> str | None:
        from oss import models as m

        prog = await self.private.oss.programs.program(self.private.principal.account_id, pid)
        if prog["state"] not in ("stopped_budget", "stopped_limit"):
            return None
        stop = m.StopInfo.model_validate(prog["stop"]) if prog["stop"] else None
        return stop_line(stop, prog["status_reason"])

    async def _submit(self, argv: list[str], cwd: str) -> str | None:
        from oss import models as m

        oss, who, v = self.private.oss, self.private.principal, self.view
        view = m.ViewSpec.model_validate(
            {"maps": list(v.maps), "placement": v.placement, "metering": v.metering, "home": v.home}
        )
        prog = await oss.submit(
            who,
            m.ProgramSubmit(
                argv=argv, cwd=cwd or "/", view=view, checkpoint_every=self.checkpoint_every
            ),
        )
        if prog["state"] == "pending":
            await oss.cancel(who, prog["id"])
            return None
        for p in prog["placements"]:
            await oss.programs.release(who.account_id, prog["id"], p["instance"], p["processes"])
        return str(prog["id"])

    def processes(self, final_wait: float) -> dict[str, Any] | None:
        """The run's OSS's record of the placed processes (for --record)."""
        if self.program_id is None:
            return None
        try:
            got = self.private.call(self._processes(final_wait), final_wait + self.timeout)
        except Exception as exc:  # the record goes without them, said once
            self._warn_once("processes", f"the OSS gave no processes record ({exc})")
            return None
        return dict(got.model_dump(mode="json"))

    async def _processes(self, final_wait: float) -> Any:
        oss, who = self.private.oss, self.private.principal
        got = await oss.process_list(who.account_id, self.program_id, final_wait, self.placed)
        if oss.network is not None:  # issue 13: the record shows the program's address
            address = await oss.network.address_ever(self.program_id)
            if address:
                got = got.model_copy(update={"address": address})
        return got

    def signal(self, pid: int, sig: int, thread: bool = False, sender: int = 0) -> bool:
        """Through the run's OSS (`oss.ipc.signals`); False if it runs nowhere."""
        if self.program_id is None:
            return False
        try:
            self.private.call(self._signal(pid, sig, thread, sender), self.timeout)
        except Exception as exc:  # kill then fails ESRCH; the program goes on
            log.debug("signal %d for pid %d: %s", sig, pid, exc)
            return False
        return True

    async def _signal(self, pid: int, sig: int, thread: bool = False, sender: int = 0) -> Any:
        from oss import models as m
        from oss.ipc import signals

        oss, who, program = self.private.oss, self.private.principal, self.program_id
        assert program is not None
        body = m.SignalRequest(pid=pid, signal=sig, thread=thread, sender=sender)
        return await signals.send_from_home(oss, who.account_id, program, body)

    def place(self, avoid: Sequence[str], ident: Ident) -> Grant | None:
        """One placement with its exec ticket, or None (this process runs here)."""
        if self.program_id is None:
            return None
        try:
            got: Grant | None = self.private.call(self._place(list(avoid), ident), self.timeout)
        except Exception as exc:  # an OSS failure must not fail the program's exec
            self._warn_once(
                f"place:{type(exc).__name__}", f"the OSS placed no process ({exc}): they run here"
            )
            return None
        return got

    async def _place(self, avoid: list[str], ident: Ident) -> Grant | None:
        from oss import errors
        from oss import models as m

        oss, who, pid = self.private.oss, self.private.principal, self.program_id
        try:
            got = await oss.place(who.account_id, pid, 1, avoid)
        except errors.BudgetExhausted as exc:
            said = str(exc).removeprefix(errors.BudgetExhausted().message + ": ")
            self._warn_once("soft", f"{said}: no new instances")
            return None
        except (errors.NoCapacity, errors.LimitExceeded):
            return None
        exec_as = m.ExecIdentity(
            uid=ident.uid, gid=ident.gid, groups=list(ident.groups), digest=ident.digest
        )
        for g in await oss.exec_grants(got, exec_as, pid):
            if g["tickets"]:
                self.placed += 1
                return Grant(g["instance"], g["address"], g["tickets"][0])
        for a in got:  # an instance without an exec key: give the slot back
            await oss.programs.release(who.account_id, pid, a["instance"], a["processes"])
        return None

    def home_listener(self, pid: int, port: int, proto: str, local: str, opened: bool) -> int:
        """A server at home opened (or closed) a listener: the run's OSS steers P:port home
        (issue 13).  0, or EADDRINUSE when an instance of the program holds the port."""
        from oss.network.plan import HOME
        from oss.network.store import PortTaken

        net = self.private.oss.network
        if self.program_id is None or net is None or net.config.home is None:
            return 0
        number = 6 if proto == "tcp" else 17
        program = self.program_id
        if opened:
            coro: Any = net.listen(program, HOME, pid, port, local, number)
        else:
            coro = net.unlisten(program, HOME, port, number)
        try:
            self.private.call(coro, self.timeout)
        except PortTaken:
            return errno.EADDRINUSE
        except Exception as exc:  # the server stays reachable at home's own addresses
            self._warn_once("home-listen", f"a server at home is not steered ({exc})")
        return 0

    def release(self, instance: str) -> None:
        """Release one process's placement (in the background)."""
        if self.program_id is None:
            return
        who = self.private.principal
        fut = self.private.later(
            self.private.oss.programs.release(who.account_id, self.program_id, instance, 1)
        )
        self._later.add(fut)
        fut.add_done_callback(self._later.discard)

    def finish(self, exit_status: int | None, signal: int | None) -> None:
        """Wait for the releases, then finish (or cancel) the program."""
        if self._watcher is not None:
            self._watcher.cancel()
        if self.program_id is None or self.stopped is not None:
            return  # a stopped program's end is already recorded by the OSS
        concurrent.futures.wait(list(self._later), self.timeout)
        oss, who = self.private.oss, self.private.principal
        try:
            if exit_status is None and signal is None:
                self.private.call(oss.cancel(who, self.program_id), self.timeout)
            else:
                self.private.call(
                    oss.finish(who, self.program_id, exit_status, signal), self.timeout
                )
        except Exception as exc:
            log.debug("the OSS of this run did not record the end: %s", exc)


@contextlib.contextmanager
def oss_clustered(
    inner: Coordinator,
    placement: str,
    oss_url: str,
    environ: Mapping[str, str] | None = None,
    reconnect_window: float | None = None,
    view: View = EMPTY,
    storage: Any = None,
    cwd_note: str | None = None,
    checkpoint_every: float | None = None,
) -> Iterator[OssCoordinator]:
    """The coordinator of `dcptrace --oss URL`; set-up errors as the tracer's errors.

    `storage` (oss.storage.run.RunStorage): the run's networked volume, mounted on
    each instance through the OSS before the first process placed there starts."""
    try:
        config = OssModeConfig.load(oss_url, placement, os.environ if environ is None else environ)
    except OssModeError as exc:
        raise UsageError(str(exc)) from exc
    link = OssProgramLink(config, view, storage, cwd_note)
    link.checkpoint_every = checkpoint_every  # issue 12: submitted with the program
    try:
        try:
            link.start(link.check())
        except OssRefused as exc:
            raise UsageError(str(exc)) from exc
        except OssUnreachable as exc:
            raise TracerError(str(exc)) from exc
        coordinator = OssCoordinator(
            inner, placement, link, os.getcwd(), reconnect_window, view=view
        )
        try:
            yield coordinator
        finally:
            coordinator.close()
    finally:
        link.close()
