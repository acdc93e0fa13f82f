"""LocalCluster: N compute instances on this machine, each an agent process.

As root each agent runs as PID 1 of its own PID, UTS and mount namespace
(hostname = instance name, a private /proc) inside its own network namespace,
reachable from the host over the lab bridge (net.netns).  Being PID 1 means a
`kill -9` of the agent takes every process of that instance with it, as a
crashed VM would.  Where cgroup v2 has the cpu and memory controllers, each
instance also gets `cpu.max` / `memory.max` limits.

Without root the agents are plain processes on 127.0.0.1 ports with no
isolation; this is said once, with a warning.

`close()` tears everything down by PID and by name, also after a failed start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmagent.errors import ClusterError

if TYPE_CHECKING:
    from net.netns import LabNetwork

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
AGENT_PORT = 7070
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Process-wide on purpose: "say once" means once per dcptrace run, however many
# clusters it starts (a memo of what was said, not shared state to configure).
_warned: set[str] = set()


def sweep_dead_labs() -> list[str]:
    """Remove what clusters of dead owners left (network, namespaces, log dirs); their tags."""
    from net.netns import sweep_stale  # pyroute2 only here

    tags = sweep_stale()
    for tag in tags:
        for d in Path(tempfile.gettempdir()).glob(f"dcp-cluster-{tag}-*"):
            with contextlib.suppress(OSError):  # ours only, never through a symlink
                if d.lstat().st_uid == os.geteuid() and d.is_dir() and not d.is_symlink():
                    shutil.rmtree(d, ignore_errors=True)
    return tags


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", message)


@dataclass(frozen=True, slots=True)
class Instance:
    """A running local instance."""

    name: str
    address: str  # HOST:PORT of its agent
    token: str
    cpus: int
    hostname: str
    pid: int  # host PID of the agent process
    isolated: bool


def cgroup_v2_controllers(root: Path = CGROUP_ROOT) -> set[str]:
    """Controllers available at the cgroup v2 root (empty if v1/hybrid)."""
    try:
        return set((root / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _start_time(pid: int) -> int:
    """A process's start time in clock ticks (tells a pid apart from its reuse)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class LocalCluster:
    """Start/stop N local agents (context manager)."""

    def __init__(
        self,
        count: int,
        *,
        isolate: bool | None = None,
        cpus: int | None = None,
        memory_mb: int | None = None,
        reconnect_window: float = 10.0,
        start_timeout: float = 15.0,
        prefix: str = "node",
    ) -> None:
        if count < 1:
            raise ClusterError("-", f"need at least one instance, got {count}")
        self.count = count
        self.isolate = (os.geteuid() == 0) if isolate is None else isolate
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.reconnect_window = reconnect_window
        self.start_timeout = start_timeout
        self.tag = secrets.token_hex(3)
        self.names = [f"{prefix}{i}" for i in range(count)]
        self.instances: list[Instance] = []
        # mkdtemp makes it 0700; the logs in it are 0600 (they never hold a secret,
        # but what programs do is the user's business).
        self.logdir = Path(tempfile.mkdtemp(prefix=f"dcp-cluster-{self.tag}-"))
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._agent_pids: dict[str, int] = {}
        self._tokens: dict[str, tuple[str, str, str | None]] = {}  # name -> token, host, netns
        self._cgroups: list[Path] = []
        self._net: LabNetwork | None = None
        # Lifeline: agents hold the read end; when this process dies (even by
        # SIGKILL) the write end closes and every agent stops by itself.  Both
        # ends are close-on-exec here, so the traced program never inherits them.
        self._lifeline_r, self._lifeline_w = os.pipe()
        # The reaper (net.reaper) removes the lab if this process dies without
        # close(): it reads what to remove from a pipe of its own.
        self._reaper: subprocess.Popen[bytes] | None = None
        self._reaper_w = -1
        # Issue 10: the OSS the agents register with (`use_oss`), and their tokens.
        self.oss_url: str | None = None
        self._oss_tokens: dict[str, str] = {}

    def use_oss(self, url: str, tokens: dict[str, str]) -> None:
        """Start the agents registering with the OSS at `url` (before `start`).

        `tokens` are their instance tokens (the OSS knows them): exec tickets
        then come from the OSS, MAC'd with each agent's exec key.
        """
        self.oss_url = url
        self._oss_tokens = dict(tokens)

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> list[Instance]:
        """Start every instance; on any failure tear down what exists and raise."""
        try:
            if self.isolate:
                if os.geteuid() != 0:
                    raise ClusterError("-", "isolated instances need root")
                from net.netns import LabNetwork  # pyroute2 only here

                for stale in sweep_dead_labs():
                    log.warning("removed the lab network of a dead dcptrace (%s)", stale)
                self._start_reaper()
                self._net = LabNetwork(self.tag)
                attachments = self._net.create(self.names)
                cgroups = self._cgroup_parent()
                for att in attachments:
                    self._start_one(att.name, att.address, att.netns, cgroups)
            else:
                self._start_reaper()
                _warn_once(
                    "no-isolation",
                    "not root: local instances are plain processes on 127.0.0.1 "
                    "(no network/UTS/PID namespaces, no cgroup limits)",
                )
                for name in self.names:
                    self._start_one(name, "127.0.0.1", None, None)
            for name in self.names:
                self.instances.append(self._wait_ready(name))
        except BaseException:
            self.close()
            raise
        return list(self.instances)

    def _start_reaper(self) -> None:
        """Start the lab's reaper before anything exists that it would have to remove."""
        read_end, self._reaper_w = os.pipe()
        argv = [sys.executable, "-m", "net.reaper", "--lifeline", str(read_end)]
        argv += ["--remove", str(self.logdir)]
        if self.isolate:
            argv += ["--tag", self.tag]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        try:
            self._reaper = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env=env, start_new_session=True,
                pass_fds=(read_end,),
            )  # fmt: skip
        finally:
            os.close(read_end)

    @property
    def lab(self) -> LabNetwork | None:
        """The lab network of isolated instances (None: plain processes)."""
        return self._net

    def reap_prefix(self, prefix: str) -> None:
        """Should this process die, the reaper removes the host's redirects into `prefix`."""
        self._tell_reaper(f"net {prefix}")

    def _tell_reaper(self, line: str) -> None:
        if self._reaper_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._reaper_w, line.encode() + b"\n")

    def _cgroup_parent(self) -> Path | None:
        wanted = {"cpu", "memory"}
        if not wanted <= cgroup_v2_controllers():
            _warn_once(
                "no-cgroup",
                "cgroup v2 cpu/memory controllers are not available at "
                f"{CGROUP_ROOT} (v1 or hybrid hierarchy): instances run without CPU/memory limits",
            )
            return None
        parent = CGROUP_ROOT / f"dcp-{self.tag}"
        try:
            parent.mkdir()
            self._cgroups.append(parent)
            self._tell_reaper(f"cgroup {parent}")
            (parent / "cgroup.subtree_control").write_text("+cpu +memory")
        except OSError as exc:
            _warn_once("no-cgroup", f"cannot create cgroups ({exc}): no CPU/memory limits")
            return None
        return parent

    def _start_one(self, name: str, host: str, ns: str | None, cgroups: Path | None) -> None:
        token = self._oss_tokens.get(name) or secrets.token_urlsafe(24)
        # The token goes through a pipe the agent inherits, never argv or environ.
        token_r, token_w = os.pipe()
        agent = [
            sys.executable,
            "-m",
            "vmagent",
            "--instance",
            name,
            "--token-fd",
            str(token_r),
            "--reconnect-window",
            str(self.reconnect_window),
            "--lifeline",
            str(self._lifeline_r),
            "--no-cpu-score",  # one machine's cores: the same speed, not worth 1 s of CPU each
        ]
        if self.oss_url is not None:
            agent += ["--oss", self.oss_url]
        if ns is not None:
            # With an OSS the agent listens on its lab address: the one it registers.
            listen = host if self.oss_url is not None else "0.0.0.0"
            agent += ["--listen", f"{listen}:{AGENT_PORT}", "--hostname", name]
            argv = [
                "nsenter",
                f"--net=/run/netns/{ns}",
                "--",
                "unshare",
                "--uts",
                "--pid",
                "--mount",
                "--mount-proc",
                "--fork",
                "--kill-child",
                "--",
                *agent,
            ]
        else:
            agent += ["--listen", f"{host}:0"]
            argv = agent
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        log_fd = os.open(
            self.logdir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        stderr = open(log_fd, "wb")  # noqa: SIM115 - owned by the child
        try:
            os.write(token_w, token.encode())  # a pipe holds far more than one token
            os.close(token_w)
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                start_new_session=True,
                pass_fds=(self._lifeline_r, token_r),
            )
        finally:
            os.close(token_r)
            stderr.close()
        self._procs[name] = proc
        self._tokens[name] = (token, host, ns)
        self._tell_reaper(f"agent {proc.pid} {_start_time(proc.pid)}")
        if cgroups is not None:
            group = cgroups / name
            group.mkdir()
            self._cgroups.append(group)
            self._tell_reaper(f"cgroup {group}")
            (group / "cpu.max").write_text(f"{self.cpus * 100000} 100000")
            if self.memory_mb:
                (group / "memory.max").write_text(str(self.memory_mb << 20))
            (group / "cgroup.procs").write_text(str(proc.pid))

    def _wait_ready(self, name: str) -> Instance:
        proc = self._procs[name]
        token, host, ns = self._tokens[name]
        assert proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                raise ClusterError(
                    name, f"agent did not start in {self.start_timeout}s ({self._tail(name)})"
                )
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                raise ClusterError(name, f"agent exited: {self._tail(name)}")
            line += chunk
        port = int(line.decode().split()[1].rpartition(":")[2])
        address = f"{host}:{port}"
        health = self._health(name, address)
        agent_pid = proc.pid
        if ns is not None:
            kids = _children(proc.pid)  # unshare's child is the agent (PID 1 inside)
            agent_pid = kids[0] if kids else proc.pid
        self._agent_pids[name] = agent_pid
        if agent_pid != proc.pid:
            self._tell_reaper(f"agent {agent_pid} {_start_time(agent_pid)}")
        return Instance(
            name,
            address,
            token,
            int(health["cpus"]),
            str(health["hostname"]),
            agent_pid,
            ns is not None,
        )

    def _health(self, name: str, address: str) -> dict[str, Any]:
        token = self._tokens[name][0]
        import urllib.request  # here: not loaded by a run that starts no instance

        req = urllib.request.Request(
            f"http://{address}/v1/health", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                data = json.load(resp)
        except OSError as exc:
            raise ClusterError(name, f"agent at {address} does not answer: {exc}") from exc
        if data.get("instance") != name:
            raise ClusterError(name, f"agent at {address} says it is {data.get('instance')!r}")
        return dict(data)

    def _tail(self, name: str) -> str:
        try:
            text = (self.logdir / f"{name}.log").read_text(errors="replace").strip()
        except OSError:
            return "no log"
        return text.splitlines()[-1] if text else f"log {self.logdir / (name + '.log')} empty"

    # -- operations for tests and wiring ------------------------------------------------
    def instance(self, name: str) -> Instance:
        """The running instance called `name`."""
        for inst in self.instances:
            if inst.name == name:
                return inst
        raise ClusterError(name, "no such instance")

    def netns_of(self, name: str) -> str | None:
        """The network namespace of an isolated instance (None without isolation)."""
        return self._tokens[name][2] if name in self._tokens else None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to an instance's agent (tests: simulate a crashed instance)."""
        os.kill(self._agent_pids[name], sig)

    def close(self) -> None:
        """Stop every agent (TERM, then KILL) and remove namespaces, links, cgroups."""
        for fd in (self._lifeline_r, self._lifeline_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._lifeline_r = self._lifeline_w = -1
        for pid in self._agent_pids.values():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for name, proc in self._procs.items():
            if name not in self._agent_pids and proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5.0
        for name, proc in self._procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("instance %s did not stop: killing it", name)
                for target in (self._agent_pids.get(name, proc.pid), proc.pid):
                    try:
                        os.kill(target, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs.clear()
        self._agent_pids.clear()
        for group in reversed(self._cgroups):
            try:
                group.rmdir()
            except OSError as exc:
                log.warning("could not remove cgroup %s: %s", group, exc)
        self._cgroups.clear()
        if self._net is not None:
            self._net.destroy()
            self._net = None
        self.instances.clear()
        self._release_reaper()

    def _release_reaper(self) -> None:
        """Everything is down: the reaper exits without touching anything."""
        self._tell_reaper("release")
        with contextlib.suppress(OSError):
            os.close(self._reaper_w)
        self._reaper_w = -1
        if self._reaper is not None:
            try:
                self._reaper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()
            self._reaper = None

    def remove_logs(self) -> None:
        """Delete the agents' log directory (kept by close() for post-mortems)."""
        shutil.rmtree(self.logdir, ignore_errors=True)
