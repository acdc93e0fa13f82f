"""The networked tier: an SFTP server (asyncssh) that serves a program's volumes.

Started and stopped by the run that owns the program (`StorageServer`), beside
the user's files: volume `vN` is the real directory behind the Nth path the
program declared (`--volume`, its working directory), so what the program
writes lands in the user's directory as it would have natively.  Instances
reach it over a socket (`unix:PATH` for local instances, `HOST:PORT` for VMs)
through their `dcpfs` (vmagent.storage.dcpfs), which authenticates with the
run's key before anything else is read: SSH authentication comes first, bounded
by `LOGIN_TIMEOUT`; sessions other than the `sftp` subsystem and every kind
of forwarding are refused; at most `MAX_CONNECTIONS` clients at once.

Besides `/vN/...`, one directory of its own, `/.dcp/`, takes what instances
report (heat, moves) and holds `usage.json`, which instances read to refuse
a write past a limit before it is made.  The server itself measures the
bytes the program keeps on the volume (files it wrote, as they are now) and
refuses a write past the limits (`SFTPQuotaExceeded`, `SFTPNoSpaceOnFilesystem`).
A clock integrates the bytes per tier into GiB-seconds (`oss.billing.storage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncssh

from oss.billing.storage import PRICES, Meter
from oss.storage import StorageError, StorageStartError
from oss.storage.locks import EOF_END, LockTable, Owner, Range
from oss.storage.policy import StorageLimits, StorageUsage, Tier, admit

log = logging.getLogger(__name__)

LOGIN_TIMEOUT = 10.0  # seconds a client has to authenticate
MAX_CONNECTIONS = 64
USER = "dcp"
TICK = 1.0  # seconds between billing samples and state files
REPORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_REPORT = 4 << 20  # bytes of one report file
LOCK_SUBSYSTEM = "dcp-lock"  # file locks (oss.storage.locks), on an authenticated connection
MAX_LOCK_LINE = 4096  # bytes of one lock request
MAX_LOCK_CALLS = 1024  # lock calls of one connection in flight (waiting) at once


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """What one program's storage server serves (validated at the edge)."""

    name: str  # the program's storage name (state directory, `storage ls NAME`)
    volumes: tuple[str, ...]  # real directories; volume i is served as /v{i}
    state_dir: Path  # reports, moves, usage, billing
    key: str  # the run's secret (SSH password of user `dcp`); never logged
    limits: StorageLimits = StorageLimits()
    login_timeout: float = LOGIN_TIMEOUT
    prices: Mapping[str, int] = field(
        default_factory=lambda: dict(PRICES)
    )  # micro-units per GiB-second


@dataclass(slots=True)
class _Accounts:
    """What the program keeps on the volume (bytes of files it wrote, by real path)."""

    sizes: dict[bytes, int] = field(default_factory=dict)
    changed: bool = True

    def total(self) -> int:
        return sum(self.sizes.values())

    def measure(self, real: bytes) -> None:
        try:
            self.sizes[real] = os.stat(real).st_size
        except OSError:
            self.sizes.pop(real, None)
        self.changed = True


class _Auth(asyncssh.SSHServer):
    """Password authentication with the run's key, and nothing else.

    An instance's dcpfs logs in as `dcp@INSTANCE` (plain `dcp`: a client that names
    none): the name is what a fence (`StorageServer.fence`) closes and refuses."""

    def __init__(self, owner: StorageServer) -> None:
        self.owner = owner
        self.conn_id = 0
        self.conn: asyncssh.SSHServerConnection | None = None
        self.instance = ""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn_id = id(conn)
        self.conn = conn
        self.owner.connections += 1
        if self.owner.connections > MAX_CONNECTIONS:
            conn.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connections -= 1
        self.owner.by_instance.get(self.instance, set()).discard(self)
        # The lease of an instance's locks is its connection (keepalives end a lost one).
        self.owner.locks.drop_connection(self.conn_id)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def validate_password(self, username: str, password: str) -> bool:
        good = hmac.compare_digest(password.encode(), self.owner.config.key.encode())
        user, _, instance = username.partition("@")
        if not good or user != USER or (instance and not REPORT_NAME.match(instance)):
            return False
        if instance in self.owner.fenced:
            log.warning("instance %s is fenced (declared lost): its login is refused", instance)
            return False
        self.instance = instance
        if instance:
            self.owner.by_instance.setdefault(instance, set()).add(self)
        return True


