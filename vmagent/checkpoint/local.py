"""Checkpoint (and restore) of an exec session's tree on its own instance.

The steps, each bounded by a timeout:

1. *freeze*: the session's instance tracer stops and detaches the tree
   (`op=detach`, `vmagent.trace.host`): every process is stopped, untraced;
2. the program's ends of the session's pipes (whose other end is the agent's)
   are reopened through `/proc/PID/fd` so that a restore can hand them back to
   CRIU (`--inherit-fd`): stdout/stderr keep reaching the deputy;
3. for a move (`vmagent.checkpoint.migrate`), the files the tree writes in the
   program's storage (dcpfs stages them on this instance until close) are
   published, fsynced, with the sizes the dump records: the target reopens them
   from the volume; `criu dump --leave-stopped` writes the images;
4. with `restore`: the tree is killed (not reported to the deputy: the session
   leaves the reaper's table meanwhile), its pids are waited free, and
   `criu restore -d --leave-stopped` brings it back with the same pids;
   without: the dumped tree, still stopped, is the one continued;
5. a fresh instance tracer adopts the stopped tree (`op=adopt`) and continues it.

A failure before the tree is killed gives it back to a tracer: the program
runs on where it was.  CRIU runs as the agent's own child (its status comes
through `ExecService.children`: the agent's reaper collects every child).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import stat
import tempfile
import time
from dataclasses import dataclass

from vmagent.checkpoint import carried
from vmagent.checkpoint import criu as C
from vmagent.exec.server import ExecService
from vmagent.exec.session import Session
from vmagent.storage.mounts import held_mounts, publish_open
from vmagent.trace import channel
from vmagent.trace.pidspace import base_for

log = logging.getLogger(__name__)

DETACH_TIMEOUT = 10.0  # s for the tracer to stop and detach the tree
CRIU_TIMEOUT = 120.0  # s for one criu dump or restore
FREE_TIMEOUT = 10.0  # s for the killed tree's pids to be reaped
PUBLISH_TIMEOUT = 120.0  # s for the program's storage to publish what the tree writes


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What one checkpoint did (milliseconds, bytes)."""

    pids: tuple[int, ...]
    images: str
    image_bytes: int
    freeze_ms: float  # from the detach request until the tree runs again
    dump_ms: float
    restore_ms: float  # 0 without a restore

    def as_json(self) -> dict[str, object]:
        return {
            "pids": list(self.pids),
            "images": self.images,
            "image_bytes": self.image_bytes,
            "freeze_ms": round(self.freeze_ms, 1),
            "dump_ms": round(self.dump_ms, 1),
            "restore_ms": round(self.restore_ms, 1),
        }


@dataclass(slots=True)
class Suspended:
    """A session whose tree was dumped and killed, waiting for `resume` (budget stop)."""

    session: Session
    pids: tuple[int, ...]
    images: str  # the images directory (0700, the agent's)
    ends: list[tuple[int, str]]  # the program's pipe ends, held open for the restore
    image_bytes: int


