"""Migration of a session's tree to another instance, agent to agent.

Source (`Migrator.migrate`, asked by whoever holds both instances' credentials
with a *migration ticket* minted with the target's token):

1. refuse before freezing anything: a program on a terminal; the target's
   check (`POST /v1/migrations/check`: ticket, CRIU, every pid of the tree free);
2. freeze (the tracer detaches the stopped tree), drain the program's output
   pipes to the deputy, `criu dump --leave-stopped`, tar + zstd the images;
3. `POST /v1/migrations` to the target (the ticket burnt there): a length-prefixed
   JSON description of the session (its exec request, pipes, sequence numbers,
   the deputy's next key) and the compressed images, streamed and bounded;
4. the target restores the tree with the same pids (its agent becomes their
   parent), creates the session's pipes anew (`--inherit-fd`), adopts the tree
   with its own tracer (which continues it) and answers with the pid;
5. only then the source kills its stopped copy and sends the deputy MOVED
   (address, instance, salt): the deputy resumes the session at the target,
   proving the key derived from its ticket's secret (`moved_key`), and replays
   whatever the source left unacknowledged.

Any failure before step 5 gives the stopped tree back to a tracer on the
source: the program runs on where it was, and the deputy is made to reconnect
so the frames held back during the attempt are replayed.  See docs/CHECKPOINT.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hmac
import json
import logging
import os
import secrets
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import zstandard

from vmagent.checkpoint import criu as C
from vmagent.checkpoint.local import (
    Checkpointer,
    Unmovable,
    freezable_group,
    resident_bytes,
    tree_of,
    unmovable,
)
from vmagent.exec import protocol as P
from vmagent.exec.session import Session
from vmagent.exec.spawn import ExecRequest, FdSpec
from vmagent.trace.pidspace import base_for

log = logging.getLogger(__name__)

TICKET_TTL = 60.0  # s a migration ticket is valid
MAX_META = 1 << 20  # bytes of a session description
MAX_IMAGES = 16 << 30  # bytes of images (compressed, and again uncompressed) a target takes
CHECK_TIMEOUT = 10.0  # s for the target's check
STALL_TIMEOUT = 30.0  # s a transfer may make no progress (a target gone sends no reset)
RESTORE_WAIT = 150.0  # s for the target's answer once it has the images (criu restore)
STAGED_TTL = 2 * 60.0  # s a target keeps pre-copy rounds that no final dump followed
ZSTD_LEVEL = 1  # fast: the tree is frozen while this runs (per block of CHUNK bytes)
CHUNK = 1 << 20
HOLD_TIMEOUT = 15.0  # s a restored tree waits (stopped, untraced) for the source's commit
COMMIT_WINDOW = HOLD_TIMEOUT + 5.0  # s the source asks for the commit before resuming its copy
LAST_PID = "/proc/sys/kernel/ns_last_pid"
PAGES_ACCEPT = 10.0  # s a target's page server waits for its source to connect and prove itself
PAGES_WAIT = 60.0  # s a target waits, once it has the other images, for its page server to end
PAGES_SECRET = 2.0  # s a connection to it may take to send the secret
PAGES_READY = b"\x01"  # the target's answer to the right secret: its page server takes over


class MigrationRefused(C.CheckpointError):
    """the migration was refused"""


# -- tickets (pure) ---------------------------------------------------------------------


KEY_TOKEN, KEY_EXEC = "i", "x"  # minted with the instance token / the agent's exec key


def mint_ticket(
    token: str, instance: str, session: str, now: float | None = None, key: str = KEY_TOKEN
) -> str:
    """A single-use ticket letting a source agent move `session` to `instance`.

    `m1.<key>.<nonce>.<expiry_ms>.<session>.<mac>`: `key` says which secret of the
    target made the MAC (its instance token, or the exec key it registered with
    the OSS, which knows no instance token in clear).
    """
    expiry = int(((time.time() if now is None else now) + TICKET_TTL) * 1000)
    public = f"m1.{key}.{secrets.token_hex(12)}.{expiry}.{session}"
    return f"{public}.{_ticket_mac(token, instance, public)}"


def _ticket_mac(token: str, instance: str, public: str) -> str:
    return hmac.new(token.encode(), f"migrate.{public}.{instance}".encode(), "sha256").hexdigest()


class MigrationTickets:
    """The target side: verify tickets with this instance's token, each burnt once."""

    def __init__(
        self,
        token: str,
        instance: str,
        clock: Callable[[], float] = time.time,
        exec_key: str | None = None,
    ) -> None:
        self._keys = {KEY_TOKEN: token}
        if exec_key:
            self._keys[KEY_EXEC] = exec_key
        self._instance = instance
        self._clock = clock
        self._used: dict[str, int] = {}

    def _parts(self, ticket: str) -> list[str]:
        """The ticket's fields once its form and MAC are right; MigrationRefused otherwise."""
        parts = ticket.split(".")
        if len(parts) != 6 or parts[0] != "m1" or not parts[3].isdigit() or len(parts[3]) > 15:
            raise MigrationRefused("malformed migration ticket")
        key = self._keys.get(parts[1])
        public = ".".join(parts[:5])
        if key is None or not hmac.compare_digest(
            parts[5], _ticket_mac(key, self._instance, public)
        ):
            raise MigrationRefused(f"migration ticket not valid for {self._instance}")
        return parts

    def authentic(self, ticket: str) -> str:
        """The session id of a ticket this instance's key made (expired or used alike)."""
        return self._parts(ticket)[4]

    def check(self, ticket: str, *, burn: bool, in_progress: bool = False) -> str:
        """The session id the ticket is for; MigrationRefused naming what is wrong.

        `in_progress`: the move this ticket started is under way here (its
        pre-copy rounds are staged), so its expiry no longer counts: the
        ticket bounds when a move may start, the staging how long it may take.
        """
        parts = self._parts(ticket)
        nonce, session = parts[2], parts[4]
        now = int(self._clock() * 1000)
        expiry = int(parts[3])
        if expiry < now and not in_progress:
            raise MigrationRefused("migration ticket expired")
        if expiry - now > 2 * TICKET_TTL * 1000:
            raise MigrationRefused("migration ticket lives too long")
        self._used = {n: e for n, e in self._used.items() if e >= now}
        if nonce in self._used:
            raise MigrationRefused("migration ticket already used")
        if burn:
            self._used[nonce] = max(expiry, now + int(STAGED_TTL * 1000))
        return session


