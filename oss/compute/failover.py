"""Failover from checkpoints (issue 12): the OSS's half.

A program submitted with `checkpoint_every` (dcptrace `--checkpoint-every`, the
config file's `checkpoint_every`, the API's `ProgramSubmit.checkpoint_every`)
gets a `checkpoint` order on every instance it is placed on; their agents
checkpoint its sessions that often (`vmagent.checkpoint.periodic`) and stream
each checkpoint here: a length-prefixed JSON description of the session, then
its CRIU images packed as a migration packs them (blocks zstd-compressed where
that pays).  `CheckpointStore` keeps the last complete one per session under
the OSS's data directory (`checkpoints/`, 0700, files 0600): a new one is
written beside it and renamed over it only once whole, so a checkpoint cut by
its instance's loss never replaces a good one.

When the availability manager declares an instance lost, `Failover.plan` takes
the sessions that had a checkpoint there (before the program's status says the
instance failed, so the home never calls them lost), and `dispatch` orders a
replacement (another ready instance whose CRIU works; when none is, the next
one the pool boots) to `restore` each.  The replacement fetches the checkpoint
(only the instance given that order may), restores and continues it, and says
`{pid, salt}`; the program's home reads the restorations and sends each deputy
to its new instance.  Sessions without a checkpoint are lost as before.  A lost
instance that comes back is fenced: it gets a kill of each program it held at
its loss before anything else, and its uploads are refused (the replacement
holds those sessions now), so a process never runs twice for long.

The policies, the index, the restorations, the instances to fence and those whose
CRIU works are also rows of the OSS's store (`oss.compute.failover_store`), written
as they change: a restarted OSS reads them back (`Failover.load`), keeps only the
checkpoints whose file is whole, removes files no row names, and plans again the
restores of sessions held by instances lost before it stopped.

A restore that failed on every instance that could take it is given up at once:
the program's restorations say so (`Restoration.error`), and its home ends the
session's deputy with that cause instead of letting it wait out its window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from oss import models as m
from oss.compute import failover_store as q
from oss.compute.commands import CommandQueue
from oss.db.store import Store, WriteBehind
from oss.errors import Conflict, Forbidden, InvalidRequest, NotFound, PayloadTooLarge

log = logging.getLogger(__name__)

MAX_META = 1 << 20  # bytes of a session description
MAX_CHECKPOINT = 16 << 30  # bytes of one stored checkpoint (description and packed images)
END = struct.pack(">HQ", 0, 0)  # the packed images' last record (vmagent.checkpoint.migrate)
BODY_TIMEOUT = 600.0  # s to receive one checkpoint
PREPARING = -1  # Planned.command while its target is readied (`Failover.prepare`)
RESTORE_TIMEOUT = 300.0  # s a replacement has to say how its restore went
WAIT_FOR_REPLACEMENT = 600.0  # s a planned restore waits for a ready instance (a pool boots)
CHUNK = 1 << 20


@dataclass(slots=True)
class Stored:
    """The last complete checkpoint of one session."""

    program: str
    session: str
    instance: str  # where it was taken (the session's holder)
    pid: int
    nonce: str  # of the exec ticket that started the session (its deputy's)
    argv: str
    taken: float
    size: int
    path: Path


@dataclass(slots=True)
class Planned:
    """A restore to order: a session of a lost instance that had a checkpoint."""

    stored: Stored
    lost: str
    since: float
    tried: set[str] = field(default_factory=set)
    command: int = 0  # the restore command under way (0: none yet)
    target: str = ""
    address: str = ""
    ordered: float = 0.0
    failures: list[str] = field(default_factory=list)  # "instance: why" of each failed try


class CheckpointStore:
    """Checkpoint files under `root`: `<program>/<session>.ckpt`, 0700 dirs, 0600 files."""

    def __init__(self, root: Path, cap: int = MAX_CHECKPOINT) -> None:
        self.root = root
        self.cap = cap
        self.index: dict[tuple[str, str], Stored] = {}

    def _dir(self, program: str) -> Path:
        if not program.replace("-", "").replace("_", "").isalnum():
            raise InvalidRequest("malformed program id")
        self.root.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        d = self.root / program
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    async def receive(
        self, program: str, session: str, instance: str, body: Any, timeout: float = BODY_TIMEOUT
    ) -> Stored:
        """Store the checkpoint streaming in `body` (an aiohttp StreamReader).

        It replaces the session's last one only once complete (the images'
        end record seen, the size within the cap); InvalidRequest otherwise.
        """
        if len(session) != 32 or not all(c in "0123456789abcdef" for c in session):
            raise InvalidRequest("malformed session id")
        final = self._dir(program) / f"{session}.ckpt"
        part = final.with_suffix(f".part{os.getpid()}-{time.monotonic_ns()}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(part, flags, 0o600)
        try:
            async with asyncio.timeout(timeout):
                head = await body.readexactly(4)
                size = struct.unpack(">I", head)[0]
                if size > MAX_META:
                    raise PayloadTooLarge("session description too large")
                raw = await body.readexactly(size)
                meta = _meta(raw, program, session)
                total, tail = len(head) + size, b""
                await asyncio.to_thread(_write_all, fd, head + raw)
                pending: list[bytes] = []
                held = 0
                while True:
                    piece = await body.readany()
                    if piece:
                        pending.append(piece)
                        held += len(piece)
                        total += len(piece)
                        tail = (tail + piece)[-len(END) :]
                        if total > self.cap:
                            raise PayloadTooLarge(f"a checkpoint is limited to {self.cap} bytes")
                    if pending and (held >= CHUNK or not piece):
                        await asyncio.to_thread(_write_all, fd, b"".join(pending))
                        pending, held = [], 0
                    if not piece:
                        break
            if tail != END:
                raise InvalidRequest("the checkpoint ends early: kept the last complete one")
            await asyncio.to_thread(os.fsync, fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                part.unlink()
            raise
        os.close(fd)
        os.replace(part, final)
        stored = Stored(
            program, session, instance, int(meta["pid"]), str(meta["nonce"]),
            " ".join(_argv(meta))[:200], float(meta.get("taken") or time.time()), total, final,
        )  # fmt: skip
        self.index[(program, session)] = stored
        return stored

    def path(self, program: str, session: str) -> Path:
        """Where the session's checkpoint is kept."""
        return self.root / program / f"{session}.ckpt"

    def whole(self, program: str, session: str) -> dict[str, Any] | None:
        """The description in the session's checkpoint file and its size, if the file is
        whole (a regular file of ours, its description of this session, its images'
        end record last); None otherwise."""
        path = self.path(program, session)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                return None
            head = os.pread(fd, 4, 0)
            size = struct.unpack(">I", head)[0] if len(head) == 4 else MAX_META + 1
            if size > MAX_META or st.st_size < 4 + size + len(END):
                return None
            if os.pread(fd, len(END), st.st_size - len(END)) != END:
                return None
            meta = _meta(os.pread(fd, size, 4), program, session)
        except (OSError, InvalidRequest):
            return None
        finally:
            os.close(fd)
        return dict(meta, size=st.st_size)

    def tidy(self, keep: Collection[tuple[str, str]]) -> None:
        """Remove what no checkpoint in `keep` ((program, session)) is: files of
        checkpoints without an index row, uploads cut by a stop, emptied directories."""
        if not self.root.is_dir() or self.root.is_symlink():
            return
        os.chmod(self.root, 0o700)
        for d in self.root.iterdir():
            if not d.is_dir() or d.is_symlink():
                d.unlink(missing_ok=True)
                continue
            for f in d.iterdir():
                kept = f.suffix == ".ckpt" and (d.name, f.name.removesuffix(".ckpt")) in keep
                if not kept:
                    shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
            if not any(d.iterdir()):
                d.rmdir()

    def drop_program(self, program: str) -> None:
        """The program ended: its checkpoints go."""
        for key in [k for k in self.index if k[0] == program]:
            del self.index[key]
        where = self.root / program
        if where.is_dir() and not where.is_symlink():
            shutil.rmtree(where, ignore_errors=True)


