"""The OSS core embedded in dcptrace: each run recorded in the user's local state.

Zero set-up: the same `Oss` that `dcp-oss serve` runs, on its own event loop in
a background thread of the tracer process, over SQLite under the user's data
directory (`$DCP_DATA`, else `$XDG_DATA_HOME/dcp`, else `~/.local/share/dcp`).
A run becomes a program of the local account placed on the instance `local`
(this machine, heartbeating while the run lasts); process lifecycle events go
to the program's consolidated log and the end status is recorded.
`dcp-oss serve --data` on the same directory shows it all through the API.

The program never waits for any of this: the thread starts once the program
is running and stays idle for its first `START_DELAY` seconds (or until it
ends), so a short run pays nothing while it runs and the recording happens
after dcptrace has returned; a long run appears in the state while it runs.
A failure here is reported once and never affects the run.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tracer.coordinator import ProcessEvent, ProcessExec, ProcessExited, ProcessSpawned

if TYPE_CHECKING:  # asyncio is imported by the recorder thread, off dcptrace's start-up
    import asyncio

log = logging.getLogger(__name__)

LOCAL_ACCOUNT = "local"
LOCAL_INSTANCE = "local"
TOKEN_FILE = "local-account.token"
START_DELAY = 2.0  # seconds the recorder idles before touching the state
RECORDER_NICE = 10  # added to the recorder thread's nice value


def default_data_dir() -> Path:
    """Where the embedded OSS keeps its state."""
    if os.environ.get("DCP_DATA"):
        return Path(os.environ["DCP_DATA"])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dcp"


class _Finish(NamedTuple):
    exit_status: int | None
    signal: int | None


class _Done:
    """Everything of the run is queued: the writer ends."""


_DONE = _Done()
# str: a line of the run's log (the placement decisions)
_Item = ProcessEvent | _Finish | _Done | str


class LocalOss:
    """Records one dcptrace run in the local OSS state, off the tracer's path."""

    def __init__(self, data_dir: Path, argv: tuple[str, ...], cwd: str) -> None:
        self.data_dir = data_dir
        self.argv = argv
        self.cwd = cwd
        self.program_id: str | None = None
        self.error: str | None = None
        self._pending: list[_Item] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Item] | None = None
        self._go = threading.Event()  # set when the program ends
        self._thread = threading.Thread(target=self._run, name="dcp-local-oss", daemon=True)

    def start(self) -> None:
        """Start the background OSS (call once the program runs)."""
        self._thread.start()

    def event(self, event: ProcessEvent) -> None:
        """Queue a process event (thread-safe, never blocks the tracer)."""
        self._put(event)

    def note(self, text: str) -> None:
        """Queue a line for the run's log (thread-safe, never blocks the tracer)."""
        self._put(text)

    def finish(self, exit_status: int | None, signal: int | None) -> None:
        """The main process ended: record the status."""
        self._put(_Finish(exit_status, signal))
        self._go.set()

    def close(self, timeout: float) -> None:
        """Wait (bounded) until everything is written; say so once if it was not."""
        if self._thread.ident is None:
            return  # never started: the program did not run
        self._put(_DONE)  # what came after the program's end (placement notes) is written too
        self._go.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.error = self.error or f"still writing after {timeout:.0f} s"
        if self.error:
            log.warning("this run is not recorded in %s: %s", self.data_dir, self.error)

    def _put(self, item: _Item) -> None:
        with self._lock:
            if self._loop is None or self._queue is None:
                self._pending.append(item)
                return
            loop, queue = self._loop, self._queue
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            pass  # the loop already ended (an error was recorded)

    def _run(self) -> None:
        self._go.wait(START_DELAY)
        # Recording (the OSS's imports and SQLite: ~0.1-0.2 s of CPU) mostly runs
        # after dcptrace returned: this thread alone yields to the caller's next
        # commands (a thread's nice value is its own on Linux).
        tid = threading.get_native_id()
        try:
            nice = os.getpriority(os.PRIO_PROCESS, tid) + RECORDER_NICE
            os.setpriority(os.PRIO_PROCESS, tid, min(nice, 19))
        except OSError:
            pass
        import asyncio

        try:
            asyncio.run(self._main())
        except Exception as exc:  # report, never disturb the traced program
            self.error = f"{type(exc).__name__}: {exc}"

    async def _main(self) -> None:
        # Imported here: the OSS core (pydantic models, SQLite) is not needed
        # before the program runs, and this import happens off the tracer's path.
        import asyncio
        import socket

        from oss.models import AgentHeartbeat, AgentRegister, Load, ProgramSubmit
        from oss.service import Oss, OssConfig

        # The store creates the directory 0700 (or refuses one others can read).
        oss = Oss(OssConfig(data_dir=self.data_dir, heartbeat_timeout=30.0))
        await oss.start()
        try:
            who = await self._principal(oss)
            await oss.mint_instance_token(LOCAL_INSTANCE)
            await oss.register(
                AgentRegister(
                    instance=LOCAL_INSTANCE, address="embedded", hostname=socket.gethostname(),
                    cpus=os.cpu_count() or 1, memory_mb=_memory_mb(),
                )
            )  # fmt: skip
            submit = ProgramSubmit(argv=list(self.argv)[:4096] or ["?"], cwd=self.cwd or "/")
            program = await oss.submit(who, submit)
            self.program_id = program["id"]
            queue: asyncio.Queue[_Item] = asyncio.Queue()
            with self._lock:
                self._loop, self._queue = asyncio.get_running_loop(), queue
                for item in self._pending:
                    queue.put_nowait(item)
                self._pending.clear()
            beat = 0

            def heartbeat() -> None:
                nonlocal beat
                beat += 1
                load = Load(cpu_percent=0.0, memory_used_mb=0, runqueue=os.getloadavg()[0],
                            processes=0)  # fmt: skip
                oss.heartbeat(AgentHeartbeat(instance=LOCAL_INSTANCE, seq=beat, load=load))

            while True:
                heartbeat()
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    continue
                if isinstance(item, _Done):
                    return
                if isinstance(item, _Finish):
                    await oss.finish(who, self.program_id, item.exit_status, item.signal)
                    continue
                text = item if isinstance(item, str) else _describe(item)
                await oss.program_log(self.program_id, text)
        finally:
            await oss.close()

    async def _principal(self, oss: Any) -> Any:
        import getpass

        token_file = self.data_dir / TOKEN_FILE
        if token_file.exists():
            return await oss.authenticate(token_file.read_text().strip())
        _account, _user, token = await oss.accounts.create_account(
            LOCAL_ACCOUNT, True, "sum", getpass.getuser()
        )
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return await oss.authenticate(token)


