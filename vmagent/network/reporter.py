"""Agent session hook: listening sockets of the instance tracers, told to the OSS.

T sends `op=listen req pid port proto local` and waits; the hook posts it to
`/v1/agents/programs/{program}/network/listeners` for the program of the
session the channel belongs to (never one T names) and answers
`op=netack req address` (409: `op=netrefused req errno=98`, EADDRINUSE).
Without an OSS, or for a session of no program, the answer is an empty ack:
the listener stays local, as it is.  `op=unlisten` is posted, not answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from vmagent.trace import channel
from vmagent.trace.listeners import OP_LISTEN, OP_NETACK, OP_NETREFUSED, OP_UNLISTEN
from vmagent.trace.placer import NO_PROGRAM

if TYPE_CHECKING:
    from vmagent.exec.session import Session

log = logging.getLogger(__name__)
MAX_PORT = 65535


class Poster(Protocol):
    """POSTs to the OSS with the instance's token (`vmagent.trace.placer.OssPlacements`)."""

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """(status, decoded JSON body)."""
        ...


class ListenerReporter:
    """Session hooks: `op=listen` / `op=unlisten` from instance tracers, to the OSS."""

    def __init__(self, oss: Poster | None) -> None:
        self.oss = oss
        self._tasks: set[asyncio.Task[None]] = set()
        self._said: set[str] = set()
        # Listeners each session reported open: closed for it at its end if T could not
        # say so (a process killed outright never reaches its exit stop).
        self._open: dict[bytes, dict[tuple[int, str], tuple[int, str]]] = {}

    def started(self, session: Session) -> None:
        """Nothing."""

    def output(self, session: Session, fd: int, data: bytes) -> None:
        """Nothing."""

    def ended(self, session: Session, status: int) -> None:
        """Close what the session still listens on (T reports each closed listener at the
        processes' exits; this covers an exit T never saw)."""
        left = self._open.pop(session.sid, {})
        if not left or self.oss is None:
            return
        program = _program(session)
        if not program:
            return
        for (port, proto), (pid, local) in left.items():
            task = asyncio.get_running_loop().create_task(
                self._closed(program, pid, port, proto, local)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _closed(self, program: str, pid: int, port: int, proto: str, local: str) -> None:
        await self._post(program, b"", pid, port, proto, local, False)

    def trace_message(self, session: Session, record: dict[bytes, bytes]) -> None:
        """Post a listener change; answer a listen."""
        op = record.get(b"op")
        if op in (OP_LISTEN, OP_UNLISTEN):
            task = asyncio.get_running_loop().create_task(self._report(session, record))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _report(self, session: Session, record: dict[bytes, bytes]) -> None:
        opened = record[b"op"] == OP_LISTEN
        req = record.get(b"req", b"")
        program = _program(session)
        answer = channel.encode(OP_NETACK, req=req, address="")
        try:
            port = channel.number(record, b"port")
            pid = channel.number(record, b"pid")
            proto = record.get(b"proto", b"tcp").decode()
            local = record.get(b"local", b"0.0.0.0").decode()[:64]
            if not 0 < port <= MAX_PORT or proto not in ("tcp", "udp"):
                raise channel.ChannelError(f"bad listener port {port}/{proto}")
        except (channel.ChannelError, UnicodeDecodeError) as exc:
            log.warning("session %s: %s", session.sid.hex()[:8], exc)
        else:
            if opened:
                self._open.setdefault(session.sid, {})[(port, proto)] = (pid, local)
            else:
                self._open.get(session.sid, {}).pop((port, proto), None)
            if self.oss is not None and program:
                answer = await self._post(program, req, pid, port, proto, local, opened)
        if opened:
            sock = getattr(session, "trace_sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.send(answer)

    async def _post(
        self, program: str, req: bytes, pid: int, port: int, proto: str, local: str, opened: bool
    ) -> bytes:
        assert self.oss is not None
        body = dict(pid=pid, port=port, proto=proto, local=local, open=opened)
        try:
            status, data = await self.oss.post(
                f"/v1/agents/programs/{program}/network/listeners", body
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._once(f"the OSS did not answer a listener report ({type(exc).__name__})")
            return channel.encode(OP_NETACK, req=req, address="")
        if status == 409:
            return channel.encode(OP_NETREFUSED, req=req, errno=errno.EADDRINUSE)
        if status == 404 and not opened:
            # The instance's last process of the program was released first: the OSS
            # ended the listener all the same.
            return channel.encode(OP_NETACK, req=req, address="")
        if status != 200 or not isinstance(data, dict):
            self._once(f"the OSS refused a listener report ({status})")
            return channel.encode(OP_NETACK, req=req, address="")
        return channel.encode(OP_NETACK, req=req, address=str(data.get("address", "")))

    def _once(self, reason: str) -> None:
        if reason not in self._said:
            self._said.add(reason)
            log.warning("%s: listeners stay local to this instance", reason)

    async def close(self) -> None:
        """Cancel what is in flight."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _program(session: Session) -> str:
    """The program a session belongs to ("" for none the OSS knows)."""
    view = getattr(session.request, "view", None)
    program = view.program if view is not None else ""
    return "" if program == NO_PROGRAM else program