class Checkpointer:
    """Checkpoints of this agent's sessions (one at a time)."""

    def __init__(self, service: ExecService) -> None:
        self.service = service
        self._lock = asyncio.Lock()
        self.suspended: dict[bytes, Suspended] = {}  # by session id
        self._criu: C.Criu | None = None
        self._precopy: bool | None = None

    async def criu(self) -> C.Criu:
        """The working CRIU, checked once (as our child); CriuUnavailable otherwise."""
        if self._criu is None:
            path = C.find_criu()
            if path is None:
                C.check(None)  # raises the one line that says so
            assert path is not None
            known = C._checked.get(path)
            if known is None:
                # Unnamed files: nothing is left behind if the agent is killed meanwhile.
                with tempfile.TemporaryFile() as said, tempfile.TemporaryFile() as version:
                    code = await self.run([path, "check"], said.fileno())
                    await self.run([path, "--version"], version.fileno())
                    said.seek(0)
                    version.seek(0)
                    known = C.verdict(
                        path,
                        _exit_code(code),
                        said.read(65536).decode(errors="replace"),
                        version.read(4096).decode(errors="replace"),
                    )
            self._criu = C.remember(path, known)
        return self._criu

    async def precopy(self, criu: C.Criu) -> bool:
        """Whether this kernel tracks dirty memory, so pre-dump rounds work (asked once)."""
        if self._precopy is None:
            with tempfile.TemporaryFile() as said:
                code = await self.run(C.precopy_argv(criu.path), said.fileno())
            self._precopy = code == 0
        return self._precopy

    async def predump(
        self,
        criu: C.Criu,
        session: Session,
        directory: str,
        parent: str | None,
        *,
        ps_socket: int | None = None,
    ) -> tuple[float, int]:
        """One pre-copy round: the tree held only while CRIU collects its dirty pages.

        CRIU skips a stopped task in a pre-dump ("Stopped tasks are not
        supported"), and a tree let go by its tracer is stopped; running untraced
        it would get ENOSYS for every intercepted call.  So it is held in its
        cgroup v2 freezer instead: detached (stopped), frozen, continued (still
        frozen: SIGCONT only ends the stop), pre-dumped with `--freeze-cgroup`
        (CRIU seizes the frozen tasks, thaws the group for its parasite, which
        a frozen task would never run, and freezes it again before letting them
        go: never running untraced), stopped again, thawed (it stops before user
        code), and a fresh tracer takes it back.  (ms it was held, bytes of pages.)
        """
        held = time.perf_counter()
        pids = await self.detach(session)
        try:
            group = freezable_group(pids)
            if group is None:
                raise C.CheckpointError(
                    "pre-copy needs the program in a cgroup v2 group of its own"
                )
            await _set_frozen(group, True)
            try:
                _signal_all(pids, signal.SIGCONT)
                argv = C.predump_argv(
                    criu.path, pids[0], directory, parent, freeze_cgroup=group, ps_socket=ps_socket
                )
                keep = () if ps_socket is None else (ps_socket,)
                code = await self.run(argv, os.path.join(directory, "dump.out"), keep)
            finally:
                _signal_all(pids, signal.SIGSTOP)
                await _set_frozen(group, False)
                await _all_stopped(pids)
        finally:
            self.adopt(session, pids)
        if code != 0:
            raise C.CriuFailed(
                "pre-dump", C.first_error(_read(os.path.join(directory, "dump.log")))
            )
        took = (time.perf_counter() - held) * 1000
        written = sum(
            os.path.getsize(os.path.join(directory, n))
            for n in os.listdir(directory)
            if n.startswith("pages-") and n.endswith(".img")
        )
        return took, written

    async def works(self) -> bool:
        """Does CRIU work here (checked once)?  What the agent tells the OSS (issue 12)."""
        try:
            await self.criu()
        except C.CheckpointError:
            return False
        return True

    async def warm(self) -> None:
        """Check CRIU ahead of the first request (its verdict is kept either way)."""
        with contextlib.suppress(C.CheckpointError):
            await self.criu()

    async def run(self, argv: list[str], out: str | int, keep: tuple[int, ...] = ()) -> int:
        """Run `argv` as our child (stdout+stderr to the file or fd `out`, `keep` inherited).

        Its wait status.
        """
        loop = asyncio.get_running_loop()
        for fd in keep:
            os.set_inheritable(fd, True)
        try:
            pid = os.posix_spawn(
                argv[0],
                argv,
                dict(os.environ),
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out, 1)
                    if isinstance(out, int)
                    else (
                        os.POSIX_SPAWN_OPEN,
                        1,
                        out,
                        os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                        0o600,
                    ),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                ],
            )
        except OSError as exc:
            raise C.CriuFailed(argv[1], f"cannot start {argv[0]}: {exc}") from exc
        finally:
            for fd in keep:
                os.set_inheritable(fd, False)
        waiter: asyncio.Future[int] = loop.create_future()
        self.service.children[pid] = waiter  # before the loop can reap it
        try:
            async with asyncio.timeout(CRIU_TIMEOUT):
                return await waiter
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            raise C.CriuFailed(argv[1], f"no answer within {CRIU_TIMEOUT:.0f}s") from None

    async def checkpoint(
        self,
        session: Session,
        *,
        restore: bool,
        images: str | None = None,
        carry: bool = False,
    ) -> Checkpoint:
        """Checkpoint `session`'s tree (and restore it in place when `restore`).

        `carry`: the images also hold the files the tree has open for writing in
        program storage, read before it runs on (`vmagent.checkpoint.carried`).
        """
        criu = await self.criu()
        async with self._lock:
            return await self._checkpoint(criu, session, restore, images, carry)

    async def _checkpoint(
        self,
        criu: C.Criu,
        session: Session,
        restore: bool,
        images: str | None,
        carry: bool = False,
    ) -> Checkpoint:
        tracing = self.service.tracing
        if session.status is not None or session.trace_sock is None or tracing is None:
            raise C.CheckpointError(f"{session.program} is not running under its tracer")
        refused = unmovable(tree_of(session.pid))
        if refused:
            raise Unmovable(refused)
        directory = images or tempfile.mkdtemp(prefix=f"dcp-ckpt-{session.sid.hex()[:8]}-")
        os.makedirs(directory, exist_ok=True)
        try:
            return await self._checkpoint_into(criu, session, restore, images, directory, carry)
        except BaseException:
            if images is None:
                shutil.rmtree(directory, ignore_errors=True)
            raise

    async def _checkpoint_into(
        self,
        criu: C.Criu,
        session: Session,
        restore: bool,
        images: str | None,
        directory: str,
        carry: bool = False,
    ) -> Checkpoint:
        started = time.perf_counter()
        pids = await self.detach(session)
        ends: list[tuple[int, str]] = []
        try:
            ends = program_pipe_ends(pids, _session_pipes(session))
            dump_ms = await self.dump(criu, session, pids, directory)
            if carry:  # still stopped (--leave-stopped): the files are as dumped
                try:
                    await asyncio.to_thread(carried.carry, pids, directory)
                except BaseException:
                    self.adopt(session, pids)
                    raise
            restore_ms = 0.0
            if restore:
                restore_ms = await self._restore_in_place(criu, session, pids, directory, ends)
            self.adopt(session, pids)
        finally:
            for fd, _key in ends:
                os.close(fd)
        frozen = (time.perf_counter() - started) * 1000
        result = Checkpoint(pids, directory, C.image_bytes(directory), frozen, dump_ms, restore_ms)
        log.info("checkpoint of %s: %s", session.program, result.as_json())
        if restore and images is None:
            shutil.rmtree(directory, ignore_errors=True)
        return result

    async def suspend(self, session: Session, images: str | None = None) -> Suspended:
        """Dump `session`'s tree and kill it; the session (and its deputy) waits for `resume`.

        The deputy hears nothing: the session leaves the reaper's table and the
        program's ends of its pipes are held open, so a restore hands them back.
        A failure before the kill leaves the program running (CheckpointError).
        """
        criu = await self.criu()
        async with self._lock:
            tracing = self.service.tracing
            if session.status is not None or session.trace_sock is None or tracing is None:
                raise C.CheckpointError(f"{session.program} is not running under its tracer")
            for sid in [k for k, v in self.suspended.items() if v.session.forgotten]:
                self._discard(sid)  # its deputy never came back: nothing to resume for
            if session.sid in self.suspended:
                raise C.CheckpointError(f"{session.program} is suspended already")
            refused = unmovable(tree_of(session.pid))
            if refused:
                raise Unmovable(refused)
            directory = images or tempfile.mkdtemp(prefix=f"dcp-susp-{session.sid.hex()[:8]}-")
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
            pids = await self.detach(session)
            ends: list[tuple[int, str]] = []
            try:
                ends = program_pipe_ends(pids, _session_pipes(session))
                await self.dump(criu, session, pids, directory)  # adopts again on failure
            except BaseException:
                for fd, _key in ends:
                    os.close(fd)
                if images is None:
                    shutil.rmtree(directory, ignore_errors=True)
                raise
            self.service.by_pid.pop(session.pid, None)  # its death is not the program's end
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            with contextlib.suppress(TimeoutError):  # reaped: nothing of it is left running
                async with asyncio.timeout(FREE_TIMEOUT):
                    while any(os.path.exists(f"/proc/{pid}") for pid in pids):
                        await asyncio.sleep(0.005)
            held = Suspended(session, pids, directory, ends, C.image_bytes(directory))
            self.suspended[session.sid] = held
            log.info("suspended %s: pids %s, %d bytes in %s", session.program, pids,
                     held.image_bytes, directory)  # fmt: skip
            return held

    async def resume(self, session: Session) -> float:
        """Restore a suspended session's tree with its pids and continue it; ms of the restore.

        CheckpointError if it is not suspended or its pids are not free yet (it
        stays suspended); a failed restore ends it with status 255 at the deputy.
        """
        criu = await self.criu()
        async with self._lock:
            held = self.suspended.get(session.sid)
            if held is None:
                raise C.CheckpointError(f"{session.program} is not suspended")
            try:
                async with asyncio.timeout(FREE_TIMEOUT):
                    while any(os.path.exists(f"/proc/{pid}") for pid in held.pids):
                        await asyncio.sleep(0.005)
            except TimeoutError:
                raise C.CheckpointError(
                    f"pids {list(held.pids)} of {session.program} are not free"
                ) from None
            del self.suspended[session.sid]
            try:
                took = await self.restore(criu, held.images, held.ends)
            except C.CriuFailed:
                session.exited(255 << 8)  # dumped and killed, not back: the deputy hears so
                raise
            finally:
                for fd, _key in held.ends:
                    os.close(fd)
            self.service.by_pid[session.pid] = session
            self.adopt(session, held.pids)
            shutil.rmtree(held.images, ignore_errors=True)
            return took

    def holds(self, session: Session) -> bool:
        """Is `session` suspended here?"""
        return session.sid in self.suspended

    def drop(self, session: Session) -> None:
        """A suspended session is killed for good (its program cancelled): the deputy
        hears SIGKILL, its images go."""
        if session.sid in self.suspended:
            session.exited(signal.SIGKILL)
            self._discard(session.sid)

    def close(self) -> None:
        """The agent stops: suspended sessions' images and pipe ends go (they are lost)."""
        for sid in list(self.suspended):
            self._discard(sid)

    def _discard(self, sid: bytes) -> None:
        held = self.suspended.pop(sid)
        for fd, _key in held.ends:
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(held.images, ignore_errors=True)

    async def detach(self, session: Session) -> tuple[int, ...]:
        """Freeze: the session's tracer stops and detaches its tree; the tree's pids."""
        if session.trace_sock is None:
            raise C.CheckpointError(f"{session.program} is not running under its tracer")
        session.detached = asyncio.get_running_loop().create_future()
        channel.send(session.trace_sock, channel.encode(channel.OP_DETACH))
        try:
            async with asyncio.timeout(DETACH_TIMEOUT):
                pids = await session.detached
        except TimeoutError:
            raise C.CheckpointError(
                f"the tracer of {session.program} did not detach within {DETACH_TIMEOUT:.0f}s"
            ) from None
        finally:
            session.detached = None
        session.tracer_pid = 0  # that tracer exits: its tree is ours to give back
        return pids

    async def dump(
        self,
        criu: C.Criu,
        session: Session,
        pids: tuple[int, ...],
        directory: str,
        parent: str | None = None,
        *,
        ps_socket: int | None = None,
        publish: bool = False,
    ) -> float:
        """criu dump of the detached tree (left stopped); ms.  On failure the tree runs on.

        `parent`: the last pre-copy round's directory, relative to `directory`.
        `ps_socket`: a connection to the target's page server (the pages go there).
        `publish`: the files it writes in the program's storage first (`publish_held`:
        a move; not a checkpoint the program runs on after, whose files change since).
        """
        dumped = time.perf_counter()
        try:
            if publish:
                await publish_held(pids)
            code = await self.run(
                C.dump_argv(criu.path, pids[0], directory, parent=parent, ps_socket=ps_socket),
                os.path.join(directory, "dump.out"),
                () if ps_socket is None else (ps_socket,),
            )
        except BaseException:
            self.adopt(session, pids)
            raise
        if code != 0:
            self.adopt(session, pids)
            raise C.CriuFailed("dump", C.first_error(_read(os.path.join(directory, "dump.log"))))
        return (time.perf_counter() - dumped) * 1000

    async def restore(self, criu: C.Criu, directory: str, ends: list[tuple[int, str]]) -> float:
        """criu restore (detached, stopped, the agent its parent); ms.  CriuFailed otherwise."""
        restoring = time.perf_counter()
        code = await self.run(
            C.restore_argv(criu.path, directory, ends),
            os.path.join(directory, "restore.out"),
            tuple(fd for fd, _key in ends),
        )
        if code != 0:
            raise C.CriuFailed(
                "restore", C.first_error(_read(os.path.join(directory, "restore.log")))
            )
        return (time.perf_counter() - restoring) * 1000

    async def _restore_in_place(
        self,
        criu: C.Criu,
        session: Session,
        pids: tuple[int, ...],
        directory: str,
        ends: list[tuple[int, str]],
    ) -> float:
        """Kill the dumped tree, wait its pids free, restore it; ms of the restore."""
        self.service.by_pid.pop(session.pid, None)  # its death is not the program's end
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        async with asyncio.timeout(FREE_TIMEOUT):
            while any(os.path.exists(f"/proc/{pid}") for pid in pids):
                await asyncio.sleep(0.005)
        try:
            took = await self.restore(criu, directory, ends)
        except C.CriuFailed:
            session.exited(255 << 8)  # dumped and killed, not back: the deputy hears so
            raise
        self.service.by_pid[session.pid] = session
        return took

    def adopt(self, session: Session, pids: tuple[int, ...]) -> None:
        """A fresh instance tracer takes the stopped tree and continues it."""
        tracing = self.service.tracing
        assert tracing is not None
        base = session.pid_base or base_for(tracing.instance)  # the pids it showed (issue 11)
        session.trace_sock = tracing.adopt(
            session.sid.hex(), pids, session.view, (session.request.pid, session.request.ppid), base
        )
        session.loop.add_reader(session.trace_sock, session._trace_readable)


