"""The OSS's `network` commands (issue 13): this instance's share of programs' networks.

On VMs the OSS cannot reach an instance's netlink; it sends each instance the
state it must hold for a program (`net.nodestate.to_wire`) in its heartbeat
reply, over the connection the agent opened and authenticates with its
instance token.  This observer of `Agent.command_handlers` checks the state
(`from_wire`: planner-shaped values only, bounded lists) and applies it to the
instance's own namespace with a `net.redirector.Redirector`, one change at a
time, newest command per program winning.  An empty state drops the program;
the agent closing drops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from net.nodestate import BadNodeState, NodeKey, NodeState, from_wire

log = logging.getLogger(__name__)

APPLY_TIMEOUT = 10.0
SEEN = 4096


class NetworkOrders:
    """Carries out `network` commands in order (one worker task)."""

    def __init__(self, instance: str) -> None:
        self.key: NodeKey = ("instance", instance)
        self._redirector: Any = None  # net.redirector.Redirector, made on first use
        self._latest: dict[str, int] = {}  # program -> newest command id taken
        self._queue: asyncio.Queue[tuple[int, str, NodeState]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self.applied = 0

    def on_commands(self, commands: list[dict[str, Any]]) -> None:
        """Queue each new `network` command (the rest are someone else's)."""
        for cmd in commands:
            if cmd.get("action") != "network":
                continue
            try:
                cid, program = int(cmd["id"]), str(cmd["program"])
                state = from_wire(cmd.get("state"))
            except (KeyError, TypeError, ValueError, BadNodeState) as exc:
                log.warning("network: malformed command from the OSS ignored: %s", exc)
                continue
            if cid <= self._latest.get(program, 0):
                continue  # carried again by a reply, or older than one taken
            self._latest[program] = cid
            if len(self._latest) > SEEN:
                self._latest.pop(next(iter(self._latest)))
            self._queue.put_nowait((cid, program, state))
            if self._worker is None or self._worker.done():
                self._worker = asyncio.get_running_loop().create_task(
                    self._work(), name="network-orders"
                )

    async def _work(self) -> None:
        while not self._queue.empty():
            cid, program, state = self._queue.get_nowait()
            if cid < self._latest.get(program, 0):
                continue  # a newer state for it is queued
            try:
                async with asyncio.timeout(APPLY_TIMEOUT):
                    await asyncio.to_thread(self._apply, program, state)
                self.applied += 1
                log.info("network: program %s %s", program, "dropped" if state.empty else "set")
            except Exception as exc:  # one program's failure must not stop the others
                log.warning("network: program %s not applied: %s", program, exc)

    def _apply(self, program: str, state: NodeState) -> None:
        if self._redirector is None:
            from net.redirector import Redirector

            self._redirector = Redirector({self.key: None})
        self._redirector.apply(self.key, program, state)

    async def close(self) -> None:
        """Drop every program's set-up (the agent is going away)."""
        if self._worker is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(APPLY_TIMEOUT):
                    await self._worker
        if self._redirector is not None:
            await asyncio.to_thread(self._redirector.close)