class _VolumeSftp(asyncssh.SFTPServer):
    """SFTP over the program's volumes: `/vN/rel` is `volumes[N]/rel`; `/.dcp/NAME` is state."""

    def __init__(self, chan: asyncssh.SSHServerChannel, owner: StorageServer) -> None:
        super().__init__(chan)
        self.owner = owner

    def map_path(self, path: bytes) -> bytes:
        norm = posixpath.normpath(b"/" + path.lstrip(b"/"))
        parts = norm.split(b"/", 2)
        head = parts[1] if len(parts) > 1 else b""
        rest = parts[2] if len(parts) > 2 else b""
        if not head:  # the root ("/vN/.." too): an empty directory of the server's own
            return os.path.join(bytes(self.owner.config.state_dir), b"root")
        if head == b".dcp":
            if rest and not REPORT_NAME.match(rest.decode("ascii", "replace")):
                raise asyncssh.SFTPPermissionDenied("no such state file")
            return (
                os.path.join(bytes(self.owner.config.state_dir), rest)
                if rest
                else bytes(self.owner.config.state_dir)
            )
        match = re.fullmatch(rb"v(\d{1,3})", head)
        if match is None or int(match[1]) >= len(self.owner.config.volumes):
            raise asyncssh.SFTPNoSuchFile("outside the program's volumes")
        root = os.fsencode(self.owner.config.volumes[int(match[1])])
        return os.path.join(root, rest) if rest else root

    def _volume_real(self, path: bytes) -> bytes | None:
        real = self.map_path(path)
        return None if real.startswith(bytes(self.owner.config.state_dir)) else real

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        self._before_open(path)
        handle = super().open(path, pflags, attrs)
        writing = bool(pflags & (asyncssh.FXF_WRITE | asyncssh.FXF_APPEND))
        return self._opened(path, handle, writing)

    def open56(
        self, path: bytes, desired_access: int, flags: int, attrs: asyncssh.SFTPAttrs
    ) -> object:
        self._before_open(path)
        handle = super().open56(path, desired_access, flags, attrs)
        writing = bool(desired_access & (asyncssh.ACE4_WRITE_DATA | asyncssh.ACE4_APPEND_DATA))
        return self._opened(path, handle, writing)

    def _before_open(self, path: bytes) -> None:
        if path.rstrip(b"/").endswith(b"/.dcp/usage.json"):
            self.owner.write_usage()  # read live: a writer elsewhere just changed it

    def _opened(self, path: bytes, handle: object, writing: bool) -> object:
        real = self._volume_real(path)
        if real is None:
            self.owner.state_open(handle)
        elif writing:
            self.owner.handles[id(handle)] = real
            self.owner.accounts.measure(real)
        return handle

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        real = self.owner.handles.get(id(file_obj))
        if real is not None:
            current = os.fstat(file_obj.fileno()).st_size  # type: ignore[attr-defined]
            growth = max(0, offset + len(data) - current)
            refusal = admit(growth, self.owner.usage(), self.owner.config.limits)
            if refusal is not None:
                cls = (
                    asyncssh.SFTPQuotaExceeded
                    if refusal.errno == 122
                    else asyncssh.SFTPNoSpaceOnFilesystem
                )
                raise cls(refusal.reason)
        elif self.owner.state_handle(file_obj) and offset + len(data) > MAX_REPORT:
            raise asyncssh.SFTPFailure("report too large")
        result = super().write(file_obj, offset, data)
        if real is not None:
            self.owner.accounts.sizes[real] = max(
                self.owner.accounts.sizes.get(real, 0), offset + len(data)
            )
            self.owner.accounts.changed = True
        return cast(int, result)  # the local file system's write: never awaitable

    def close(self, file_obj: object) -> None:
        super().close(file_obj)
        real = self.owner.handles.pop(id(file_obj), None)
        self.owner.state_close(file_obj)
        if real is not None:
            self.owner.accounts.measure(real)

    def remove(self, path: bytes) -> None:
        real = self._volume_real(path)
        super().remove(path)
        if real is not None:
            self.owner.accounts.measure(real)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = self._volume_real(oldpath), self._volume_real(newpath)
        super().posix_rename(oldpath, newpath)
        for real in (old, new):
            if real is not None and real in self.owner.accounts.sizes or real == new:
                self.owner.accounts.measure(real)  # type: ignore[arg-type]

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        self.posix_rename(oldpath, newpath)

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        # The link stores what the program wrote (a path of its view), as natively;
        # asyncssh's default would rewrite an absolute target into the volume.
        os.symlink(oldpath, self.map_path(newpath))


