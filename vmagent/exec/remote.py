"""How a home process becomes a deputy: the command line that replaces its execve."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from vmagent.exec import protocol as P
from vmagent.exec import tickets

# The deputy runs as a file (python -I -S ignores PYTHONPATH and site-packages,
# which is what keeps it fast and immune to the program's environment).
DEPUTY_SCRIPT = str(Path(__file__).resolve().parent / "deputy.py")


def interpreter() -> bytes:
    """The real Python binary (not a shim script: a shim costs ~30 ms per exec)."""
    return os.fsencode(os.path.realpath(sys.executable))


def deputy_argv(
    agent: str,
    instance: str,
    ticket_file: str,
    path: bytes,
    argv: tuple[bytes, ...],
    reconnect_window: float | None = None,
    view: str = "",
    parent: str = "",
) -> tuple[bytes, ...]:
    """argv of the deputy standing in for `execve(path, argv, ...)` run on `instance`.

    The ticket itself is in `ticket_file` (see TicketDrop): argv is world-readable.
    `view` (hex of `View.encode`) and `parent` (`INSTANCE:PID` of this process)
    are not secret: the ticket binds the view's digest.
    """
    head: list[bytes] = [b"python3", b"-I", b"-S", os.fsencode(DEPUTY_SCRIPT)]
    head += [b"--agent", agent.encode(), b"--instance", instance.encode()]
    head += [b"--ticket-file", os.fsencode(ticket_file)]
    if reconnect_window is not None:
        head += [b"--reconnect", str(reconnect_window).encode()]
    if view:
        head += [b"--view", view.encode()]
    if parent:
        head += [b"--parent", parent.encode()]
    return (*head, b"--", *remote_exec(path, argv))


def remote_exec(path: bytes, argv: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """(path, *argv) exactly as the deputy sends it (what a ticket's digest covers).

    An empty argv is legal for execve; the deputy still needs an argv[0] slot.
    """
    return (path, *(argv or (path,)))


class TicketDrop:
    """One-shot ticket files for deputies: `<dir>/u<uid>/<random>`, mode 0600.

    The top directory (0711) is this process's; each uid gets a 0700
    subdirectory of its own, so a deputy can read and delete its ticket and
    nobody else can list, read or replace it.  `close` removes everything.
    """

    def __init__(self) -> None:
        self.dir = ""  # created on the first ticket (most coordinators never place)
        self._subdirs: dict[int, str] = {}

    def _subdir(self, uid: int, gid: int) -> str:
        if not self.dir:
            self.dir = tempfile.mkdtemp(prefix="dcp-tickets-")
            os.chmod(self.dir, 0o711)
        found = self._subdirs.get(uid)
        if found is None:
            found = os.path.join(self.dir, f"u{uid}")
            os.mkdir(found, 0o700)
            if os.geteuid() == 0 and uid != 0:
                os.chown(found, uid, gid)
            self._subdirs[uid] = found
        return found

    def put(self, ticket: str, uid: int, gid: int) -> str:
        """Write `ticket` readable by `uid` only; its path (not a secret)."""
        path = os.path.join(self._subdir(uid, gid), secrets.token_hex(16))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            if os.geteuid() == 0 and uid != 0:
                os.fchown(fd, uid, gid)
            os.write(fd, ticket.encode())
        finally:
            os.close(fd)
        return path

    def take_note(self, path: str) -> str | None:
        """Read and delete a deputy's note beside its ticket file (None if absent)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            text = os.read(fd, 4096).decode(errors="replace").strip()
        except OSError:
            text = ""
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
        return text or "a placed process lost data"

    def redirect(self, path: str, note: bytes) -> bool:
        """Leave the deputy of ticket `path` a note (`protocol.MOVED_SUFFIX`): where its
        program was restored, or GONE.  Owned by the ticket's uid, 0600; False if its
        directory is gone (the deputy ended)."""
        where = os.path.dirname(path)
        try:
            st = os.stat(where)
            tmp = os.path.join(where, "." + secrets.token_hex(8))
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600)
        except OSError:
            return False
        try:
            if os.geteuid() == 0 and st.st_uid != 0:
                os.fchown(fd, st.st_uid, st.st_gid)
            os.write(fd, note)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path + P.MOVED_SUFFIX)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False
        return True

    def discard(self, path: str) -> None:
        """Delete a ticket file its deputy did not consume (the deputy died first)."""
        with contextlib.suppress(OSError):
            os.unlink(path)

    def close(self) -> None:
        """Remove every ticket file and directory."""
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""
            self._subdirs.clear()


def credentials(pid: int) -> tuple[int, int, tuple[int, ...]]:
    """(real uid, real gid, supplementary groups) of process `pid`, from /proc."""
    uid = gid = -1
    groups: tuple[int, ...] = ()
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Uid:"):
                uid = int(line.split()[1])
            elif line.startswith(b"Gid:"):
                gid = int(line.split()[1])
            elif line.startswith(b"Groups:"):
                groups = tuple(int(g) for g in line.split()[1:])
    if uid < 0 or gid < 0:
        raise OSError(f"no credentials in /proc/{pid}/status")
    return uid, gid, groups


def original_argv(argv: tuple[str, ...]) -> tuple[str, ...] | None:
    """The program's own argv if `argv` is a deputy's command line, else None.

    For records and summaries: a placed process shows the deputy's argv in
    /proc, but the user wants to see the program it stands in for.
    """
    if len(argv) < 6 or os.fsencode(argv[3] if len(argv) > 3 else "") != os.fsencode(DEPUTY_SCRIPT):
        return None
    try:
        cut = argv.index("--")
    except ValueError:
        return None
    return tuple(argv[cut + 2 :]) or None


def ticket_for_self(
    token: str, instance: str, path: bytes, argv: tuple[bytes, ...], **kw: Any
) -> str:
    """A ticket for this process's credentials running `path argv` (tools and tests)."""
    uid, gid, groups = credentials(os.getpid())
    bound = remote_exec(path, argv)
    digest = tickets.exec_digest(bound[0], bound[1:])
    return tickets.mint(token, instance, uid=uid, gid=gid, groups=groups, digest=digest, **kw)


def deputy_command(
    drop: TicketDrop,
    address: str,
    instance: str,
    ticket: str,
    path: bytes,
    argv: tuple[bytes, ...],
    reconnect_window: float | None = None,
    view: str = "",
) -> list[str]:
    """A runnable deputy command line (real interpreter) with `ticket` in a ticket file."""
    ticket_file = drop.put(ticket, os.getuid(), os.getgid())
    args = deputy_argv(address, instance, ticket_file, path, argv, reconnect_window, view=view)
    return [os.fsdecode(interpreter()), *(os.fsdecode(a) for a in args[1:])]
