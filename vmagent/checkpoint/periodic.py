"""Failover from checkpoints (issue 12), the agent's half.

*Periodic checkpoints*: a program whose policy asks for them (a `checkpoint`
command from the OSS naming the program and its interval, `every` seconds)
has each of its sessions here checkpointed that often: the tree is frozen and
dumped with CRIU and continued at once (`Checkpointer.checkpoint` without
restore, so the program pays only its freeze), then its images, packed with
zstd as a migration packs them (`vmagent.checkpoint.migrate.pack`), and the
session's description go to the OSS (`POST /v1/agents/checkpoints/{program}/
{session}`, this instance's token).  The OSS keeps the last complete one per
session, in storage that outlives this instance.

*Restore*: when the OSS declares an instance lost, it orders a replacement to
`restore` each session that had a checkpoint: the agent fetches it (`GET` of
the same path: the OSS answers only the instance it gave the order to),
restores the tree with its pids (`Migrator._restore`: new pipes for the
deputy's streams, `--inherit-fd`), has a fresh tracer adopt and continue it,
and reports `{pid, salt}` (`POST /v1/agents/checkpoints/restored`).  The
session's deputy, told by its home where the program went, resumes the
session here proving `moved_key(key, instance, salt)`.  The output written
after the checkpoint is written again (at-least-once from the checkpoint):
a restored session numbers its frames after whatever the deputy received, so
nothing it sends is taken for a replay.  The files it held open for writing in
program storage are carried by the checkpoint and put back before the restore
(`vmagent.checkpoint.carried`): what it wrote to them after is written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp

from vmagent.checkpoint import carried
from vmagent.checkpoint import criu as C
from vmagent.checkpoint.local import Checkpointer
from vmagent.checkpoint.migrate import (
    MAX_META,
    Description,
    MigrationRefused,
    Migrator,
    _key_of,
    describe,
    moved_key,
    scratch,
)
from vmagent.exec import protocol as P
from vmagent.exec.server import ExecService
from vmagent.exec.session import Session

log = logging.getLogger(__name__)

CHECKPOINTS = "/v1/agents/checkpoints"
RESTORED = "/v1/agents/checkpoints/restored"
TICK = 0.2  # s between looks for a checkpoint that is due
MIN_EVERY = 0.5  # s: a shorter interval is taken as this (a dump must fit between)
RESTORED_WINDOW = 120.0  # s a restored session waits for its deputy to come back
FETCH_TIMEOUT = 300.0  # s to fetch a checkpoint and restore it
SEEN = 4096  # command ids remembered


class ForgivingInbox(P.Inbox):
    """The inbox of a restored session: the deputy's frames continue from whatever it
    sent last, which may be past what the checkpoint saw (input read after the
    checkpoint is lost, as docs/CHECKPOINT.md says); the first frame sets the count."""

    def __init__(self, last: int) -> None:
        super().__init__()
        self.last = last
        self._first = True

    def accept(self, seq: int, size: int) -> bool:
        if self._first and seq > self.last + 1:
            self.last = seq - 1
        self._first = False
        return super().accept(seq, size)


class FailoverOrders:
    """Periodic checkpoints and restores ordered by the OSS; observer of the agent's
    `command_handlers` (heartbeat replies)."""

    def __init__(
        self,
        migrator: Migrator,
        sessions: Callable[[], Iterable[Session]],
        oss_url: str,
        token: str,
        timeout: float,
    ) -> None:
        self.migrator = migrator
        self.ckpt: Checkpointer = migrator.ckpt
        self.service: ExecService = migrator.service
        self.sessions = sessions
        self.socket_path = oss_url[len("unix:") :] if oss_url.startswith("unix:") else None
        self.base = "http://oss" if self.socket_path is not None else oss_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.every: dict[str, float] = {}  # program -> seconds between checkpoints
        self.last: dict[bytes, float] = {}  # session id -> when its last checkpoint began
        self.stored: dict[bytes, str] = {}  # session id -> program, of those the OSS holds
        self._seen: dict[int, None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    def http(self) -> aiohttp.ClientSession:
        """The client to the OSS (its unix socket for a `--instances` run)."""
        if self._http is None:
            connector = (
                aiohttp.UnixConnector(path=self.socket_path) if self.socket_path else None
            )
            self._http = aiohttp.ClientSession(
                connector=connector, headers={"Authorization": f"Bearer {self.token}"}
            )
        return self._http

    def on_commands(self, commands: list[dict[str, Any]]) -> None:
        """`checkpoint` sets a program's interval; `restore` starts a restore."""
        for cmd in commands:
            action = cmd.get("action")
            if action not in ("checkpoint", "restore"):
                continue
            try:
                cid, program = int(cmd["id"]), str(cmd["program"])
                every = float(cmd.get("every") or 0)
                sid = str(cmd.get("session") or "")
            except (KeyError, TypeError, ValueError):
                log.warning("failover: malformed command from the OSS ignored: %.200r", cmd)
                continue
            if cid in self._seen:
                continue
            self._seen[cid] = None
            while len(self._seen) > SEEN:
                del self._seen[next(iter(self._seen))]
            if action == "checkpoint":
                if every > 0:
                    self.every[program] = max(every, MIN_EVERY)
                else:
                    self.every.pop(program, None)
                if self._loop_task is None:
                    self._loop_task = asyncio.get_running_loop().create_task(
                        self._periodic(), name="periodic-checkpoints"
                    )
            else:
                self._start(self._restore(cid, program, sid), f"restore-{cid}")

    def _start(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- periodic checkpoints ----------------------------------------------------------

    def due(self, now: float) -> list[Session]:
        """Running sessions of programs with a policy whose checkpoint is due."""
        out = []
        for s in self.sessions():
            every = self.every.get(s.program_id or "")
            if every is None or s.status is not None or s.moved or s.migrating:
                continue
            if s.trace_sock is None or self.ckpt.holds(s):
                continue
            seen = self.last.setdefault(s.sid, now)  # the first one `every` s after it starts
            if now - seen >= every:
                out.append(s)
        return out

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            for session in self.due(time.monotonic()):
                self.last[session.sid] = time.monotonic()
                try:
                    await self.checkpoint(session)
                except C.CheckpointError as exc:
                    log.warning("periodic checkpoint of %s: %s", session.program, exc)
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    log.warning("periodic checkpoint of %s not stored: %s", session.program, exc)
            ended = {s.sid: s for s in self.sessions() if s.status is not None and not s.moved}
            for sid in [k for k in self.stored if k in ended or k not in self.last]:
                await self._drop(sid, self.stored.pop(sid))
            live = {s.sid for s in self.sessions()}
            for sid in [k for k in self.last if k not in live]:
                del self.last[sid]

    async def checkpoint(self, session: Session) -> dict[str, Any]:
        """Checkpoint `session` (it runs on) and send it to the OSS; the OSS's answer."""
        base = tempfile.mkdtemp(prefix=f"{self.migrator.prefix}migrate-", dir=scratch())
        try:
            directory = os.path.join(base, "final")
            os.mkdir(directory)
            # The pipes' keys before the freeze: the program holds the same pipes after.
            pipes = {
                "outs": {fd: _key_of(r) for fd, r in session.outs.items()},
                "ins": {fd: _key_of(w) for fd, w in session.ins.items()},
            }
            out_seq = session.outbox.next_seq
            done = await self.ckpt.checkpoint(session, restore=False, images=directory, carry=True)
            meta = describe(session, done.pids, pipes, session.key, out_seq)
            meta.update(
                taken=time.time(),
                freeze_ms=round(done.freeze_ms, 1),
                dump_ms=round(done.dump_ms, 1),
                image_bytes=done.image_bytes,
            )
            url = f"{self.base}{CHECKPOINTS}/{session.program_id}/{session.sid.hex()}"
            answer, (raw, packed) = await self.migrator._send(self.http(), url, meta, directory)
            self.stored[session.sid] = str(session.program_id)
            log.info(
                "checkpoint of %s stored: frozen %.1f ms, %d bytes (%d packed)",
                session.program, done.freeze_ms, raw, packed,
            )  # fmt: skip
            return answer
        finally:
            shutil.rmtree(base, ignore_errors=True)

    async def _drop(self, sid: bytes, program: str) -> None:
        """The session ended here: the OSS forgets its checkpoint (best effort)."""
        url = f"{self.base}{CHECKPOINTS}/{program}/{sid.hex()}"
        try:
            async with asyncio.timeout(self.timeout):
                async with self.http().delete(url) as r:
                    await r.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.debug("checkpoint of an ended session not dropped: %s", exc)

    # -- restore on a replacement ---------------------------------------------------------

    async def _restore(self, cid: int, program: str, sid: str) -> None:
        outcome: dict[str, Any] = {"command": cid, "ok": False}
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                pid, salt, restore_ms = await self.restore(program, sid)
            outcome.update(ok=True, pid=pid, salt=salt, restore_ms=restore_ms)
        except (C.CheckpointError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            outcome["error"] = str(exc)[:4096] or type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - the OSS must hear something
            log.exception("restore command %d failed", cid)
            outcome["error"] = f"{type(exc).__name__}: {exc}"[:4096]
        log.info("restore command %d (%s session %s): %s", cid, program, sid[:8], outcome)
        for _ in range(5):
            try:
                async with asyncio.timeout(self.timeout):
                    async with self.http().post(self.base + RESTORED, json=outcome) as r:
                        await r.read()
                        if r.status < 500:
                            return
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.warning("restore %d: the outcome did not reach the OSS: %s", cid, exc)
            await asyncio.sleep(1.0)

    async def restore(self, program: str, sid: str) -> tuple[int, str, float]:
        """Fetch the session's checkpoint from the OSS, restore and continue it here.

        (pid, salt the deputy's key is derived with, ms of the restore).
        """
        criu = await self.ckpt.criu()
        base = tempfile.mkdtemp(prefix=f"{self.migrator.prefix}restore-", dir=scratch())
        try:
            directory = os.path.join(base, "final")
            os.mkdir(directory)
            url = f"{self.base}{CHECKPOINTS}/{program}/{sid}"
            async with self.http().get(url) as resp:
                if resp.status != 200:
                    text = (await resp.text()).strip()
                    raise MigrationRefused(f"the OSS gave no checkpoint: {resp.status} {text}")
                size = struct.unpack(">I", await resp.content.readexactly(4))[0]
                if size > MAX_META:
                    raise MigrationRefused("session description too large")
                raw = json.loads(await resp.content.readexactly(size))
                await self.migrator._take(resp.content, directory)
            salt = secrets.token_hex(8)
            raw["key"] = moved_key(str(raw["key"]), self.migrator.instance, salt)
            meta = Description(raw)
            if meta.program_id != program or meta.sid.hex() != sid:
                raise MigrationRefused("the checkpoint is of another session")
            # The files it wrote after the checkpoint, as they were then (CRIU checks
            # their sizes): the program writes again what it wrote after.
            await asyncio.to_thread(carried.put_back, directory)
            async with self.ckpt._lock:
                answer = await self.migrator._restore(criu, meta, directory, f"failover.{sid}")
                self._run(meta)
            return int(answer["pid"]), salt, float(answer.get("restore_ms", 0))
        finally:
            shutil.rmtree(base, ignore_errors=True)

    def _run(self, meta: Description) -> None:
        """A fresh tracer continues the restored tree; its output waits for the deputy."""
        held = self.migrator.held.pop(meta.sid)
        held.timer.cancel()
        session = held.session
        session.inbox = ForgivingInbox(meta.in_last)
        self.ckpt.adopt(session, held.pids)
        self.service.hooks.started(session)
        attach = session.attach
        watching = [False]

        def reattached(proto: Any, peer_last: int) -> None:
            # The deputy received frames past the checkpoint's count: ours come after
            # them, so the output since the checkpoint arrives again as new frames
            # (at-least-once), never dropped as replays.  A later attach changes
            # nothing (the deputy is never ahead of us then).  `attach` starts reading.
            session.outbox.next_seq = max(session.outbox.next_seq, peer_last + 1)
            attach(proto, peer_last)
            if session.unwanted and not watching[0]:
                watching[0] = True
                session._watch_inputs(0.001)

        # Session.attach is where the deputy's last seq is first known; wrapping it for
        # this one session leaves every other session (and Session) as it is.
        session.attach = reattached  # type: ignore[method-assign]
        session._abandon = session.loop.call_later(
            RESTORED_WINDOW, self.service.abandon, session
        )

    async def close(self) -> None:
        """Stop the periodic loop and every restore under way."""
        tasks = list(self._tasks) + ([self._loop_task] if self._loop_task else [])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.close()