def moved_key(key: str, instance: str, salt: str) -> str:
    """The key a deputy proves after MOVED (`vmagent.exec.link.Link.move` derives the same)."""
    return hmac.new(key.encode(), f"moved.{instance}.{salt}".encode(), "sha256").hexdigest()


# -- the session's description (pure) ----------------------------------------------------


def _hex(value: bytes) -> str:
    return value.hex()


def describe(
    session: Session,
    pids: tuple[int, ...],
    pipes: dict[str, dict[int, str]],
    key: str,
    out_seq: int,
) -> dict[str, Any]:
    """What the target needs to carry the session on (JSON-able)."""
    r = session.request
    return {
        "session": session.sid.hex(),
        "nonce": session.nonce,
        "key": key,
        "program": session.program,
        "program_id": session.program_id,
        "pid": session.pid,
        "pids": list(pids),
        # The program pids the tree shows (issue 11): its root's and the base of the others.
        "vpid": r.pid,
        "vppid": r.ppid,
        "pid_base": session.pid_base or base_for(session.service.config.instance),
        "view": _hex(session.view),
        "request": {
            "path": _hex(r.path),
            "argv": [_hex(a) for a in r.argv],
            "env": [_hex(e) for e in r.env],
            "cwd": _hex(r.cwd),
            "umask": r.umask,
            "rlimits": [list(x) for x in r.rlimits],
            "fds": [
                {
                    "fd": f.fd,
                    "kind": _hex(f.kind),
                    "path": _hex(f.path),
                    "flags": f.flags,
                    "pos": f.pos,
                    "rdev": f.rdev,
                }
                for f in r.fds
            ],
            "uid": r.uid,
            "gid": r.gid,
            "groups": list(r.groups),
            "sigign": r.sigign,
            "sigblk": r.sigblk,
        },
        "outs": {str(fd): k for fd, k in pipes["outs"].items()},
        "ins": {str(fd): k for fd, k in pipes["ins"].items()},
        "unwanted": sorted(session.unwanted.values()),
        # Inputs with a WANT out: the deputy's one DATA (or EOF) for it re-arms them.
        "asked": sorted(session.asked),
        "out_seq": out_seq,
        "in_last": session.inbox.last,
    }


