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

`cpu_quota` (root, a cgroup CPU controller: v2 `cpu.max` or v1 `cpu.cfs_quota_us`)
makes slow instances: each agent, and everything its instance runs, gets at most
that fraction of one CPU (`make_slow`: a tenth) from the moment it listens (its own
start-up at that rate would take minutes; the CPU score it measures when it
registers comes after, and sees the quota).  Issue 12: a slow pool beside a fast
one, for the optimizer's moves to faster instances.
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
CGROUP = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000  # the quota's period (the kernel's default)
SLOW_QUOTA = 0.1  # make_slow: a tenth of one CPU per instance (the agent takes ~1.5% of it)


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
        cpu_quota: float | None = None,
    ) -> None:
        if cpu_quota is not None and not 0 < cpu_quota <= 64:
            raise ClusterError("local", "cpu_quota must be in (0, 64] CPUs")
        self.cpu_quota = cpu_quota
        self._groups: dict[str, Path] = {}  # name -> its CPU cgroup (cpu_quota)
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
        if self.cpu_quota is not None:
            # The agent joins its group before anything of it runs: `sh` writes its own
            # pid there, then becomes the agent's command.
            procs = self._cpu_group(name) / "cgroup.procs"
            argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs), *argv]
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
            if self.cpu_quota is not None:
                self._limit(name)
        except BaseException:
            self._stop(name)
            raise
        kids = _children(proc.pid) if self.isolate else []
        self._agents[name] = kids[0] if kids else proc.pid
        log.info("local instance %s: agent pid %d", name, self._agents[name])

    def _cpu_group(self, name: str) -> Path:
        """A cgroup of the CPU controller for instance `name` (made here, no limit yet)."""
        leaf = f"dcp-local-{os.getpid()}-{name}"
        try:
            v2 = CGROUP / "cgroup.controllers"
            if v2.exists() and "cpu" in v2.read_text().split():
                (CGROUP / "cgroup.subtree_control").write_text("+cpu\n")
                group = CGROUP / leaf
            elif (CGROUP / "cpu" / "cpu.cfs_quota_us").exists():
                group = CGROUP / "cpu" / leaf
            else:
                raise ClusterError(name, "no cgroup CPU controller here to limit its CPU")
            group.mkdir(exist_ok=True)
        except OSError as exc:
            raise ClusterError(name, f"cannot limit its CPU: {exc}") from exc
        self._groups[name] = group
        return group

    def _limit(self, name: str) -> None:
        """Instance `name` gets at most `cpu_quota` CPUs from now on."""
        assert self.cpu_quota is not None
        group = self._groups[name]
        quota = max(1000, int(self.cpu_quota * CPU_PERIOD_US))
        try:
            if (group / "cpu.max").exists():
                (group / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}\n")
            else:
                (group / "cpu.cfs_period_us").write_text(f"{CPU_PERIOD_US}\n")
                (group / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        except OSError as exc:
            raise ClusterError(name, f"cannot limit its CPU: {exc}") from exc

    def _drop_group(self, name: str) -> None:
        """Remove instance `name`'s CPU cgroup once its processes are gone (best effort)."""
        group = self._groups.pop(name, None)
        if group is None:
            return
        deadline = time.monotonic() + STOP_WAIT
        while True:
            try:
                group.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("cgroup %s not removed: still busy", group)
                    return
                time.sleep(0.05)

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
            self._drop_group(name)
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
        self._drop_group(name)

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


def make_slow() -> LocalInstanceProvider:
    """Slow local instances, a tenth of one CPU each (`--provider
    slow=vmagent.cluster.provider:make_slow`; demos and tests of optimizer moves)."""
    return LocalInstanceProvider(cpu_quota=SLOW_QUOTA)
