"""AF_UNIX paths of a program bound on its instances, and relay tickets (issue 13).

VMs are separate kernels: a socket bound to a path on one is not reached by
`connect` on another.  The instance tracers tell their agent of every
`bind` of a path socket (and of its end); the agent posts it here
(`POST /v1/agents/programs/{program}/network/unix`) and the OSS keeps
(program, path) -> (instance, socket type) for the program's life, in memory and
in its store (`net_unix_paths`, written behind each change: a restarted OSS reads
them back).  A second bind of a path the program holds on another
instance gets 409 (EADDRINUSE, as the second bind of one path on a machine).

A tracer seeing `connect` to a path nothing on its kernel is bound to asks
(`POST .../network/unix/connect`); the OSS answers the binder's agent address,
the socket type and a *relay ticket* minted with the binder's exec key:
`u1.<nonce>.<expiry_ms>.<program>.<path digest>.<HMAC(exec_key,
"unixrelay.<public>.<instance>")>`, one use, `TICKET_TTL` seconds.  The
connecting agent shows it to the binder's agent (`vmagent.network.unixrelay`
checks it), which connects to the real socket for it.  Only paths the
binder's own tracer reported are reachable that way.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oss.db.store import Conn, Store, WriteBehind
from oss.errors import Conflict

log = logging.getLogger(__name__)

TICKET_TTL = 20.0  # s a relay ticket is valid
VERSION = "u1"
MAX_PATH = 107  # bytes of sun_path (its last byte is the NUL)
KINDS = ("stream", "dgram", "seqpacket")


def path_digest(path: str) -> str:
    """The digest of a socket path a ticket binds (32 hex digits)."""
    return hashlib.sha256(path.encode(errors="surrogateescape")).hexdigest()[:32]


def relay_mac(exec_key: str, instance: str, public: str) -> str:
    """The MAC of a relay ticket's public part, for `instance` (the one definition)."""
    return hmac.new(
        exec_key.encode(), f"unixrelay.{public}.{instance}".encode(), hashlib.sha256
    ).hexdigest()


def mint_relay_ticket(
    exec_key: str, instance: str, program: str, path: str, now: float | None = None
) -> str:
    """A one-use ticket letting an agent reach `path` of `program` through `instance`."""
    expiry = int(((time.time() if now is None else now) + TICKET_TTL) * 1000)
    public = f"{VERSION}.{secrets.token_hex(12)}.{expiry}.{program}.{path_digest(path)}"
    return f"{public}.{relay_mac(exec_key, instance, public)}"


@dataclass(frozen=True, slots=True)
class Bound:
    """A path socket of a program on one instance."""

    instance: str
    pid: int
    kind: str
    boot: str = ""  # the binder's kernel (its boot id): instances sharing one need no relay


class UnixPaths:
    """(program, path) -> the instance whose kernel holds the socket (in memory, and a
    row each in `saved`, the OSS's store, when given)."""

    def __init__(self, saved: Store | None = None) -> None:
        self._paths: dict[str, dict[str, Bound]] = {}
        self.saved = saved
        self._behind = WriteBehind("AF_UNIX path table")

    def _save(self, fn: Callable[[Conn], Any]) -> None:
        """Write a change to the store behind the caller (in order with every write)."""
        self._behind.save(self.saved, fn)

    async def flush(self) -> None:
        """Wait for the changes on their way to the store."""
        await self._behind.flush()

    async def load(self) -> int:
        """Read the table back after a restart (the paths read)."""
        if self.saved is None:
            return 0
        rows = await self.saved.read(_load)
        for program, path, bound in rows:
            self._paths.setdefault(program, {})[path] = bound
        return len(rows)

    def bind(self, program: str, path: str, bound: Bound) -> None:
        """Record a bind; Conflict when another kernel's instance of the program holds
        `path` (on one kernel the file is one: the last bind has it, as natively)."""
        held = self._paths.setdefault(program, {}).get(path)
        if (
            held is not None
            and held.instance != bound.instance
            and (not held.boot or held.boot != bound.boot)
        ):
            raise Conflict(f"{path} is bound on instance {held.instance}")
        self._paths[program][path] = bound
        row = (program, path, bound.instance, bound.pid, bound.kind, bound.boot)
        self._save(lambda c: c.execute(
            "INSERT OR REPLACE INTO net_unix_paths VALUES(?,?,?,?,?,?)", row
        ))  # fmt: skip

    def unbind(self, program: str, path: str, instance: str) -> None:
        """Forget `path` if `instance` holds it."""
        paths = self._paths.get(program, {})
        held = paths.get(path)
        if held is not None and held.instance == instance:
            del paths[path]
            if not paths:
                self._paths.pop(program, None)
            self._save(lambda c: c.execute(
                "DELETE FROM net_unix_paths WHERE program_id=? AND path=? AND instance=?",
                (program, path, instance),
            ))  # fmt: skip

    def find(self, program: str, path: str) -> Bound | None:
        """Where `path` is bound for `program` (None: nowhere)."""
        return self._paths.get(program, {}).get(path)

    def release(self, program: str) -> None:
        """The program ended."""
        if self._paths.pop(program, None) is not None:
            self._save(lambda c: c.execute(
                "DELETE FROM net_unix_paths WHERE program_id=?", (program,)
            ))  # fmt: skip

    def lost(self, instance: str) -> None:
        """An instance is gone: its sockets with it."""
        for program in list(self._paths):
            for path, held in list(self._paths[program].items()):
                if held.instance == instance:
                    self.unbind(program, path, instance)


def _load(c: Conn) -> list[tuple[str, str, Bound]]:
    return [
        (r["program_id"], r["path"], Bound(r["instance"], r["pid"], r["kind"], r["boot"]))
        for r in c.execute("SELECT * FROM net_unix_paths")
    ]