def _describe(event: ProcessEvent) -> str:
    match event:
        case ProcessSpawned(pid, ppid, thread):
            return f"{'thread' if thread else 'process'} {pid} started by {ppid} on local"
        case ProcessExec(pid, argv):
            return f"process {pid} exec {' '.join(argv)[:1000]}"
        case ProcessExited(pid, status, sig):
            how = f"exit status {status}" if sig is None else f"signal {sig}"
            return f"process {pid} ended: {how}"
    return repr(event)


def _memory_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return max(1, int(line.split()[1]) // 1024)
    except (OSError, ValueError):
        pass
    return 1


# -- the OSS of a `dcptrace --instances N` run (issue 10) --------------------------

RUN_ACCOUNT = "run"
SOCKET_NAME = "oss.sock"


class PrivateOssError(RuntimeError):
    """The OSS of this run could not start."""


class PrivateOss:
    """The OSS a `dcptrace --instances N` run places through, on a loop thread of its own.

    The same `Oss` as `dcp-oss serve`, over SQLite in `data_dir` (a temporary 0700
    directory: a run's placements are its own business), serving only the agent
    routes (register, heartbeat, placements and reports from instances) on a unix
    socket `socket_dir/oss.sock` (`socket_dir` 0700: only this user's agents reach
    it).  The home side calls the `Oss` directly (`call`), no HTTP.

    Instance tokens are made here, before the OSS is up, so the agents start at
    once, in parallel with it; the OSS adopts them as it starts.  A run's account
    may run processes as root (it is the user's own machine).
    """

    def __init__(self, data_dir: Path, socket_dir: Path, names: list[str]) -> None:
        import secrets

        self.data_dir = data_dir
        self.socket_path = socket_dir / SOCKET_NAME
        self.url = f"unix:{self.socket_path}"
        self.tokens = {n: "dcpi_" + secrets.token_urlsafe(32) for n in names}
        self.oss: Any = None
        self.principal: Any = None
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="dcp-run-oss", daemon=True)

    def start(self) -> None:
        """Start the OSS thread (returns at once; `wait_ready` waits)."""
        self._thread.start()

    def wait_ready(self, timeout: float) -> None:
        """Block until the OSS serves its socket; PrivateOssError if it failed or is late."""
        if not self._ready.wait(timeout):
            raise PrivateOssError(f"the OSS of this run did not start in {timeout:.0f} s")
        if self.error is not None:
            raise PrivateOssError(f"the OSS of this run failed: {self.error}") from self.error

    def call(self, coro: Any, timeout: float) -> Any:
        """Run a coroutine on the OSS loop and wait for it (bounded)."""
        import asyncio
        import concurrent.futures

        assert self.loop is not None
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def use_network(self, config: Any, nodes: Any, timeout: float) -> None:
        """Give the run's program an address on its instances (issue 13): `config` an
        `oss.network.manager.NetworkConfig`, `nodes` node -> network namespace."""
        from net.redirector import Redirector

        async def attach() -> None:
            self.oss.use_network(config, Redirector(nodes))
            await self.oss.network.start()

        self.call(attach(), timeout)

    def later(self, coro: Any) -> Any:
        """Run a coroutine on the OSS loop without waiting (a concurrent future)."""
        import asyncio

        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def note(self, text: str) -> None:
        """A line for the OSS log (thread-safe, never waits; dropped if the OSS is down)."""
        loop, oss = self.loop, self.oss
        if loop is None or oss is None:
            return
        try:
            loop.call_soon_threadsafe(oss.oss_log, text)
        except RuntimeError:
            pass  # the loop already ended

    def registered(self, timeout: float) -> list[str]:
        """Wait until every instance registered (bounded); the names still missing."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            missing = self.call(self._missing(), timeout=max(1.0, timeout))
            if not missing or time.monotonic() >= deadline:
                return list(missing)
            time.sleep(0.02)

    async def _missing(self) -> list[str]:
        ready = set(await self.oss.instances.ready_instances())
        return [n for n in self.tokens if n not in ready]

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving, close the OSS, join the thread."""
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        import asyncio

        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by wait_ready; never a traceback
            self.error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        import asyncio
        import getpass

        from aiohttp import web

        from oss.compute.instances import mint_instance
        from oss.server import make_app
        from oss.service import Oss, OssConfig

        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # Each local instance takes as many processes as a run may start at once.
        # Its directory is temporary and removed with the run: nothing in it outlives a
        # crash, so commits are not fsynced (a placement costs two commits).
        oss = Oss(OssConfig(data_dir=self.data_dir, slots_per_cpu=64, durable=False))
        await oss.start()
        try:
            now = oss.clock()

            def adopt(c: Any) -> None:
                for name, token in self.tokens.items():
                    mint_instance(c, name, None, token, now)

            await oss.store.write(adopt)
            _acct, _user, token = await oss.accounts.create_account(
                RUN_ACCOUNT, True, "sum", getpass.getuser(), True
            )
            self.principal = await oss.authenticate(token)
            self.oss = oss
            app = make_app(oss, manage=False, scopes=("agent",))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.UnixSite(runner, str(self.socket_path))
            await site.start()
            os.chmod(self.socket_path, 0o600)
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()
        finally:
            await oss.close()