def _meta(raw: bytes, program: str, session: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
        ok = (
            isinstance(meta, dict)
            and meta.get("session") == session
            and meta.get("program_id") == program
            and isinstance(meta.get("pid"), int)
            and isinstance(meta.get("nonce"), str)
            and isinstance(meta.get("key"), str)
        )
    except ValueError:
        ok = False
    if not ok:
        raise InvalidRequest("malformed session description")
    return dict(meta)


def _argv(meta: dict[str, Any]) -> list[str]:
    try:
        return [bytes.fromhex(a).decode(errors="replace") for a in meta["request"]["argv"]]
    except (KeyError, TypeError, ValueError):
        return []


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- the decisions --------------------------------------------------------------------


def choose_target(candidates: Collection[str], load: dict[str, int], tried: Collection[str]) -> str:
    """The replacement for a restore (pure): the least-loaded candidate not tried yet
    (ties by name); "" when none is left."""
    left = sorted(c for c in candidates if c not in tried)
    return min(left, key=lambda c: (load.get(c, 0), c)) if left else ""


class Failover:
    """Checkpoint policies, the stored checkpoints, and restores after a loss."""

    def __init__(
        self,
        store: CheckpointStore,
        commands: CommandQueue,
        targets: Callable[[], Awaitable[dict[str, str]]],
        capable: Callable[[str], bool],
        oss_log: Callable[..., None],
        program_log: Callable[[str, str], Awaitable[None]],
        clock: Callable[[], float] = time.time,  # for planned restores' deadlines
        runs_on: Callable[[str, str], None] = lambda program, instance: None,
        prepare: Callable[[str, str], Awaitable[None]] | None = None,
        saved: Store | None = None,
    ) -> None:
        self.store = store
        self.commands = commands
        self.targets = targets  # ready instances -> their agent's address
        self.capable = capable  # does the instance's CRIU work?
        self.oss_log = oss_log
        self.program_log = program_log
        self.clock = clock
        self.runs_on = runs_on  # a restored process runs there now: it reports from it
        # Readies an instance for one of the program's processes before its restore is
        # ordered there (issue 14: its storage mounted; raises why it cannot).
        self.prepare = prepare
        self._preparing: set[asyncio.Task[None]] = set()
        self.every: dict[str, float] = {}  # program -> seconds between checkpoints
        self.ordered: dict[str, set[str]] = {}  # program -> instances given its policy
        self.holder: dict[tuple[str, str], str] = {}  # (program, session) -> instance
        self.planned: list[Planned] = []
        self.restorations: dict[str, list[m.Restoration]] = {}
        self.fenced: dict[str, set[str]] = {}  # lost instance -> programs it held
        # The OSS's store (None: memory only): each change of the state is a row there.
        self.saved = saved
        self._behind = WriteBehind("failover state")

    # the store ------------------------------------------------------------------------

    def _save(self, fn: Callable[[Any], None]) -> None:
        """Write a change to the store behind the caller (in order with every write)."""
        self._behind.save(self.saved, fn)

    async def flush(self) -> None:
        """Wait for the changes on their way to the store."""
        await self._behind.flush()

    def capability(self, instance: str, ok: bool) -> None:
        """The instance's agent said at registration whether its CRIU works."""
        self._save(lambda c: q.capable(c, instance, ok))

    async def load(self, ready: Collection[str]) -> set[str]:
        """Read the state back after a restart: the policies, the checkpoints whose file
        is whole (the rest go, rows and files), the restorations, the instances to
        fence; sessions held by a lost instance (`ready` are not) are planned again.
        The instances whose CRIU works."""
        if self.saved is None:
            return set()
        got: q.Saved = await self.saved.read(q.load)
        self.every.update(got.every)
        for program, told in got.ordered.items():
            self.ordered.setdefault(program, set()).update(told)
        for program, done in got.restorations.items():
            self.restorations.setdefault(program, []).extend(done)
        for instance, programs in got.fenced.items():
            self.fenced.setdefault(instance, set()).update(programs)
        gone: list[tuple[str, str]] = []
        for row in got.checkpoints:
            found = await asyncio.to_thread(self.store.whole, row.program, row.session)
            if found is None or row.program not in self.every:
                gone.append((row.program, row.session))
                continue
            key = (row.program, row.session)
            self.holder[key] = row.holder
            self.store.index[key] = Stored(
                row.program, row.session, row.instance, int(found["pid"]), str(found["nonce"]),
                " ".join(_argv(found))[:200], float(found.get("taken") or row.taken),
                int(found["size"]), self.store.path(row.program, row.session),
            )  # fmt: skip
        for program, session in gone:
            log.warning("checkpoint of %s session %s not whole: dropped", program, session[:8])
            await self.saved.write(partial(q.drop, program=program, session=session))
        await asyncio.to_thread(self.store.tidy, set(self.store.index))
        lost = [name for name in self.fenced if name not in ready]
        for p in self._held_by(lost):
            s = p.stored
            log.info("restore of %s session %s (lost on %s) planned again", s.program,
                     s.session[:8], p.lost)  # fmt: skip
        return got.capable

    # policy ----------------------------------------------------------------------------

    def want(self, program: str, every: float) -> None:
        """The program asks for a checkpoint every `every` seconds."""
        self.every[program] = every
        self._save(lambda c: q.want(c, program, every))

    def granted(self, program: str, instances: Sequence[str]) -> None:
        """Processes of the program were placed: each instance gets its policy once."""
        every = self.every.get(program)
        if every is None:
            return
        told = self.ordered.setdefault(program, set())
        for inst in instances:
            if inst not in told:
                told.add(inst)
                self.commands.checkpoints(inst, program, every)
                self._save(partial(q.ordered, program=program, instance=inst))

    def forget(self, program: str) -> None:
        """The program ended: policy, checkpoints and restorations go."""
        self.every.pop(program, None)
        self.ordered.pop(program, None)
        self.restorations.pop(program, None)
        for key in [k for k in self.holder if k[0] == program]:
            del self.holder[key]
        self.planned = [p for p in self.planned if p.stored.program != program]
        self.store.drop_program(program)
        self._save(lambda c: q.forget(c, program))

    # checkpoints in ------------------------------------------------------------------

    async def receive(self, instance: str, program: str, session: str, body: Any) -> Stored:
        """An instance's checkpoint of one of its sessions; refused from any other."""
        if program not in self.every or instance not in self.ordered.get(program, set()):
            raise Forbidden(f"no checkpoints of program {program} were asked of {instance}")
        holder = self.holder.get((program, session))
        if holder is not None and holder != instance:
            raise Conflict(f"that session is held by {holder} now")
        stored = await self.store.receive(program, session, instance, body)
        if self.holder.setdefault((program, session), instance) != instance:
            raise Conflict("that session moved meanwhile")
        if self.saved is not None:  # the file is whole and in place: now its row
            row = q.Row(
                program, session, instance, instance, stored.pid, stored.nonce, stored.argv,
                stored.taken, stored.size,
            )  # fmt: skip
            await self.saved.write(lambda c: q.put(c, row))
        return stored

    def ended(self, instance: str, program: str, session: str) -> bool:
        """The session ended on `instance`, which holds it: its checkpoint goes (a
        program's ended sessions would otherwise pile up until it ends)."""
        key = (program, session)
        if self.holder.get(key) != instance:
            return False
        del self.holder[key]
        stored = self.store.index.pop(key, None)
        self._save(lambda c: q.drop(c, program, session))
        if stored is not None:
            stored.path.unlink(missing_ok=True)
        return True

    def migrated(self, program: str, source: str, target: str, pid: int) -> None:
        """A session of the program migrated: its checkpoints now come from `target`,
        which gets the program's policy.  The session is the one `source` held with
        root `pid` (or the only one it held)."""
        held = [
            s
            for s in self.store.index.values()
            if s.program == program and self.holder.get((program, s.session)) == source
        ]
        for s in [s for s in held if s.pid == pid] or (held if len(held) == 1 else []):
            self.holder[(program, s.session)] = target
            self._save(partial(q.hold, program=program, session=s.session, holder=target))
        self.granted(program, [target])

    # a loss ------------------------------------------------------------------------

    def plan(self, lost: Sequence[str], programs: dict[str, set[str]]) -> list[Planned]:
        """Instances are declared lost: the sessions they held that have a checkpoint are
        to be restored; `programs` (instance -> programs placed there) is fenced."""
        for name in lost:
            fenced = self.fenced.setdefault(name, set())
            fenced.update(programs.get(name, set()))
            fenced.update(
                s.program
                for s in self.store.index.values()
                if self.holder.get((s.program, s.session)) == name
            )
            self._save(partial(q.fence, instance=name, programs=set(fenced)))
        return self._held_by(lost)

    def _held_by(self, lost: Sequence[str]) -> list[Planned]:
        """Plan the restores of the checkpointed sessions `lost` instances held."""
        now = self.clock()
        out = [
            Planned(stored, name, now, {name})
            for name in lost
            for stored in self.store.index.values()
            if self.holder.get((stored.program, stored.session)) == name
            and not any(p.stored is stored for p in self.planned)
        ]
        self.planned.extend(out)
        return out

    async def dispatch(self) -> None:
        """Order each planned restore not under way to a replacement; time out the rest."""
        if not self.planned:
            return
        now = self.clock()
        ready = {n: a for n, a in (await self.targets()).items() if self.capable(n)}
        load: dict[str, int] = {}
        for p in self.planned:
            if p.command:
                load[p.target] = load.get(p.target, 0) + 1
        for p in list(self.planned):
            if p.command and now - p.ordered > RESTORE_TIMEOUT:
                if p.command > 0:
                    self.commands.cancel(p.target, p.command)
                await self._failed(p, f"{p.target} did not answer within {RESTORE_TIMEOUT:g} s")
                continue
            if p.command:
                continue
            target = choose_target(ready, load, p.tried)
            if not target:
                if p.failures:  # every instance that could take it failed: say so now
                    await self._failed(p, "its restore failed on " + "; on ".join(p.failures))
                elif now - p.since > WAIT_FOR_REPLACEMENT:
                    await self._failed(p, "no instance could take it")
                continue
            p.target, p.address, p.ordered = target, ready[target], now
            p.tried.add(target)
            load[target] = load.get(target, 0) + 1
            if self.prepare is None:
                self._order(p)
                continue
            p.command = PREPARING  # the tick goes on: a mount may take a while
            task = asyncio.create_task(self._prepare_then_order(p))
            self._preparing.add(task)
            task.add_done_callback(self._preparing.discard)

    async def _prepare_then_order(self, p: Planned) -> None:
        """Ready `p`'s target (`prepare`), then order the restore; a target that cannot be
        readied is given up for another at the next dispatch."""
        s = p.stored
        assert self.prepare is not None
        try:
            await self.prepare(s.program, p.target)
        except Exception as exc:  # noqa: BLE001 - any failure: say it, try elsewhere
            why = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
            await self.program_log(
                s.program, f"restore of pid {s.pid} on {p.target} not ordered: {why}"
            )
            p.failures.append(f"{p.target}: {' '.join(why.split())[:300]}")
            p.command = 0
            return
        if p in self.planned and p.command == PREPARING:
            self._order(p)

    def _order(self, p: Planned) -> None:
        s = p.stored
        cmd = self.commands.restore(p.target, s.program, s.session)
        p.command = cmd.id
        self.oss_log(
            f"program {s.program}: restore of pid {s.pid} from its checkpoint ordered"
            f" (command {cmd.id})", p.target,
        )  # fmt: skip

    async def _failed(self, p: Planned, why: str) -> None:
        """Give the restore up: the program's log and its home hear why."""
        s = p.stored
        self.planned.remove(p)
        given_up = m.Restoration(
            nonce=s.nonce, pid=s.pid, lost=p.lost, instance="", address="", salt="",
            taken=s.taken, error=why[:1000],
        )  # fmt: skip
        self.restorations.setdefault(s.program, []).append(given_up)
        self._save(lambda c: q.restored(c, s.program, given_up))
        await self.program_log(
            s.program, f"lost: pid {s.pid} ({s.argv}) on {p.lost}: not restored: {why}"
        )

    def serving(self, instance: str, program: str, session: str) -> Path:
        """The checkpoint file a restore command asked `instance` to fetch."""
        for p in self.planned:
            s = p.stored
            if (s.program, s.session, p.target) == (program, session, instance) and p.command > 0:
                return s.path
        raise NotFound("no restore of that session was ordered to this instance")

    async def outcome(self, instance: str, body: m.RestoreOutcome) -> None:
        """A replacement's word on its restore command."""
        found = [p for p in self.planned if p.command == body.command and p.target == instance]
        if not found:
            raise NotFound("no such restore command for this instance")
        p = found[0]
        s = p.stored
        self.commands.cancel(instance, p.command)
        if not body.ok:
            log.warning("restore of %s on %s failed: %s", s.session[:8], instance, body.error)
            why = " ".join((body.error or "no reason given").split())  # one line
            p.failures.append(f"{instance}: {why[:300]}")
            p.command, p.target = 0, ""
            await self.program_log(
                s.program, f"restore of pid {s.pid} on {instance} failed: {body.error}"
            )
            return  # the next dispatch tries another instance
        self.planned.remove(p)
        self.holder[(s.program, s.session)] = instance
        self.runs_on(s.program, instance)
        self.ordered.setdefault(s.program, set()).add(instance)
        every = self.every.get(s.program)
        if every is not None:
            self.commands.checkpoints(instance, s.program, every)
        done = m.Restoration(
            nonce=s.nonce, pid=body.pid, lost=p.lost, instance=instance,
            address=p.address, salt=body.salt, taken=s.taken,
        )  # fmt: skip
        self.restorations.setdefault(s.program, []).append(done)

        def saved(c: Any) -> None:
            q.hold(c, s.program, s.session, instance)
            q.ordered(c, s.program, instance)
            q.restored(c, s.program, done)

        self._save(saved)
        ago = max(0.0, time.time() - s.taken)  # the agent's wall clock took it
        await self.program_log(
            s.program,
            f"restored: pid {s.pid} ({s.argv}) on {instance} from its checkpoint taken"
            f" {ago:.1f} s before (instance {p.lost} lost); output since then comes again",
        )

    def of_program(self, program: str) -> list[m.Restoration]:
        """The program's restorations: done ones, and those under way (`instance` "")."""
        pending = [
            m.Restoration(
                nonce=p.stored.nonce, pid=p.stored.pid, lost=p.lost, instance="",
                address="", salt="", taken=p.stored.taken,
            )  # fmt: skip
            for p in self.planned
            if p.stored.program == program
        ]
        return list(self.restorations.get(program, [])) + pending

    def fence(self, instance: str) -> list[str]:
        """A lost instance registers again: kill what it still runs of the programs it
        held (their sessions were restored elsewhere or lost); the programs fenced."""
        programs = sorted(self.fenced.pop(instance, set()))
        if programs:
            self._save(lambda c: q.unfence(c, instance))
        for program in programs:
            self.commands.fence(instance, program)
            self.oss_log(f"program {program}: fenced on {instance} (it was lost)", instance)
        return programs
