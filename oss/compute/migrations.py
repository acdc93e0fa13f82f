"""Migration orders (issue 12): which sessions a request moves, the ticket for the
target, and the waits for the source agents' outcomes.

The OSS never calls an agent: it keeps only hashes of instance tokens.  A migrate
order rides on the source's heartbeat reply (`CommandQueue.migrate`); the source
asks for its ticket (`POST /v1/agents/migrations/ticket`, naming the session id the
OSS does not know), moves the session agent to agent, and reports the outcome
(`POST /v1/agents/migrations/outcome`).  The ticket is minted here with the
target's registered exec key, in the format `vmagent.checkpoint.migrate` checks
(`oss` may not import `vmagent`; the agent's tests check both agree).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from oss.errors import MigrationFailed, NotFound

TICKET_TTL = 60.0  # s, as vmagent.checkpoint.migrate.TICKET_TTL
KEY_EXEC = "x"  # the MAC key is the exec key the target registered


def mint_ticket(exec_key: str, instance: str, session: str, now: float | None = None) -> str:
    """`m1.x.<nonce>.<expiry_ms>.<session>.<HMAC(exec_key, "migrate.<public>.<instance>")>`."""
    expiry = int(((time.time() if now is None else now) + TICKET_TTL) * 1000)
    public = f"m1.{KEY_EXEC}.{secrets.token_hex(12)}.{expiry}.{session}"
    mac = hmac.new(
        exec_key.encode(), f"migrate.{public}.{instance}".encode(), hashlib.sha256
    ).hexdigest()
    return f"{public}.{mac}"


@dataclass(frozen=True, slots=True)
class SessionRef:
    """A session of a program on an instance, named by its program's pid."""

    instance: str
    pid: int
    argv: str


def sessions_to_move(rows: Sequence[Any], pid: int | None, to: str) -> list[SessionRef]:
    """The running sessions a request moves (pure).  `rows`: the program's processes.

    With `pid`: the session of that running process (NotFound if none runs; the
    whole tree moves, as CRIU dumps it).  Without: every running session not on `to`.
    """
    running = [r for r in rows if r["state"] == "running"]
    if pid is not None:
        hits = [r for r in running if r["pid"] == pid]
        if not hits:
            raise NotFound(f"no running process {pid} in this program")
        roots = {(r["instance"], r["session_pid"] or r["pid"]) for r in hits}
        if len(roots) > 1:
            where = ", ".join(sorted(i for i, _ in roots))
            raise MigrationFailed(f"pid {pid} runs on several instances ({where})")
    else:
        roots = {(r["instance"], r["session_pid"] or r["pid"]) for r in running}
    argv = {(r["instance"], r["pid"]): r["argv"] for r in running}
    out = [SessionRef(i, p, str(argv.get((i, p), ""))) for i, p in sorted(roots)]
    if not out:
        raise MigrationFailed("the program has no running process on an instance")
    here = [s for s in out if s.instance == to]
    if pid is not None and here:
        raise MigrationFailed(f"pid {pid} already runs on {to}")
    return [s for s in out if s.instance != to]


class Outcomes:
    """Futures of migrate commands, resolved by the source agents' outcomes."""

    def __init__(self) -> None:
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}

    def expect(self, cid: int) -> asyncio.Future[dict[str, Any]]:
        """A future for command `cid`'s outcome."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[cid] = fut
        return fut

    def resolve(self, cid: int, outcome: dict[str, Any]) -> None:
        """Command `cid` is done (nobody may be waiting any more)."""
        fut = self._waiting.pop(cid, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    def forget(self, cid: int) -> None:
        """Nobody waits for `cid` any longer."""
        self._waiting.pop(cid, None)