class StorageServer:
    """One program's networked volume: the SFTP server on a thread of its own."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        self.connections = 0
        self.handles: dict[int, bytes] = {}
        self._state_handles: set[int] = set()
        self.accounts = _Accounts()
        self.meter = Meter()
        self.address = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._sock: socket.socket | None = None
        self.host_key = ""
        self.locks = LockTable()
        # Instances declared lost (`fence`): their connections are closed and their
        # logins refused, so a copy left running there writes nothing more.
        self.fenced: set[str] = set()
        self.by_instance: dict[str, set[_Auth]] = {}

    # -- bookkeeping used by the SFTP handlers (on the server's loop) --------

    def state_open(self, handle: object) -> None:
        self._state_handles.add(id(handle))

    def state_handle(self, handle: object) -> bool:
        return id(handle) in self._state_handles

    def state_close(self, handle: object) -> None:
        self._state_handles.discard(id(handle))

    def usage(self) -> StorageUsage:
        """Measured bytes; the program's are its user's and account's too on a private OSS."""
        total = self.accounts.total()
        return StorageUsage(account=total, user=total, program=total, volume=total)

    def fence(self, instance: str) -> None:
        """`instance` was declared lost: close its connections, refuse its logins from now
        on (any thread).  What it wrote before is kept; nothing after reaches the volume."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.fenced.add(instance)
            return
        loop.call_soon_threadsafe(self._fence, instance)

    def _fence(self, instance: str) -> None:
        self.fenced.add(instance)
        for auth in list(self.by_instance.pop(instance, set())):
            if auth.conn is not None:
                auth.conn.abort()  # now: nothing it still sends is applied
        log.warning("instance %s fenced: its storage connections are closed", instance)

    # -- life cycle ----------------------------------------------------------

    def start(self, address: str, timeout: float = 10.0) -> str:
        """Listen at `address` (`unix:PATH` or `HOST:PORT`, port 0: any); the bound address."""
        self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.config.state_dir / "root").mkdir(exist_ok=True, mode=0o500)
        self._sock = _bind(address)
        self._thread = threading.Thread(target=self._run, name="dcp-storage", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._failure is not None:
            self.stop()
            raise StorageStartError(f"the storage server did not start: {self._failure}")
        return self.address

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(); the thread ends
            self._failure = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        assert self._sock is not None
        self._stop = asyncio.Event()
        key = asyncssh.generate_private_key("ssh-ed25519")
        acceptor = await asyncssh.listen(
            sock=self._sock,
            server_host_keys=[key],
            server_factory=lambda: _Auth(self),
            sftp_factory=lambda chan: _VolumeSftp(chan, self),
            process_factory=self._lock_session,
            encoding=None,
            allow_scp=False,
            sftp_version=6,
            login_timeout=self.config.login_timeout,
            keepalive_interval=15,
            keepalive_count_max=3,
            agent_forwarding=False,
            x11_forwarding=False,
            line_editor=False,
        )
        self.host_key = key.export_public_key().decode()
        self.address = bound_address(self._sock)
        self._write_state()
        self._ready.set()
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), TICK)
                self._write_state()
        finally:
            acceptor.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(acceptor.wait_closed(), 5)
            self._write_state()

    async def _lock_session(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        """The `dcp-lock` subsystem: one JSON request a line, answers as they complete."""
        if process.subsystem != LOCK_SUBSYSTEM:
            process.exit(1)  # no shell, no exec: only sftp and the lock service
            return
        conn_id = id(process.channel.get_connection())
        calls: dict[int, asyncio.Task[None]] = {}
        buf = b""
        try:
            while True:
                chunk = await process.stdin.read(MAX_LOCK_LINE)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._lock_request(process, conn_id, line, calls)
                if len(buf) > MAX_LOCK_LINE:
                    break  # a line too long: the session ends
        except (asyncssh.Error, OSError, ValueError, KeyError, TypeError):
            pass  # a bad request ends the session (and its locks)
        finally:
            for task in list(calls.values()):
                task.cancel()
            self.locks.drop_connection(conn_id)
            with contextlib.suppress(Exception):
                process.exit(0)

    def _lock_request(
        self, process: asyncssh.SSHServerProcess[bytes], conn_id: int, line: bytes,
        calls: dict[int, asyncio.Task[None]],
    ) -> None:  # fmt: skip
        req = json.loads(line)
        ident = int(req["id"])
        if req["op"] == "cancel":
            task = calls.get(ident)
            if task is not None:
                task.cancel()
            return
        kind = str(req["kind"])
        if req["op"] == "drop":
            self.locks.drop_owner(Owner(conn_id, kind, int(req["owner"])))
            return
        if kind not in ("flock", "posix") or str(req["type"]) not in ("r", "w", "u"):
            raise ValueError("a bad lock request")
        start, end = int(req["start"]), int(req["end"])
        if not 0 <= start <= end <= EOF_END:
            raise ValueError("a bad lock range")
        want = Range(Owner(conn_id, kind, int(req["owner"])), str(req["type"]), start, end,
                     int(req["pid"]))  # fmt: skip
        path = str(req["path"])

        def answer(**fields: object) -> None:
            with contextlib.suppress(Exception):
                process.stdout.write(json.dumps({"id": ident, **fields}).encode() + b"\n")

        if req["op"] == "get":
            held = self.locks.conflict(path, want)
            if held is None:
                answer(errno=0, type="u")
            else:
                answer(errno=0, type=held.kind, start=held.start, end=held.end, pid=held.pid)
            return
        if len(calls) >= MAX_LOCK_CALLS or ident in calls:
            answer(errno=errno.ENOLCK)
            return

        async def run() -> None:
            try:
                answer(errno=await self.locks.set(path, want, bool(req.get("wait"))))
            except asyncio.CancelledError:
                answer(errno=errno.EINTR)
            finally:
                calls.pop(ident, None)

        calls[ident] = asyncio.get_running_loop().create_task(run())

    def stop(self) -> None:
        """Stop serving; the state files stay (for `dcp-oss storage ls`)."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        if self._sock is not None:
            self._sock.close()
            if self.address.startswith("unix:"):
                with contextlib.suppress(OSError):
                    os.unlink(self.address[5:])

    # -- state ---------------------------------------------------------------

    def held(self) -> dict[str, int]:
        """Bytes per tier now: the volume's measured bytes, the instances' reported copies."""
        held = {str(Tier.MEMORY): 0, str(Tier.DISK): 0, str(Tier.NET): self.accounts.total()}
        for report in self.reports().values():
            for tier, nbytes in report.get("held", {}).items():
                if tier in (Tier.MEMORY, Tier.DISK) and isinstance(nbytes, int):
                    held[tier] += nbytes
        return held

    def reports(self) -> dict[str, dict[str, Any]]:
        """The latest report of each instance (malformed ones are skipped)."""
        out = {}
        for path in self.config.state_dir.glob("report-*.json"):
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text())
                if isinstance(data, dict):
                    out[path.name[7:-5]] = data
        return out

    def write_usage(self) -> None:
        """`usage.json`: measured bytes and the limits (what instances check writes against)."""
        limits = self.config.limits
        usage = {
            "used": self.accounts.total(),
            "limits": {"program": limits.program, "user": limits.user,
                       "account": limits.account, "volume": limits.volume_capacity},
        }  # fmt: skip
        _write_json(self.config.state_dir / "usage.json", usage)

    def _write_state(self) -> None:
        self.write_usage()
        self.meter.sample(time.monotonic(), self.held())
        billing = {
            "gib_seconds": self.meter.gib_seconds(),
            "micros": self.meter.charges(self.config.prices),
            "prices": dict(self.config.prices),
            "held": self.held(),
        }
        _write_json(self.config.state_dir / "billing.json", billing)


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _bind(address: str) -> socket.socket:
    """A listening socket for `unix:PATH` or `HOST:PORT`."""
    if address.startswith("unix:"):
        path = address[5:]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o600)
    else:
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), int(port)))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def bound_address(sock: socket.socket) -> str:
    """The `unix:PATH` or `HOST:PORT` a listening socket is bound to."""
    name = sock.getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    return f"{name[0]}:{name[1]}"