class Description:
    """A validated session description (MigrationRefused if anything is off)."""

    def __init__(self, raw: Any) -> None:
        try:
            self.sid = bytes.fromhex(_str(raw["session"]))
            self.nonce = _str(raw["nonce"])
            self.key = _str(raw["key"])
            self.program = _str(raw["program"])
            # The OSS program (its exec ticket's), so the target reports it (issue 12).
            pid_ = raw.get("program_id")
            self.program_id = None if pid_ is None else _str(pid_)
            self.pid = _int(raw["pid"])
            self.pids = tuple(_int(p) for p in raw["pids"])
            self.view = bytes.fromhex(_str(raw["view"]))
            q = raw["request"]
            self.request = ExecRequest(
                path=bytes.fromhex(_str(q["path"])),
                argv=tuple(bytes.fromhex(_str(a)) for a in q["argv"]),
                env=tuple(bytes.fromhex(_str(e)) for e in q["env"]),
                cwd=bytes.fromhex(_str(q["cwd"])),
                umask=_int(q["umask"]),
                rlimits=tuple((_int(a), _int(b, -1), _int(c, -1)) for a, b, c in q["rlimits"]),
                fds=tuple(
                    FdSpec(
                        _int(f["fd"]),
                        bytes.fromhex(_str(f["kind"])),
                        bytes.fromhex(_str(f["path"])),
                        _int(f["flags"]),
                        _int(f["pos"]),
                        _int(f["rdev"]),
                    )
                    for f in q["fds"]
                ),
                uid=_int(q["uid"]),
                gid=_int(q["gid"]),
                groups=tuple(_int(g) for g in q["groups"]),
                sigign=_int(q["sigign"]),
                sigblk=_int(q["sigblk"]),
                pid=_int(raw.get("vpid", 0)),
                ppid=_int(raw.get("vppid", 0)),
            )
            self.pid_base = _int(raw.get("pid_base", 0))
            self.outs = {_int(int(fd)): _pipe_key(k) for fd, k in raw["outs"].items()}
            self.ins = {_int(int(fd)): _pipe_key(k) for fd, k in raw["ins"].items()}
            self.unwanted = {_int(fd) for fd in raw["unwanted"]}
            self.asked = {_int(fd) for fd in raw.get("asked", [])}
            self.out_seq = _int(raw["out_seq"])
            self.rounds = _int(raw.get("rounds", 0))  # pre-copy rounds sent before
            # The final dump's pages came through the target's page server (not in the stream).
            self.pages = raw.get("pages", False)
            if not isinstance(self.pages, bool):
                raise TypeError("pages must be true or false")
            self.in_last = _int(raw["in_last"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MigrationRefused(f"malformed session description: {exc!r}") from None
        if len(self.sid) != 16 or not self.pids or self.pids[0] != self.pid:
            raise MigrationRefused("malformed session description: session or pids")


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: Any, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < 1 << 64:
        raise TypeError(f"expected a non-negative integer, got {value!r}")
    return value


def _pipe_key(value: Any) -> str:
    key = _str(value)
    if not (key.startswith("pipe:[") and key.endswith("]") and key[6:-1].isdigit()):
        raise ValueError(f"not a pipe key: {key!r}")
    return key


# -- images on the wire -------------------------------------------------------------------


# The images travel as records: a header `>HQ` (name length, size), the name,
# then blocks `>BI` (1: zstd, 0: raw; length) of at most CHUNK bytes each once
# inflated; a zero name length ends the stream.  A block zstd cannot shrink by
# a tenth (judged on its first SAMPLE bytes) goes raw: random pages cost
# neither end any compression work.
RECORD = struct.Struct(">HQ")
BLOCK = struct.Struct(">BI")
RAW, ZSTD = 0, 1
SAMPLE = 1 << 14  # bytes of a block tried first


def pack(directory: str, fd: int, spent: list[float] | None = None) -> tuple[int, int]:
    """Write `directory`'s images into the pipe `fd` (closed at the end); (raw, sent) bytes.

    `spent`: gets the seconds spent compressing appended (the rest is reading
    the images and waiting for the sender).
    """
    raw = sent = 0
    zstd = 0.0
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    with open(fd, "wb", buffering=0) as out:
        for name in sorted(os.listdir(directory)):
            if not name.endswith(".img"):
                continue
            encoded = name.encode()
            with open(os.path.join(directory, name), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                out.write(RECORD.pack(len(encoded), size) + encoded)
                left = size
                while left:
                    data = f.read(min(CHUNK, left))
                    if not data:
                        raise OSError(f"{name} shrank while it was sent")
                    kind, body = RAW, data
                    t = time.perf_counter()
                    # A sample first: a block whose start does not shrink goes raw.
                    if len(compressor.compress(data[:SAMPLE])) < min(len(data), SAMPLE) * 0.9:
                        small = compressor.compress(data)
                        if len(small) < len(data) * 0.9:
                            kind, body = ZSTD, small
                    zstd += time.perf_counter() - t
                    out.write(BLOCK.pack(kind, len(body)))
                    out.write(body)
                    sent += BLOCK.size + len(body)
                    left -= len(data)
            raw += size
        out.write(RECORD.pack(0, 0))
    if spent is not None:
        spent.append(zstd)
    return raw, sent


def unpack(fd: int, directory: str) -> int:
    """Write the images of the stream in the pipe `fd` into `directory` (bounded); raw bytes."""
    total = 0
    decompressor = zstandard.ZstdDecompressor()
    with open(fd, "rb", buffering=CHUNK) as src:

        def exactly(n: int) -> bytes:
            data = src.read(n)
            if len(data) != n:
                raise MigrationRefused("the images end early")
            return data

        while True:
            length, size = RECORD.unpack(exactly(RECORD.size))
            if length == 0:
                break
            name = exactly(length).decode("utf-8", errors="replace")
            if os.path.basename(name) != name or not name.endswith(".img") or name[0] == ".":
                raise MigrationRefused(f"unexpected entry in the images: {name!r}")
            total += size
            if total > MAX_IMAGES:
                raise MigrationRefused("the images are larger than this instance takes")
            with open(os.path.join(directory, name), "xb") as out:
                left = size
                while left:
                    kind, n = BLOCK.unpack(exactly(BLOCK.size))
                    if n > 2 * CHUNK or kind not in (RAW, ZSTD):
                        raise MigrationRefused("malformed block in the images")
                    body = exactly(n)
                    if kind == ZSTD:
                        body = decompressor.decompress(body, max_output_size=CHUNK)
                    if len(body) > left:
                        raise MigrationRefused("a block runs past its file")
                    out.write(body)
                    left -= len(body)
        while src.read(CHUNK):  # the sender's tail: let it finish writing
            pass
    return total


def scratch() -> str | None:
    """Where a migration's images live meanwhile: memory (/dev/shm) when it can, else $TMPDIR.

    They are read back at once (by the sender, by criu restore): a disk would
    only add its writeback to the freeze.
    """
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


class Scratch:
    """This agent's scratch names under `where`: `dcp-mig-<instance>-<tag>-...`.

    The agent holds an flock on `dcp-mig-<instance>-<tag>-lock` while it lives, so
    a restarted agent of the same instance removes what a killed one left
    (images can be large) and never what a live one of the same name is
    using (local instances share /dev/shm; several clusters name theirs alike).
    """

    def __init__(self, where: str, instance: str) -> None:
        self.where = where
        self.instance = instance
        self.prefix = f"dcp-mig-{instance}-{secrets.token_hex(4)}-"
        self.sweep()
        self._lock = os.open(
            os.path.join(where, self.prefix + "lock"),
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def sweep(self) -> None:
        """Remove the scratch of dead agents (their lock is free), whatever their instance."""
        start = "dcp-mig-"
        with contextlib.suppress(OSError):
            for name in os.listdir(self.where):
                if not name.startswith(start) or not name.endswith("-lock"):
                    continue
                tag = name[: -len("lock")]
                path = os.path.join(self.where, name)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live agent's
                finally:
                    os.close(fd)
                for other in os.listdir(self.where):
                    if other.startswith(tag) and ("migrate-" in other or "restore-" in other):
                        shutil.rmtree(os.path.join(self.where, other), ignore_errors=True)
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def close(self) -> None:
        """The agent stops: its lock goes (its scratch is gone already)."""
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.where, self.prefix + "lock"))
        with contextlib.suppress(OSError):
            os.close(self._lock)


# -- /proc ------------------------------------------------------------------------------


def busy(pids: list[int] | tuple[int, ...]) -> list[int]:
    """Those of `pids` that name a process (or zombie) here."""
    return [p for p in pids if os.path.exists(f"/proc/{p}")]


def reserve_pids(pids: tuple[int, ...]) -> None:
    """Let this namespace's next pids come after `pids` (criu's own helpers must not take them).

    The agent is root and (on a local instance) PID 1 of its own namespace, so
    `ns_last_pid` is its namespace's; elsewhere a failure just leaves the order.
    """
    with contextlib.suppress(OSError, ValueError):
        with open(LAST_PID) as f:
            last = int(f.read())
        if last < max(pids):
            with open(LAST_PID, "w") as f:
                f.write(str(max(pids)))


# -- the source ---------------------------------------------------------------------------


@dataclass
class Held:
    """A restored tree, stopped and untraced, waiting for its source's commit."""

    ticket: str
    session: Session
    pids: tuple[int, ...]
    timer: asyncio.TimerHandle


MAX_COMMITTED = 64  # commits remembered (a repeated commit is answered "runs")
MAX_STAGED = 8  # sessions whose pre-copy rounds a target keeps at once


@dataclass
class Staged:
    """Pre-copy rounds received for a session's move: `base`/pre0, pre1, ..."""

    base: str
    rounds: int
    timer: asyncio.TimerHandle
    ticket: str
    busy: bool = False
    # Page servers started for its directories (`pre<k>`, `final`): their exit status.
    serving: dict[str, asyncio.Task[int]] = field(default_factory=dict)


class Migrator:
    """Both ends of migrations for one agent."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        tickets: MigrationTickets,
        instance: str,
        *,
        fast: bool = True,
    ) -> None:
        # `fast`: pre-copy rounds (where they work) and pages streamed through the
        # target's page server, unless a request says otherwise (`--no-migrate-fast`).
        self.fast = fast
        self.ckpt = checkpointer
        self.service = checkpointer.service
        self.tickets = tickets
        self.instance = instance
        self.held: dict[bytes, Held] = {}  # session id -> restored, waiting for commit
        self.scratch = Scratch(scratch() or tempfile.gettempdir(), instance)
        self.prefix = self.scratch.prefix
        self.committed: dict[bytes, str] = {}  # session id -> ticket, newest last
        self.staged: dict[bytes, Staged] = {}  # session id -> pre-copy rounds received
        self.precopy_error = ""  # of the move under way (one at a time: the lock)
        self.zstd_s: list[float] = []  # s the last transfer spent compressing

    async def migrate(
        self,
        session: Session,
        to: str,
        instance: str,
        ticket: str,
        precopy: bool | None = None,
        *,
        page_server: bool | None = None,
    ) -> dict[str, Any]:
        """Move `session`'s tree to the agent at `to`; what it took.

        `precopy`: copy its memory in pre-dump rounds while it runs first, where
        this kernel tracks dirty pages and the tree is large enough.
        `page_server`: CRIU sends the pages straight to the target's page server
        (where the target offers one; else they go packed with the rest).
        Both default to this agent's `fast` setting.
        """
        precopy = self.fast if precopy is None else precopy
        pages = self.fast if page_server is None else page_server
        criu = await self.ckpt.criu()
        if session.status is not None or session.moved or session.trace_sock is None:
            raise MigrationRefused(f"{session.program} is not running here")
        for fd in session.paths.values():
            if os.isatty(fd):
                raise MigrationRefused(f"{session.program} is on a terminal: it cannot migrate yet")
        tree = tree_of(session.pid)
        refused = unmovable(tree)
        if refused:
            raise Unmovable(refused)
        async with aiohttp.ClientSession(
            headers={"Authorization": f"DCP-Migrate {ticket}"}
        ) as http:
            await self._check(http, to, tree)
            precopy = (
                precopy
                and resident_bytes(tree) >= C.PRECOPY_MIN
                and freezable_group(tree) is not None  # held in its freezer meanwhile
                and await self.ckpt.precopy(criu)
            )
            async with self.ckpt._lock:
                return await self._move(http, criu, session, to, instance, precopy, pages)

    async def _pages(
        self, http: aiohttp.ClientSession, to: str, session: Session, into: str, use: bool
    ) -> socket.socket | None:
        """A connection to a page server the target runs for its directory `into`, or None.

        Without one (this move does not use it, the target offers none or it
        cannot be reached) the pages go packed with the other images.  The
        target answers a port and a one-use secret; the connection sends the
        secret first and gets PAGES_READY once the target's CRIU has it.
        """
        if not use:
            return None
        url = f"http://{to}/v1/migrations/pages?session={session.sid.hex()}&into={into}"
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            # Generous: this runs before the freeze (a loaded target answers slowly, and
            # giving up here only means the pages go packed).
            async with asyncio.timeout(STALL_TIMEOUT):
                async with http.post(url) as resp:
                    if resp.status != 200:
                        raise OSError((await resp.text()).strip())
                    offer = await resp.json()
                port, secret = int(offer["port"]), bytes.fromhex(offer["secret"])
                host = to.rsplit(":", 1)[0].strip("[]")
                family, kind, proto, _name, address = (
                    await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                )[0]
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
                await loop.sock_sendall(sock, secret)
                if await loop.sock_recv(sock, 1) != PAGES_READY:
                    raise OSError("its page server did not take the connection")
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError, TypeError) as exc:
            if sock is not None:
                sock.close()
            log.info("pages of %s go packed (%s): %s", session.program, into, exc or "timeout")
            return None
        sock.setblocking(True)  # CRIU reads and writes it as a blocking socket
        _bound_stalls(sock)
        return sock

    async def _check(self, http: aiohttp.ClientSession, to: str, tree: list[int]) -> None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                async with http.post(f"http://{to}/v1/migrations/check", json={"pids": tree}) as r:
                    if r.status != 200:
                        raise MigrationRefused(f"{to} refused: {(await r.text()).strip()}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise MigrationRefused(f"{to} cannot be reached: {exc or 'timeout'}") from None

    async def _precopy(
        self,
        http: aiohttp.ClientSession,
        criu: C.Criu,
        session: Session,
        to: str,
        base: str,
        pages: bool,
    ) -> tuple[list[int], float]:
        """Pre-dump rounds, each sent to the target while the program runs on.

        Stops by `criu.keep_copying` (few rounds; the dirty set must keep
        shrinking) or when half the ticket's life is spent.  (bytes per round,
        ms the rounds held the program stopped in all.)
        """
        written: list[int] = []
        held = 0.0
        deadline = time.monotonic() + TICKET_TTL / 2
        while not written or (C.keep_copying(written) and time.monotonic() < deadline):
            k = len(written)
            directory = os.path.join(base, f"pre{k}")
            os.mkdir(directory)
            ps = await self._pages(http, to, session, f"pre{k}", pages)
            try:
                took, size = await self.ckpt.predump(
                    criu,
                    session,
                    directory,
                    None if k == 0 else f"../pre{k - 1}",
                    ps_socket=None if ps is None else ps.fileno(),
                )
            except (C.CheckpointError, OSError) as exc:  # the rounds sent so far still count
                log.warning("pre-copy of %s stopped at round %d: %s", session.program, k, exc)
                self.precopy_error = f"round {k}: {exc}"
                break
            finally:
                if ps is not None:
                    ps.close()
            held += took
            url = (
                f"http://{to}/v1/migrations/round?session={session.sid.hex()}&round={k}"
                f"&pages={int(ps is not None)}"
            )
            answer, _ = await self._send(http, url, None, directory)
            served = answer.get("pages") if ps is not None else size
            written.append(served if isinstance(served, int) else size)
        return written, held

    async def _move(
        self,
        http: aiohttp.ClientSession,
        criu: C.Criu,
        session: Session,
        to: str,
        instance: str,
        precopy: bool,
        pages: bool,
    ) -> dict[str, Any]:
        base = tempfile.mkdtemp(prefix=f"{self.prefix}migrate-", dir=scratch())
        rounds: list[int] = []
        precopy_ms = held_ms = 0.0
        self.precopy_error = ""
        pids: tuple[int, ...] = ()
        ps: socket.socket | None = None
        try:
            if precopy:
                copying = time.perf_counter()
                rounds, held_ms = await self._precopy(http, criu, session, to, base, pages)
                precopy_ms = (time.perf_counter() - copying) * 1000
            directory = os.path.join(base, "final")
            os.mkdir(directory)
            ps = await self._pages(http, to, session, "final", pages)  # before the freeze
            session.migrating = True
            started = time.perf_counter()
            pids = await self.ckpt.detach(session)
            detach_ms = (time.perf_counter() - started) * 1000
            self._drain(session)
            pipes = {
                "outs": {fd: _key_of(r) for fd, r in session.outs.items()},
                "ins": {fd: _key_of(w) for fd, w in session.ins.items()},
            }
            parent = f"../pre{len(rounds) - 1}" if rounds else None
            fd = None if ps is None else ps.fileno()
            try:
                dump_ms = await self.ckpt.dump(
                    criu, session, pids, directory, parent, ps_socket=fd, publish=True
                )
            except C.CriuFailed as exc:
                if ps is None:
                    raise
                raise MigrationRefused(f"dump into the page server of {to} failed: {exc}") from None
            salt = secrets.token_hex(8)
            key = moved_key(session.key, instance, salt)
            meta = describe(session, pids, pipes, key, session.outbox.next_seq + 1)
            meta["rounds"] = len(rounds)
            meta["pages"] = ps is not None
            sending = time.perf_counter()
            answer, (raw, packed) = await self._send(
                http, f"http://{to}/v1/migrations", meta, directory
            )
            transfer_ms = (time.perf_counter() - sending) * 1000
            committing = time.perf_counter()
            await self._commit(http, to, session.sid.hex())
            commit_ms = (time.perf_counter() - committing) * 1000
        except BaseException:
            if pids and session.trace_sock is None:
                with contextlib.suppress(Exception):
                    self.ckpt.adopt(session, pids)  # the program runs on here
            if session.migrating:
                self._resume_here(session)
            raise
        finally:
            if ps is not None:
                ps.close()
            shutil.rmtree(base, ignore_errors=True)
        # The target runs it: ours, stopped all along, goes; the deputy follows.
        frozen = (time.perf_counter() - started) * 1000
        self.service.by_pid.pop(session.pid, None)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        session.moved = True
        session.migrating = False
        session.send(
            P.MOVED,
            0,
            P.unpairs(
                {b"addr": to.encode(), b"instance": instance.encode(), b"salt": salt.encode()}
            ),
        )
        result = {
            "from": self.instance,
            "to": instance,
            "pid": session.pid,
            "freeze_ms": round(frozen, 1),
            # The freeze, phase by phase (docs/CHECKPOINT.md, "Where the time goes").
            "detach_ms": round(detach_ms, 1),  # the tracer stops and lets go of the tree
            "dump_ms": round(dump_ms, 1),  # criu dump (the last pre-copy round's parent)
            "transfer_ms": round(transfer_ms, 1),  # pack, send, unpack, restore
            "take_ms": answer.get("take_ms", 0),  # the target: receive and unpack
            "restore_ms": answer.get("restore_ms", 0),  # the target: criu restore
            "commit_ms": round(commit_ms, 1),  # the target's tracer adopts and continues it
            "zstd_ms": round(sum(self.zstd_s) * 1000, 1),  # of transfer_ms: compressing
            "image_bytes": raw + int(answer.get("pages", 0)),
            "zstd_bytes": packed,  # of the images that went packed (not the page server's)
            "page_server": ps is not None,
            "precopy_rounds": rounds,  # bytes of pages each pre-dump round sent
            "precopy_ms": round(precopy_ms, 1),  # the rounds, the program running between
            "precopy_held_ms": round(held_ms, 1),
            "precopy_error": self.precopy_error,  # why pre-copy stopped early, if it did
        }
        log.info("migrated %s: %s", session.program, result)
        # For the agent's other services (the OSS link, telemetry), as a tracer record would be.
        self.service.hooks.trace_message(
            session,
            {
                b"op": b"migrated",
                b"pid": str(session.pid).encode(),
                b"from": self.instance.encode(),
                b"to": instance.encode(),
                b"freeze_ms": f"{frozen:.1f}".encode(),
            },
        )
        return result

    def _drain(self, session: Session) -> None:
        """Send the deputy what the stopped program wrote; stop reading its pipes here."""
        for fd, r in list(session.outs.items()):
            with contextlib.suppress(ValueError, OSError):
                session.loop.remove_reader(r)
            with contextlib.suppress(OSError):
                while data := os.read(r, P.CHUNK):
                    session.send(P.DATA, fd, data)
        session.reading = False
        if session._watch is not None:
            session._watch.cancel()
            session._watch = None

    def _resume_here(self, session: Session) -> None:
        """After a failed attempt: read the pipes again; the deputy reconnects and replays."""
        session.migrating = False
        session.reading = False
        session._flow()
        if session.unwanted and session._watch is None:
            session._watch_inputs(0.001)
        if session.proto is not None:
            session.proto.close()  # frames held back meanwhile come again on its resume

    async def _send(
        self,
        http: aiohttp.ClientSession,
        url: str,
        meta: dict[str, Any] | None,
        directory: str,
    ) -> tuple[dict[str, Any], tuple[int, int]]:
        """POST the description (if any) and the images, packed while they are sent.

        (answer, sizes).  A target that stops taking bytes for STALL_TIMEOUT
        (a VM gone: no reset ever comes) fails it, as does one that does not
        answer within RESTORE_WAIT once it has everything.
        """
        head = b"" if meta is None else json.dumps(meta).encode()
        r, w = _pipe()
        self.zstd_s = []
        packer = asyncio.ensure_future(asyncio.to_thread(pack, directory, w, self.zstd_s))
        loop = asyncio.get_running_loop()
        to = url.split("/")[2]

        try:
            async with asyncio.timeout(STALL_TIMEOUT) as watch:

                async def body() -> AsyncIterator[bytes]:
                    if meta is not None:
                        yield struct.pack(">I", len(head)) + head
                    while chunk := await asyncio.to_thread(_read_up_to, r, CHUNK):
                        watch.reschedule(loop.time() + STALL_TIMEOUT)
                        yield chunk
                    watch.reschedule(loop.time() + RESTORE_WAIT)

                async with http.post(url, data=body()) as resp:
                    text = await resp.text()
                    if resp.status != 200:
                        raise MigrationRefused(f"{to} did not take it: {text.strip()}")
                    answer: dict[str, Any] = json.loads(text)
                    return answer, await packer
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise MigrationRefused(f"{to} lost during the transfer: {exc or 'timeout'}") from None
        finally:
            os.close(r)  # a packer still writing gets EPIPE and ends
            with contextlib.suppress(Exception):
                await packer

    async def _commit(self, http: aiohttp.ClientSession, to: str, sid: str) -> None:
        """Tell the target to run its copy; return once it does (MigrationRefused otherwise).

        Our copy stays stopped meanwhile.  A target that says no, or stays silent
        for COMMIT_WINDOW (by then it has dropped its held copy, HOLD_TIMEOUT),
        leaves the program to us.
        """
        deadline = asyncio.get_running_loop().time() + COMMIT_WINDOW
        url = f"http://{to}/v1/migrations/commit"
        while True:
            try:
                async with asyncio.timeout(CHECK_TIMEOUT):
                    async with http.post(url, json={"session": sid}) as resp:
                        if resp.status == 200:
                            return
                        text = (await resp.text()).strip()
                raise MigrationRefused(f"{to} did not run it: {text}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise MigrationRefused(f"{to} never confirmed: {exc or 'timeout'}") from None
            await asyncio.sleep(0.2)

    # -- the target ------------------------------------------------------------------------

    def check(self, ticket: str, pids: Any) -> None:
        """The source's question before it freezes anything; MigrationRefused if not."""
        self.tickets.check(ticket, burn=False)
        if not isinstance(pids, list) or not pids or not all(isinstance(p, int) for p in pids):
            raise MigrationRefused('expected {"pids": [numbers]}')
        taken = busy(pids)
        if taken:
            raise MigrationRefused(f"pids {taken} are in use on {self.instance}")

    def _in_progress(self, ticket: str) -> bool:
        """Whether pre-copy rounds of the move `ticket` started are staged here."""
        try:
            staged = self.staged.get(bytes.fromhex(self.tickets.authentic(ticket)))
        except ValueError:
            return False
        return staged is not None and hmac.compare_digest(staged.ticket, ticket)

    async def receive(self, ticket: str, stream: aiohttp.StreamReader) -> dict[str, Any]:
        """Take a moved session: images in, tree restored and adopted; the new pid."""
        sid_hex = self.tickets.check(ticket, burn=True, in_progress=self._in_progress(ticket))
        criu = await self.ckpt.criu()
        size = struct.unpack(">I", await stream.readexactly(4))[0]
        if size > MAX_META:
            raise MigrationRefused("session description too large")
        try:
            meta = Description(json.loads(await stream.readexactly(size)))
        except ValueError:
            raise MigrationRefused("session description is not JSON") from None
        if meta.sid.hex() != sid_hex:
            raise MigrationRefused("the ticket is for another session")
        here = self.service.sessions.get(meta.sid)
        if here is not None and not here.moved:
            raise MigrationRefused("that session is already here")
        if here is not None:  # it left from here before and comes back: drop the husk
            if here._abandon is not None:
                here._abandon.cancel()
            self.service.forget(here)
        staged = self.staged.pop(meta.sid, None)
        if staged is not None:
            staged.timer.cancel()
        served = staged.serving.pop("final", None) if staged is not None else None
        try:
            if meta.rounds and (staged is None or staged.rounds != meta.rounds):
                raise MigrationRefused("the pre-copy rounds of that session are not all here")
            if meta.pages and served is None:
                raise MigrationRefused("no page server took the pages of that session here")
        except MigrationRefused:
            if staged is not None:
                self._drop_staged(staged)
            raise
        if staged is not None and not meta.rounds and not meta.pages:
            self._drop_staged(staged)
            staged = None
        if staged is not None:
            base = staged.base
        else:
            base = tempfile.mkdtemp(prefix=f"{self.prefix}restore-", dir=scratch())
        directory = os.path.join(base, "final")
        _images_dir(directory, meta.rounds)
        try:
            taking = time.perf_counter()
            await self._take(stream, directory)
            if meta.pages:
                assert served is not None
                await self._served(served, directory)
            took = (time.perf_counter() - taking) * 1000
            return {
                **await self._restore(criu, meta, directory, ticket),
                "take_ms": round(took, 1),
                "pages": _pages_bytes(directory) if meta.pages else 0,
            }
        finally:
            if served is not None:
                served.cancel()
            if staged is not None:
                self._drop_staged(staged)
            shutil.rmtree(base, ignore_errors=True)

    async def receive_round(
        self, ticket: str, sid_hex: Any, k: Any, stream: aiohttp.StreamReader, pages: bool = False
    ) -> dict[str, Any]:
        """Take pre-copy round `k` of a session's move (its pages, kept until the final dump)."""
        going = self._in_progress(ticket)
        if self.tickets.check(ticket, burn=False, in_progress=going) != sid_hex or not isinstance(
            k, int
        ):
            raise MigrationRefused("the ticket is for another session")
        try:
            sid = bytes.fromhex(sid_hex)
        except ValueError:
            raise MigrationRefused("the ticket is for another session") from None
        if sid not in self.staged and k != 0:
            raise MigrationRefused(f"pre-copy round {k} without round 0")
        staged = self._staging(sid_hex, ticket)
        if k != staged.rounds or staged.busy:
            raise MigrationRefused(f"pre-copy round {k} out of order")
        if k >= C.PRECOPY_ROUNDS:
            raise MigrationRefused(f"more than {C.PRECOPY_ROUNDS} pre-copy rounds")
        directory = os.path.join(staged.base, f"pre{k}")
        served = staged.serving.pop(f"pre{k}", None)
        if pages and served is None:
            self._unstage(sid)
            raise MigrationRefused(f"no page server took the pages of round {k} here")
        staged.busy = True
        try:
            _images_dir(directory, k)
            size = await self._take(stream, directory)
            if served is not None and pages:
                await self._served(served, directory)
        except BaseException:
            self._unstage(sid)
            raise
        finally:
            staged.busy = False
            if served is not None:
                served.cancel()
        staged.rounds += 1
        staged.timer.cancel()  # the staging lives STAGED_TTL from its last round
        staged.timer = asyncio.get_running_loop().call_later(STAGED_TTL, self._unstage, sid)
        return {"round": k, "bytes": size, "pages": _pages_bytes(directory)}

    async def serve_pages(self, ticket: str, sid_hex: Any, into: Any, host: str) -> dict[str, Any]:
        """Run a page server for the move's next images directory (`pre<k>` or `final`).

        The source connects to the port answered and sends the secret first;
        one such connection within PAGES_ACCEPT gets PAGES_READY and is handed
        to `criu page-server`, which writes the pages the source's criu dump or
        pre-dump sends into that directory (its `parent` the round before).
        The round's or the move's own POST then waits for it to end.
        """
        going = self._in_progress(ticket)
        if not isinstance(sid_hex, str) or not isinstance(into, str):
            raise MigrationRefused("expected ?session=SID&into=pre<k>|final")
        if self.tickets.check(ticket, burn=False, in_progress=going) != sid_hex:
            raise MigrationRefused("the ticket is for another session")
        criu = await self.ckpt.criu()
        staged = self._staging(sid_hex, ticket)
        k = staged.rounds
        if into == "final":
            parent = k
        elif into == f"pre{k}" and k < C.PRECOPY_ROUNDS:
            parent = k
        else:
            raise MigrationRefused(f"no page server for {into!r} now (round {k} is next)")
        if into in staged.serving or staged.busy:
            raise MigrationRefused(f"a page server for {into} runs already")
        directory = os.path.join(staged.base, into)
        _images_dir(directory, parent)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.bind((host, 0))
            listener.listen(1)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        secret = secrets.token_bytes(16)
        served = asyncio.ensure_future(self._page_server(criu, listener, secret, directory))
        served.add_done_callback(_retrieved)  # a page server nobody waited for is no error
        staged.serving[into] = served
        return {"port": listener.getsockname()[1], "secret": secret.hex()}

    def _staging(self, sid_hex: str, ticket: str) -> Staged:
        """The staging of the move of session `sid_hex` (made for its first round or pages)."""
        try:
            sid = bytes.fromhex(sid_hex)
        except ValueError:
            raise MigrationRefused("the ticket is for another session") from None
        staged = self.staged.get(sid)
        if staged is None:
            if len(self.staged) >= MAX_STAGED:
                raise MigrationRefused(f"{self.instance} is taking too many migrations")
            base = tempfile.mkdtemp(prefix=f"{self.prefix}restore-", dir=scratch())
            timer = asyncio.get_running_loop().call_later(STAGED_TTL, self._unstage, sid)
            staged = self.staged[sid] = Staged(base, 0, timer, ticket)
        elif not hmac.compare_digest(staged.ticket, ticket):
            raise MigrationRefused("those pre-copy rounds came with another ticket")
        return staged

    async def _page_server(
        self, criu: C.Criu, listener: socket.socket, secret: bytes, directory: str
    ) -> int:
        """Take the source's connection (the right secret first), run criu page-server on it."""
        loop = asyncio.get_running_loop()
        conn: socket.socket | None = None
        try:
            async with asyncio.timeout(PAGES_ACCEPT):
                while conn is None:
                    conn, _peer = await loop.sock_accept(listener)
                    got = b""
                    with contextlib.suppress(OSError, TimeoutError):
                        async with asyncio.timeout(PAGES_SECRET):  # one silent peer blocks not
                            while len(got) < len(secret):
                                piece = await loop.sock_recv(conn, len(secret) - len(got))
                                if not piece:
                                    break
                                got += piece
                    if not hmac.compare_digest(got, secret):
                        conn.close()
                        conn = None
        except TimeoutError:
            raise MigrationRefused(
                f"the source did not reach its page server within {PAGES_ACCEPT:.0f}s"
            ) from None
        finally:
            listener.close()
        try:
            await loop.sock_sendall(conn, PAGES_READY)
            conn.setblocking(True)  # CRIU's, from here on
            _bound_stalls(conn)
            return await self.ckpt.run(
                C.page_server_argv(criu.path, directory, conn.fileno()),
                os.path.join(directory, "page-server.out"),
                (conn.fileno(),),
            )
        finally:
            conn.close()

    async def _served(self, served: asyncio.Task[int], directory: str) -> None:
        """Until the page server of `directory` has ended; MigrationRefused unless it went well."""
        try:
            async with asyncio.timeout(PAGES_WAIT):
                code = await served
        except TimeoutError:
            raise MigrationRefused(
                f"the page server did not end within {PAGES_WAIT:.0f}s"
            ) from None
        except C.CheckpointError as exc:
            raise MigrationRefused(str(exc)) from None
        if code != 0:
            said = C.first_error(_read_tail(os.path.join(directory, "page-server.log")))
            raise MigrationRefused(f"criu page-server failed: {said}")

    def _unstage(self, sid: bytes) -> None:
        staged = self.staged.pop(sid, None)
        if staged is not None:
            self._drop_staged(staged)

    @staticmethod
    def _drop_staged(staged: Staged) -> None:
        staged.timer.cancel()
        for task in staged.serving.values():
            task.cancel()
        staged.serving.clear()
        shutil.rmtree(staged.base, ignore_errors=True)

    async def _take(self, stream: aiohttp.StreamReader, directory: str) -> int:
        """Unpack the images of `stream` into `directory` as they arrive; raw bytes."""
        r, w = _pipe()
        unpacker = asyncio.ensure_future(asyncio.to_thread(unpack, r, directory))
        try:
            received = 0
            try:
                # One thread hop per CHUNK, however small the pieces the socket gives.
                pending: list[bytes] = []
                held = 0
                while True:
                    piece = await stream.readany()
                    if piece:
                        pending.append(piece)
                        held += len(piece)
                        received += len(piece)
                        if received > MAX_IMAGES:
                            raise MigrationRefused("the images are larger than this instance takes")
                    if pending and (held >= CHUNK or not piece):
                        await asyncio.to_thread(_write_all, w, b"".join(pending))
                        pending, held = [], 0
                    if not piece:
                        break
            except BrokenPipeError:
                pass  # the unpacker stopped early: its error says why
            finally:
                os.close(w)
            try:
                return await unpacker
            except (zstandard.ZstdError, OSError) as exc:
                raise MigrationRefused(f"the images do not unpack: {exc}") from None
        finally:
            if not unpacker.done():
                unpacker.cancel()

    async def _restore(
        self, criu: C.Criu, meta: Description, directory: str, ticket: str
    ) -> dict[str, Any]:
        taken = busy(meta.pids)
        if taken:
            raise MigrationRefused(f"pids {taken} are in use on {self.instance}")
        session = Session(self.service, meta.sid, meta.request, meta.program)
        ends: list[tuple[int, str]] = []
        try:
            for fd, key in meta.outs.items():
                r, w = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(r, False)
                session.outs[fd] = r
                ends.append((w, key))
            for fd, key in meta.ins.items():
                r, w = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(w, False)
                session.ins[fd] = w
                session.in_buf[fd] = collections.deque()
                if fd in meta.unwanted:
                    session.unwanted[os.fstat(r).st_ino] = fd
                elif fd in meta.asked:
                    session.asked[fd] = os.fstat(r).st_ino
                ends.append((r, key))
            reserve_pids(meta.pids)
            restore_ms = await self.ckpt.restore(criu, directory, ends)
        except BaseException:
            session.close_fds()
            raise
        finally:
            for fd, _key in ends:
                os.close(fd)
        session.pid = meta.pid
        session.pid_base = meta.pid_base
        session.program_id = meta.program_id
        session.view = meta.view
        session.nonce = meta.nonce
        session.key = meta.key
        session.outbox.next_seq = meta.out_seq
        session.inbox.last = meta.in_last
        service = self.service
        service.sessions[session.sid] = session
        service.by_pid[session.pid] = session
        service.by_nonce[session.nonce] = session
        service.moved[session.nonce] = session.key
        # Held stopped and untraced until the source, whose copy is stopped too,
        # commits: whatever gets lost between us, the program never runs twice.
        timer = session.loop.call_later(HOLD_TIMEOUT, self._abort, session.sid)
        self.held[session.sid] = Held(ticket, session, meta.pids, timer)
        return {"pid": session.pid, "restore_ms": round(restore_ms, 1)}

    def commit(self, ticket: str, sid: Any) -> None:
        """The source's go: a fresh tracer adopts the held tree and continues it."""
        if not isinstance(sid, str) or self.tickets.authentic(ticket) != sid:
            raise MigrationRefused("the ticket is for another session")
        try:
            key = bytes.fromhex(sid)
        except ValueError:
            key = b""
        held = self.held.get(key)
        if held is None:
            if key and hmac.compare_digest(self.committed.get(key, ""), ticket):
                return  # a repeated commit (its answer was lost): it runs
            raise MigrationRefused(f"no migration of that session is waiting on {self.instance}")
        if not hmac.compare_digest(held.ticket, ticket):
            raise MigrationRefused("not the ticket of that migration")
        del self.held[key]
        held.timer.cancel()
        session = held.session
        self.ckpt.adopt(session, held.pids)  # its tracer continues it
        self.service.hooks.started(session)  # telemetry, limits: it runs here now
        for fd, r in session.outs.items():
            session.loop.add_reader(r, session._readable, fd, r)
        session.reading = True
        if session.unwanted:
            session._watch_inputs(0.001)
        session._abandon = session.loop.call_later(
            self.service.config.reconnect_window, self.service.abandon, session
        )
        self.committed[key] = ticket
        while len(self.committed) > MAX_COMMITTED:
            del self.committed[next(iter(self.committed))]

    def _abort(self, sid: bytes) -> None:
        """No commit came: drop the held copy (the source runs the program on)."""
        held = self.held.pop(sid, None)
        if held is None:
            return
        log.warning("no commit for %s within %.0fs: dropped", held.session.program, HOLD_TIMEOUT)
        self.service.by_pid.pop(held.session.pid, None)
        for pid in held.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        if self.service.moved.get(held.session.nonce) == held.session.key:
            del self.service.moved[held.session.nonce]
        self.service.forget(held.session)


def _pipe() -> tuple[int, int]:
    """A pipe as large as CHUNK allows (fewer wake-ups between packer and sender)."""
    r, w = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)
    return r, w


