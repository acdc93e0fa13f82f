"""The OSS's migrate orders (issue 12), carried by heartbeat replies.

A `migrate` command names a program, the pid of one of its sessions' programs
here, and the target instance and address.  The OSS does not know the session's
id, which the migration ticket binds, so the agent asks for the ticket
(`POST /v1/agents/migrations/ticket`), moves the session agent to agent
(`Migrator.migrate`: the program never runs twice and is never lost), and reports
the outcome (`POST /v1/agents/migrations/outcome`), refused or done, with one
line.  Each order runs as a task of its own: a migration outlasts the heartbeat
that brought it.  The OSS's routes answer only for commands given to this
instance, so an order can be carried out only where it was sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from vmagent.checkpoint.criu import CheckpointError
from vmagent.checkpoint.migrate import Migrator
from vmagent.exec.session import Session

log = logging.getLogger(__name__)

Post = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
TICKET = "/v1/agents/migrations/ticket"
OUTCOME = "/v1/agents/migrations/outcome"
SEEN = 4096  # command ids remembered (a reply may carry a command again)


class MigrateOrders:
    """Carries out `migrate` commands; observer of `Agent.command_handlers`."""

    def __init__(
        self, migrator: Migrator, sessions: Callable[[], Iterable[Session]], post: Post
    ) -> None:
        self.migrator = migrator
        self.sessions = sessions
        self.post = post
        self._seen: dict[int, None] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def on_commands(self, commands: list[dict[str, Any]]) -> None:
        """Start each new migrate command (the rest are someone else's)."""
        for cmd in commands:
            if cmd.get("action") != "migrate":
                continue
            try:
                cid, program = int(cmd["id"]), str(cmd["program"])
                pid, to, address = int(cmd["pid"]), str(cmd["to"]), str(cmd["address"])
            except (KeyError, TypeError, ValueError):
                log.warning("migrate: malformed command from the OSS ignored: %.200r", cmd)
                continue
            if cid in self._seen:
                continue
            self._seen[cid] = None
            while len(self._seen) > SEEN:
                del self._seen[next(iter(self._seen))]
            task = asyncio.get_running_loop().create_task(
                self._carry_out(cid, program, pid, to, address), name=f"migrate-{cid}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def find(self, program: str, pid: int) -> Session | None:
        """The running session of `program` whose program is `pid`."""
        for s in self.sessions():
            if s.program_id == program and s.pid == pid and s.status is None and not s.moved:
                return s
        return None

    async def _carry_out(self, cid: int, program: str, pid: int, to: str, address: str) -> None:
        outcome: dict[str, Any] = {"command": cid, "ok": False}
        session = self.find(program, pid)
        try:
            if session is None:
                raise CheckpointError(f"no running session of pid {pid} here")
            asked = await self.post(TICKET, {"command": cid, "session": session.sid.hex()})
            ticket = str(asked["ticket"])
            done = await self.migrator.migrate(session, address, to, ticket)
            outcome.update(
                ok=True,
                pid=int(done["pid"]),
                freeze_ms=float(done["freeze_ms"]),
                image_bytes=int(done["image_bytes"]),
            )
        except CheckpointError as exc:
            outcome["error"] = str(exc)[:4096]
        except Exception as exc:  # noqa: BLE001 - the OSS must hear something
            log.exception("migrate command %d failed", cid)
            outcome["error"] = f"{type(exc).__name__}: {exc}"[:4096]
        log.info("migrate command %d (%s pid %d -> %s): %s", cid, program, pid, to, outcome)
        try:
            await self.post(OUTCOME, outcome)
        except Exception as exc:  # noqa: BLE001 - the OSS times its request out
            log.warning("migrate command %d: the outcome did not reach the OSS: %s", cid, exc)

    async def close(self) -> None:
        """Stop every order still under way (a migration gives its tree back first)."""
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def http_post(post_for: Callable[[str], Any]) -> Post:
    """A `Post` from HttpPost-like callables per path (`post_for(path)(raw) -> dict`)."""

    async def post(path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await post_for(path)(json.dumps(body).encode())
        return result

    return post