def main() -> None:
    """`python -m oss.storage.server`: one JSON config line on stdin, then serve until EOF.

    Prints one JSON line (`address`, `host_key`) once listening.  Its stdin is
    the lifeline: the run's owner closing it (or dying) stops the server.  A
    process of its own, so the server's threads never wait on the tracer's GIL.
    """
    import sys

    logging.basicConfig(level=logging.WARNING, format="dcp-storage: %(levelname)s: %(message)s")
    try:
        raw = json.loads(sys.stdin.readline())
        lim = raw.get("limits", {})
        limits = StorageLimits(
            lim.get("account"), lim.get("user"), lim.get("program"), lim.get("volume")
        )
        config = StorageConfig(
            str(raw["name"]), tuple(str(v) for v in raw["volumes"]), Path(raw["state_dir"]),
            str(raw["key"]), limits,
        )  # fmt: skip
        address = str(raw["address"])
    except (KeyError, TypeError, ValueError) as exc:
        print(f"dcp-storage: bad configuration: {exc}", file=sys.stderr)
        sys.exit(2)
    server = StorageServer(config)
    try:
        bound = server.start(address)
    except StorageError as exc:
        print(f"dcp-storage: {exc}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"address": bound, "host_key": server.host_key}), flush=True)
    try:
        # Then one order a line: `fence INSTANCE` (declared lost); EOF stops the server.
        for line in iter(lambda: sys.stdin.buffer.readline(256), b""):
            verb, _, name = line.decode(errors="replace").strip().partition(" ")
            if verb == "fence" and REPORT_NAME.match(name):
                server.fence(name)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
