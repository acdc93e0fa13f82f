"""A run's storage (issue 14): its networked volume, mounted on every instance.

`RunStorage` is what the run's owner (dcptrace's cluster set-up) does: start
the storage server over the declared paths, ask each instance's agent to mount
the namespace (`POST /v1/storage`), and give the view the maps that send each
declared path there.  `close()` unmounts everywhere (every file still open is
published first) and stops the server: what the program wrote is then in the
user's directories.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from oss.storage import StorageError
from oss.storage.policy import StorageLimits

log = logging.getLogger(__name__)

FS_ROOT = "/run/dcp/fs"  # vmagent.storage.mounts.FS_ROOT: where each instance mounts it
AGENT_TIMEOUT = 75.0  # above an agent's own wait for dcpfs (vmagent.storage.mounts)
START_TIMEOUT = 15.0  # seconds for the storage server to listen
STOP_TIMEOUT = 15.0


class StorageMountFailed(StorageError):
    """An instance could not mount the program's storage."""


@dataclass(frozen=True, slots=True)
class Agent:
    """An instance's agent, as the run's owner reaches it."""

    name: str
    address: str  # HOST:PORT
    token: str


@dataclass(frozen=True, slots=True)
class StorageOptions:
    """The run's storage settings (from `--volume` / the config file's [storage])."""

    volumes: tuple[str, ...]  # absolute virtual paths, as the program names them
    memory_capacity: int | None = 256 << 20
    disk_capacity: int | None = None
    limits: StorageLimits = StorageLimits()
    policy: Mapping[str, object] | None = None


TABLE_KEYS = {
    "memory_mb": "the memory tier's size on each instance (MiB)",
    "disk_mb": "the disk tier's size on each instance (MiB; default unbounded)",
    "limit_mb": "the program's storage limit (MiB, measured on the volume)",
    "promote_after_reads": "opens for reading before a file is promoted to memory",
    "stream_mb": "a sequential write past this many MiB streams to the networked volume",
    "largest_in_memory_mb": "files above this many MiB are never put in memory",
    "prefer": "the tier the program's resource selection prefers (memory, disk, net)",
}


def options_from_table(volumes: tuple[str, ...], table: Mapping[str, object]) -> StorageOptions:
    """StorageOptions from the config file's [storage] table (ValueError names a bad key)."""
    unknown = set(table) - set(TABLE_KEYS)
    if unknown:
        raise ValueError(f"[storage] has unknown keys: {', '.join(sorted(unknown))}")

    def mib(key: str, default: int | None) -> int | None:
        """`key` of the table (else `default`), both in MiB, as bytes."""
        value = table.get(key, default)
        if value is None:
            return None
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"[storage] {key} must be a whole number of MiB")
        return value << 20

    policy: dict[str, object] = {}
    if "promote_after_reads" in table:
        policy["promote_after_reads"] = int(table["promote_after_reads"])  # type: ignore[call-overload]
    if "stream_mb" in table:
        policy["stream_bytes"] = mib("stream_mb", None)
    if "largest_in_memory_mb" in table:
        policy["largest_in_memory"] = mib("largest_in_memory_mb", None)
    if "prefer" in table:
        if table["prefer"] not in ("memory", "disk", "net"):
            raise ValueError("[storage] prefer must be memory, disk or net")
        policy["preferred"] = table["prefer"]
    return StorageOptions(
        volumes,
        memory_capacity=mib("memory_mb", 256),
        disk_capacity=mib("disk_mb", None),
        limits=StorageLimits(program=mib("limit_mb", None)),
        policy=policy,
    )


def storage_name() -> str:
    """A name for this run's storage (its state directory, `dcp-oss storage ls NAME`)."""
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"