def _read_up_to(fd: int, n: int) -> bytes:
    """Up to `n` bytes from `fd`, fewer only at EOF."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        part = os.read(fd, n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _bound_stalls(sock: socket.socket) -> None:
    """Writes to a peer that stopped answering fail after STALL_TIMEOUT (a VM gone sends
    no reset): CRIU's dump into a dead target's page server ends, and the program runs on."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(STALL_TIMEOUT * 1000))


def _retrieved(task: asyncio.Future[int]) -> None:
    if not task.cancelled():
        task.exception()


def _images_dir(directory: str, parent: int) -> None:
    """Make an images directory (if its page server has not) linked to `pre<parent - 1>`."""
    if os.path.isdir(directory):
        return
    os.mkdir(directory)
    if parent:
        os.symlink(f"../pre{parent - 1}", os.path.join(directory, "parent"))


def _pages_bytes(directory: str) -> int:
    """Bytes of the pages in `directory` (not its parents')."""
    return sum(
        os.path.getsize(os.path.join(directory, n))
        for n in os.listdir(directory)
        if n.startswith("pages-") and n.endswith(".img")
    )


def _read_tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-65536:]
    except OSError:
        return ""


def _key_of(fd: int) -> str:
    """CRIU's key of the pipe our descriptor `fd` is an end of."""
    return f"pipe:[{os.fstat(fd).st_ino}]"
