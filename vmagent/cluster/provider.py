"""LocalInstanceProvider: pool instances that are agents on this machine (autoscaling).

`dcp-oss serve --provider local=vmagent.cluster.provider:make --public-url URL`
lets pools naming provider `local` grow and shrink with local agents: `create`
starts `python -m vmagent --oss URL --instance NAME` (the token through an
inherited pipe, never argv or environ), which registers with the OSS like any
instance; `destroy` stops it by PID (TERM, then KILL) and is idempotent.

As root each agent is PID 1 of its own PID, UTS and mount namespaces (hostname =
instance name, a private /proc), as in `LocalCluster`: killing the agent takes
every process of the instance with it, as a crashed VM would.  The network is
the host's (the agents listen on 127.0.0.1), so an OSS on loopback is reachable.
Without root they are plain processes.  Every agent holds a lifeline pipe: when
the OSS process ends, however it ends, its local instances stop by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oss.compute.pool import Credentials, InstanceType
from vmagent.errors import ClusterError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
STOP_WAIT = 5.0  # seconds an agent has to stop on SIGTERM before SIGKILL


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class LocalInstanceProvider:
    """Creates and destroys local agents registering with the OSS (oss.compute.pool.Provider)."""

    def __init__(
        self,
        logdir: Path | None = None,
        *,
        isolate: bool | None = None,
        start_timeout: float = 30.0,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.isolate = (os.geteuid() == 0) if isolate is None else isolate
        self.start_timeout = start_timeout
        self.listen_host = listen_host
        # Agents' logs; a directory made here is removed by close().
        self._own_logdir = logdir is None
        self.logdir = logdir or Path(tempfile.mkdtemp(prefix="dcp-local-provider-"))
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._agents: dict[str, int] = {}  # name -> the agent's host pid
        # Agents hold the read end: when this process ends the write end closes.
        self._lifeline_r, self._lifeline_w = os.pipe()

    async def create(
        self, name: str, instance_type: InstanceType, credentials: Credentials
    ) -> None:
        """Start agent `name`; returns once it listens (it registers by itself)."""
        if not credentials.oss_url:
            raise ClusterError(name, "local instances need the OSS URL (serve --public-url)")
        if name in self._procs:
            raise ClusterError(name, "already running")
        await asyncio.to_thread(self._start, name, credentials)

    def _start(self, name: str, credentials: Credentials) -> None:
        token_r, token_w = os.pipe()
        agent = [
            sys.executable, "-m", "vmagent", "--oss", str(credentials.oss_url),
            "--instance", name, "--token-fd", str(token_r),
            "--listen", f"{self.listen_host}:0", "--lifeline", str(self._lifeline_r),
        ]  # fmt: skip
        argv = agent
        if self.isolate:
            agent += ["--hostname", name]
            argv = [
                "unshare", "--uts", "--pid", "--mount", "--mount-proc", "--fork",
                "--kill-child", "--", *agent,
            ]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        log_fd = os.open(
            self.logdir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        stderr = open(log_fd, "wb")  # noqa: SIM115 - owned by the child
        try:
            os.write(token_w, credentials.token.encode())
            os.close(token_w)
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=env,
                start_new_session=True, pass_fds=(self._lifeline_r, token_r),
            )  # fmt: skip
        finally:
            os.close(token_r)
            stderr.close()
        self._procs[name] = proc
        try:
            self._wait_listening(name, proc)
        except BaseException:
            self._stop(name)
            raise
        kids = _children(proc.pid) if self.isolate else []
        self._agents[name] = kids[0] if kids else proc.pid
        log.info("local instance %s: agent pid %d", name, self._agents[name])

    def _wait_listening(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                raise ClusterError(name, f"agent did not start in {self.start_timeout:g}s")
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                raise ClusterError(name, f"agent exited: {self._tail(name)}")
            line += chunk

    def _tail(self, name: str) -> str:
        try:
            text = (self.logdir / f"{name}.log").read_text(errors="replace").strip()
        except OSError:
            return "no log"
        return text.splitlines()[-1] if text else "empty log"

    def agent_pid(self, name: str) -> int:
        """The host pid of instance `name`'s agent (tests: crash it with kill -9)."""
        return self._agents[name]

    def running(self) -> list[str]:
        """Names of the instances this provider started and has not destroyed."""
        return sorted(self._procs)

    async def destroy(self, name: str) -> None:
        """Stop agent `name` (TERM, then KILL); nothing to do if it is not running."""
        await asyncio.to_thread(self._stop, name)

    def _stop(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        agent = self._agents.pop(name, None)
        if proc is None:
            return
        for pid in {agent or proc.pid, proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_WAIT)
        except subprocess.TimeoutExpired:
            log.warning("local instance %s did not stop: killing it", name)
            for pid in {agent or proc.pid, proc.pid}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=STOP_WAIT)
        if proc.stdout is not None:
            proc.stdout.close()

    def close(self) -> None:
        """Stop every agent this provider started."""
        for name in list(self._procs):
            self._stop(name)
        for fd in (self._lifeline_r, self._lifeline_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._own_logdir:
            shutil.rmtree(self.logdir, ignore_errors=True)


def make() -> LocalInstanceProvider:
    """The factory `dcp-oss serve --provider local=vmagent.cluster.provider:make` calls."""
    return LocalInstanceProvider()
