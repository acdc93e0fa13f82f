"""The agent's side of program storage: one dcpfs mount per program on this instance.

`POST /v1/storage` (the run's owner, with the agent's token) mounts a program's
namespace at `/run/dcp/fs/NAME` (`fs_root`): a tmpfs of the memory tier's size,
a directory on the instance's disk, and a dcpfs process (its key on its stdin)
serving the mount.  `DELETE /v1/storage/NAME` publishes what is still open and
unmounts; the agent's shutdown unmounts every program's namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

RUN_ROOT = Path("/run/dcp")
FS_ROOT = RUN_ROOT / "fs"
TIER_ROOT = RUN_ROOT / "tiers"
DISK_ROOT = Path("/var/tmp/dcp-tiers")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# A slow instance (a TCG guest, a CPU quota) starts dcpfs slowly; those who order a mount
# wait longer (oss.storage.relay.MOUNT_TIMEOUT, oss.storage.run.AGENT_TIMEOUT).
MOUNT_TIMEOUT = 60.0
UNMOUNT_TIMEOUT = 30.0
MAX_SPEC = 1 << 16


class StorageMountError(Exception):
    """The program's storage could not be mounted on this instance."""


def fs_root(name: str) -> str:
    """Where a program's namespace is mounted on every instance (what its view maps to)."""
    return str(FS_ROOT / name)


def held_mounts(pids: tuple[int, ...] | list[int]) -> list[str]:
    """The program namespaces mounted here in which `pids` hold a file open or mapped."""
    prefix = f"{FS_ROOT}/"
    held: set[str] = set()

    def note(path: str) -> None:
        if path.startswith(prefix):
            held.add(prefix + path[len(prefix) :].split("/", 1)[0])

    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    note(os.readlink(f"/proc/{pid}/fd/{fd}"))
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6:
                        note(fields[5].strip())
    return sorted(held)


def publish_open(mountpoint: str) -> None:
    """Publish, fsynced, every file open for writing in the mount (dcpfs.SYNC_PATH: a
    stat of it returns once they are on the volume); OSError if dcpfs could not."""
    os.stat(os.path.join(mountpoint, ".dcp-sync"))


@dataclass(slots=True)
class _Mount:
    name: str
    proc: subprocess.Popen[bytes]
    mountpoint: str
    memory_dir: str
    disk_dir: str
    log_path: str