class RunStorage:
    """One run's networked volume and its mounts on the instances."""

    def __init__(
        self,
        options: StorageOptions,
        reals: Sequence[str],
        state_root: Path,
        address: str,
        lazy: bool = False,
    ) -> None:
        """Start the server over `reals`, listening at `address` (`unix:PATH`: local
        instances; `HOST:0`: VMs, on an address they reach); with `lazy`, only at
        `start()` (the view's maps are known before: they name no server)."""
        self.options = options
        self.name = storage_name()
        self.key = secrets.token_urlsafe(32)
        self.state = state_root / self.name
        self.reals = tuple(reals)
        self.listen = address
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = self.host_key = ""
        self.agents: list[Agent] = []
        self._starting = threading.Lock()
        self._ordering = threading.Lock()  # orders to the running server (fence)
        self.fenced: set[str] = set()
        if not lazy:
            self.start()

    @property
    def started(self) -> bool:
        """The server runs (a lazy run's starts with its first placement)."""
        return self.proc is not None

    def start(self) -> None:
        """Start the server (once; StorageError if it does not listen)."""
        with self._starting:
            if self.proc is None:
                self._start_server()

    def _start_server(self) -> None:
        state, lim = self.state, self.options.limits
        # The state directory and storage/ under it are private (tokens and keys live
        # beside them): made 0700 here when this run is the first to need them, since
        # mkdir(parents=True) would make the missing parents 0755.
        state.parent.parent.parent.mkdir(parents=True, exist_ok=True)
        for d in (state.parent.parent, state.parent, state):
            d.mkdir(exist_ok=True, mode=0o700)
        names = {f"v{i}": v for i, v in enumerate(self.options.volumes)}
        (state / "volumes.json").write_text(json.dumps(names))
        config = {
            "name": self.name, "volumes": list(self.reals), "state_dir": str(state),
            "key": self.key, "address": self.listen,
            "limits": {"account": lim.account, "user": lim.user, "program": lim.program,
                       "volume": lim.volume_capacity},
        }  # fmt: skip
        root = str(Path(__file__).resolve().parent.parent.parent)
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # The key goes through the pipe, never argv or environ; the pipe is the lifeline.
        self.proc = proc = subprocess.Popen(
            [sys.executable, "-m", "oss.storage.server"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, cwd="/",
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        try:
            hello = json.loads(line)
            self.address, self.host_key = str(hello["address"]), str(hello["host_key"])
        except (ValueError, KeyError, TypeError):
            self._stop_server()
            raise StorageError("the storage server did not start") from None
        log.info("storage %s serves %s", self.name, ", ".join(self.reals))

    def _stop_server(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # EOF: the server stops
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def fence(self, instance: str) -> None:
        """`instance` was declared lost: the server closes its connections and refuses it
        from now on, so a copy of the program still running there (frozen, partitioned)
        writes nothing more into the volume while another is restored from a checkpoint."""
        with self._ordering:
            proc = self.proc
            if proc is None or proc.stdin is None or instance in self.fenced:
                return
            self.fenced.add(instance)
            try:
                proc.stdin.write(f"fence {instance}\n".encode())
                proc.stdin.flush()
            except OSError as exc:  # the server is gone: nothing is written through it
                log.warning("storage %s: %s not fenced: %s", self.name, instance, exc)
                return
        log.warning("storage %s: instance %s fenced (declared lost)", self.name, instance)

    def gib_seconds(self) -> dict[str, float]:
        """GiB-seconds per tier the server measured so far (its billing.json)."""
        try:
            billed = json.loads((self.state / "billing.json").read_text())
            return {str(k): float(v) for k, v in billed["gib_seconds"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def view_maps(self) -> dict[str, str]:
        """What the program's view maps each declared path to, on every instance."""
        return {v: f"{FS_ROOT}/{self.name}/v{i}" for i, v in enumerate(self.options.volumes)}

    def spec(self) -> dict[str, object]:
        """What an instance's agent mounts (`POST /v1/storage`; the OSS relays it to VMs).
        Starts the server if it does not run yet."""
        self.start()
        return {
            "name": self.name, "server": self.address, "key": self.key,
            "host_key": self.host_key, "volumes": len(self.options.volumes),
            "memory_capacity": self.options.memory_capacity,
            "disk_capacity": self.options.disk_capacity,
            "policy": dict(self.options.policy or {}),
        }  # fmt: skip

    def mount_on(self, agents: Sequence[Agent]) -> None:
        """Mount the namespace on every instance at once (each agent starts its dcpfs);
        StorageMountFailed names the first that cannot."""
        import concurrent.futures

        body = json.dumps(self.spec()).encode()

        def mount(agent: Agent) -> StorageMountFailed | None:
            try:
                _call(agent, "POST", "/v1/storage", body)
            except urllib.error.HTTPError as exc:
                why = exc.read(4096).decode(errors="replace").strip() or str(exc)
                return StorageMountFailed(f"{agent.name}: storage not mounted: {why}")
            except OSError as exc:
                return StorageMountFailed(f"{agent.name}: storage not mounted: {exc}")
            return None

        with concurrent.futures.ThreadPoolExecutor(max(1, len(agents))) as pool:
            outcomes = list(pool.map(mount, agents))
        # Every instance that mounted is unmounted at close, whoever failed.
        self.agents += [a for a, failed in zip(agents, outcomes, strict=True) if failed is None]
        for failed in outcomes:
            if failed is not None:
                raise failed

    def close(self) -> None:
        """Unmount everywhere (publishing open files), then stop the server."""
        for agent in self.agents:
            try:
                _call(agent, "DELETE", f"/v1/storage/{self.name}", b"")
            except OSError as exc:  # a lost instance: what it fsynced is on the volume
                log.warning("storage on %s not unmounted: %s", agent.name, exc)
        self.agents.clear()
        self._stop_server()


def _call(agent: Agent, method: str, path: str, body: bytes) -> None:
    req = urllib.request.Request(
        f"http://{agent.address}{path}", data=body or None, method=method,
        headers={"Authorization": f"Bearer {agent.token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=AGENT_TIMEOUT) as resp:
        resp.read()