class Suspension:
    """The limits enforcer's view of suspend and resume (`vmagent.trace.enforce.Suspension`)."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer

    def holds(self, session: Session) -> bool:
        return self.checkpointer.holds(session)

    def drop(self, session: Session) -> None:
        self.checkpointer.drop(session)

    async def suspend(self, session: Session) -> str | None:
        try:
            await self.checkpointer.suspend(session)
        except C.CheckpointError as exc:
            return str(exc)
        return None

    async def resume(self, session: Session) -> str | None:
        try:
            await self.checkpointer.resume(session)
        except C.CheckpointError as exc:
            return str(exc)
        return None


class Unmovable(C.CheckpointError):
    """the program holds something CRIU cannot carry"""


# Character devices any instance has, that CRIU reopens by path: null, zero, full,
# random, urandom (major 1).
PORTABLE_DEVICES = {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9)}
TTY_MAJORS = {4, 5, 136, 137, 138, 139, 140, 141, 142, 143}  # ttys, /dev/tty, ptmx, pts


def unmovable(pids: list[int] | tuple[int, ...]) -> str | None:
    """Why the tree of `pids` cannot be checkpointed yet (one line), None if it can.

    Asked before anything is frozen: a descriptor on a terminal or on a device
    other than null/zero/full/random/urandom, or a mapping of a device file.
    """
    for pid in pids:
        base = f"/proc/{pid}/fd"
        with contextlib.suppress(OSError):
            for name in os.listdir(base):
                try:
                    st = os.stat(f"{base}/{name}")
                    where = os.readlink(f"{base}/{name}")
                except OSError:
                    continue
                if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                    continue
                dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                if stat.S_ISCHR(st.st_mode) and dev in PORTABLE_DEVICES:
                    continue
                if stat.S_ISCHR(st.st_mode) and dev[0] in TTY_MAJORS:
                    return f"pid {pid} is on a terminal ({where}): it cannot be checkpointed yet"
                return f"pid {pid} holds the device {where}: it cannot be checkpointed yet"
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    fields = line.split(maxsplit=5)
                    path = fields[5].strip() if len(fields) == 6 else ""
                    if path.startswith("/dev/") and not path.startswith(("/dev/shm/", "/dev/zero")):
                        return f"pid {pid} maps the device {path}: it cannot be checkpointed yet"
    return None


async def publish_held(pids: tuple[int, ...]) -> None:
    """Publish the files the stopped tree writes in the program's storage (issue 14).

    dcpfs keeps a file open for writing on this instance until its close; a
    restore elsewhere reopens it by name from the volume, whose size must be the
    one the dump records: so after the freeze, before the dump.  CheckpointError
    (one line naming the mount) if it cannot.
    """
    for mountpoint in held_mounts(pids):
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await asyncio.to_thread(publish_open, mountpoint)
        except TimeoutError:
            raise C.CheckpointError(
                f"the files open in {mountpoint} were not published within {PUBLISH_TIMEOUT:.0f}s"
            ) from None
        except OSError as exc:
            raise C.CheckpointError(
                f"the files open in {mountpoint} could not be published: {exc.strerror or exc}"
            ) from None


def tree_of(root: int) -> list[int]:
    """`root` and its descendants (processes), root first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return out