def _mounted(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False


async def own_run_root() -> None:
    """Give a local instance a `RUN_ROOT` of its own (a tmpfs in its mount namespace).

    Local instances have mount namespaces of their own on this machine's disk, so
    their mountpoints `FS_ROOT/NAME` are one directory.  Removing a directory
    detaches what is mounted on it in every namespace: one instance removing its
    mountpoint after its unmount (a drained instance, at its end) took the
    program's namespace from under the processes of every other instance (a
    process moved there found its working directory no longer at its path:
    ENOENT).  A VM's /run is its own already; an agent is PID 1 only in the
    namespaces a local instance starts it in (`unshare --pid --mount-proc`).
    """
    if os.getpid() != 1 or os.geteuid() != 0 or _mounted(str(RUN_ROOT)):
        return
    os.makedirs(RUN_ROOT, mode=0o755, exist_ok=True)
    await _run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=1m", "dcp-run", str(RUN_ROOT)])
    if not _mounted(str(RUN_ROOT)):
        raise StorageMountError(f"could not mount this instance's own {RUN_ROOT}")


class Mounts:
    """Mounted program namespaces of this instance."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.mounts: dict[str, _Mount] = {}

    async def mount(self, spec: dict[str, Any]) -> str:
        """Mount the namespace `spec` describes (idempotent per name); its mountpoint."""
        name = str(spec.get("name", ""))
        if not NAME.match(name):
            raise StorageMountError("bad storage name")
        if name in self.mounts:
            return self.mounts[name].mountpoint
        await own_run_root()
        mountpoint = fs_root(name)
        memory_dir = str(TIER_ROOT / name / self.instance)
        disk_dir = str(DISK_ROOT / name / self.instance)
        for d in (mountpoint, memory_dir, disk_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(mountpoint, 0o755)
        capacity = spec.get("memory_capacity")
        if os.geteuid() == 0 and not _mounted(memory_dir):
            size = f"size={int(capacity)}" if capacity else "size=50%"
            await _run(["mount", "-t", "tmpfs", "-o", f"{size},mode=0700", "tmpfs", memory_dir])
        config = dict(spec, instance=self.instance, mountpoint=mountpoint,
                      memory_dir=memory_dir, disk_dir=disk_dir)  # fmt: skip
        log_path = str(Path(disk_dir).parent / f"dcpfs-{self.instance}.log")
        out = open(log_path, "ab")  # noqa: SIM115  (the child keeps it)
        root = str(Path(__file__).resolve().parent.parent.parent)
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmagent.storage.dcpfs"],
            stdin=subprocess.PIPE, stdout=out, stderr=out, env=env, cwd="/",
            start_new_session=True,
        )  # fmt: skip
        out.close()
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(config).encode())
        proc.stdin.close()
        deadline = asyncio.get_running_loop().time() + MOUNT_TIMEOUT
        while not _mounted(mountpoint):
            if proc.poll() is not None or asyncio.get_running_loop().time() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-1:]
                raise StorageMountError(f"dcpfs did not mount: {' '.join(tail)}")
            await asyncio.sleep(0.05)
        self.mounts[name] = _Mount(name, proc, mountpoint, memory_dir, disk_dir, log_path)
        log.info("storage %s mounted at %s", name, mountpoint)
        return mountpoint

    async def unmount(self, name: str) -> bool:
        """Publish and unmount one namespace; False if it was not mounted."""
        m = self.mounts.pop(name, None)
        if m is None:
            return False
        await _run(["fusermount", "-u", "-z", m.mountpoint])
        try:
            await asyncio.wait_for(asyncio.to_thread(m.proc.wait), UNMOUNT_TIMEOUT)
        except TimeoutError:
            m.proc.kill()
            await asyncio.to_thread(m.proc.wait)
        if _mounted(m.memory_dir):
            await _run(["umount", "-l", m.memory_dir])
        if m.proc.returncode == 0:  # its log only tells a failure; runs must not pile up
            with contextlib.suppress(OSError):
                os.unlink(m.log_path)
        for d in (m.memory_dir, m.disk_dir):
            shutil.rmtree(d, ignore_errors=True)
            with contextlib.suppress(OSError):  # the program's directory, once every instance left
                os.rmdir(os.path.dirname(d))
        with contextlib.suppress(OSError):
            os.rmdir(m.mountpoint)
        return True

    async def close(self) -> None:
        """Unmount everything (agent shutdown)."""
        for name in list(self.mounts):
            await self.unmount(name)


async def _run(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    await asyncio.wait_for(proc.wait(), MOUNT_TIMEOUT)


OUTCOME = "/v1/agents/storage/outcome"
SEEN = 4096  # command ids remembered (a reply may carry a command again)
Post = Callable[[bytes], Awaitable[dict[str, Any]]]


class StorageOrders:
    """Carries out the OSS's `mount` / `unmount` commands (`dcptrace --oss`, issue 14).

    Observer of `Agent.command_handlers`.  A mount takes seconds on a TCG guest,
    longer than a heartbeat may wait: each order runs as a task of its own and its
    outcome goes back through `POST /v1/agents/storage/outcome`.
    """

    def __init__(self, mounts: Mounts, post: Post) -> None:
        self.mounts = mounts
        self.post = post
        self._seen: dict[int, None] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def on_commands(self, commands: list[dict[str, Any]]) -> None:
        """Start each new mount or unmount command (the rest are someone else's)."""
        for cmd in commands:
            action = cmd.get("action")
            if action not in ("mount", "unmount"):
                continue
            try:
                cid, spec = int(cmd["id"]), dict(cmd["storage"])
            except (KeyError, TypeError, ValueError):
                log.warning("storage: malformed command ignored (id %r)", cmd.get("id"))
                continue
            if cid in self._seen:
                continue
            self._seen[cid] = None
            while len(self._seen) > SEEN:
                del self._seen[next(iter(self._seen))]
            task = asyncio.get_running_loop().create_task(
                self._carry_out(cid, str(action), spec), name=f"storage-{cid}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _carry_out(self, cid: int, action: str, spec: dict[str, Any]) -> None:
        ok, error = True, ""
        try:
            if action == "mount":
                await self.mounts.mount(spec)
            else:
                await self.mounts.unmount(str(spec.get("name", "")))
        except (StorageMountError, OSError, ValueError, TimeoutError) as exc:
            ok, error = False, str(exc) or type(exc).__name__
            log.warning("storage %s of %s failed: %s", action, spec.get("name"), error)
        body = json.dumps({"command": cid, "ok": ok, "error": error[:4000]}).encode()
        try:
            await self.post(body)
        except Exception as exc:  # the OSS's wait times out and says so
            log.warning("storage: outcome of command %d not delivered: %s", cid, exc)

    async def close(self) -> None:
        """Cancel orders still running."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


MOUNTS: web.AppKey[Mounts] = web.AppKey("storage_mounts", Mounts)


def add_routes(app: web.Application, instance: str, authorized: Any) -> None:
    """The storage routes on the agent's app (`authorized(request)` raises if not)."""
    app[MOUNTS] = Mounts(instance)

    async def post(request: web.Request) -> web.Response:
        authorized(request)
        if request.content_length is None or request.content_length > MAX_SPEC:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_SPEC, actual_size=0)
        try:
            spec = json.loads(await request.read())
            if not isinstance(spec, dict):
                raise ValueError("not an object")
            mountpoint = await request.app[MOUNTS].mount(spec)
        except (ValueError, StorageMountError) as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        return web.json_response({"mountpoint": mountpoint})

    async def delete(request: web.Request) -> web.Response:
        authorized(request)
        done = await request.app[MOUNTS].unmount(request.match_info["name"])
        return web.json_response({"unmounted": done})

    async def cleanup(app: web.Application) -> None:
        await app[MOUNTS].close()

    app.router.add_post("/v1/storage", post)
    app.router.add_delete("/v1/storage/{name}", delete)
    app.on_cleanup.append(cleanup)