CGROUP2 = "/sys/fs/cgroup"
FREEZE_TIMEOUT = 5.0  # s for a cgroup to say frozen, or a thawed tree to stop


def freezable_group(pids: list[int] | tuple[int, ...]) -> str | None:
    """The cgroup v2 directory holding all of `pids` and nothing else, or None.

    Never the agent's own group, which would freeze the agent; never one with
    other processes (a sibling session of the same program): CRIU's
    `--freeze-cgroup` seizes every task of the group, and another tracer's
    tasks cannot be seized.
    """
    try:
        groups = {_cgroup2_of(p) for p in pids}
        mine = _cgroup2_of(os.getpid())
    except OSError:
        return None
    if len(groups) != 1:
        return None
    (path,) = groups
    if path in (None, "/", mine):
        return None
    where = CGROUP2 + path
    if not os.path.exists(os.path.join(where, "cgroup.freeze")):
        return None
    try:
        with open(os.path.join(where, "cgroup.procs")) as f:
            members = {int(line) for line in f if line.strip()}
    except (OSError, ValueError):
        return None
    return where if members <= set(pids) else None


def _cgroup2_of(pid: int) -> str | None:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return None


async def _set_frozen(group: str, frozen: bool) -> None:
    """Freeze or thaw a cgroup v2 group; wait until the kernel says so."""
    with open(os.path.join(group, "cgroup.freeze"), "w") as f:
        f.write("1\n" if frozen else "0\n")
    want = f"frozen {int(frozen)}"
    deadline = time.monotonic() + FREEZE_TIMEOUT
    while True:
        with open(os.path.join(group, "cgroup.events")) as f:
            if want in f.read().splitlines():
                return
        if time.monotonic() > deadline:
            raise C.CheckpointError(f"{group} did not say {want} within {FREEZE_TIMEOUT:.0f}s")
        await asyncio.sleep(0.002)


def _signal_all(pids: list[int] | tuple[int, ...], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


async def _all_stopped(pids: list[int] | tuple[int, ...]) -> None:
    """Until every thread of `pids` is stopped (a thawed tree takes its pending SIGSTOP)."""

    def stopped() -> bool:
        for pid in pids:
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError):
                        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                            state = f.read().rsplit(b")", 1)[1].split()[0]
                        if state not in (b"T", b"t"):
                            return False
        return True

    deadline = time.monotonic() + FREEZE_TIMEOUT
    while not stopped():
        if time.monotonic() > deadline:
            raise C.CheckpointError(f"pids {list(pids)} did not stop within {FREEZE_TIMEOUT:.0f}s")
        await asyncio.sleep(0.002)


def resident_bytes(pids: list[int] | tuple[int, ...]) -> int:
    """Resident memory of the processes `pids` (what a dump would copy, roughly)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
    return total


def _session_pipes(session: Session) -> set[int]:
    """Inodes of the pipes between the agent and the program (the agent holds one end)."""
    inodes = set()
    for fd in (*session.outs.values(), *session.ins.values()):
        with contextlib.suppress(OSError):
            inodes.add(os.fstat(fd).st_ino)
    return inodes


def program_pipe_ends(pids: tuple[int, ...], inodes: set[int]) -> list[tuple[int, str]]:
    """The program's end of each pipe in `inodes`, reopened from /proc, with CRIU's key."""
    out: list[tuple[int, str]] = []
    seen: set[int] = set()
    for pid in pids:
        base = f"/proc/{pid}/fd"
        with contextlib.suppress(OSError):
            for name in os.listdir(base):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"{base}/{name}")
                    if not target.startswith("pipe:["):
                        continue
                    ino = int(target[6:-1])
                    if ino not in inodes or ino in seen:
                        continue
                    flags = _fd_flags(pid, name)
                    mode = os.O_WRONLY if flags & os.O_ACCMODE == os.O_WRONLY else os.O_RDONLY
                    out.append((os.open(f"{base}/{name}", mode | os.O_CLOEXEC), target))
                    seen.add(ino)
    return out


def _fd_flags(pid: int, fd: str) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    return 0


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-65536:]
    except OSError:
        return ""
