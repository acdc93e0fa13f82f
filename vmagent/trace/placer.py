"""The agent's side of placement from an instance: T asks, the agent asks the OSS.

An instance tracer T stops an exec it may place and sends `op=place` on its
channel (`req pid uid gid groups digest`: the exec's identity, which the ticket
binds).  `Placer` (a `SessionHooks` observer of the agent) asks the OSS
`POST /v1/agents/programs/{program}/placements` with the instance token, for
the program of the session the channel belongs to (never a program T names),
and answers `op=grant req instance address ticket` or `op=home req reason`.
A placed pid's `op=event kind=exit` releases its slot
(`POST /v1/agents/programs/{program}/release`).

Without an OSS (an agent started without `--oss`), or for a session whose
ticket names no program, every exec runs where it is.  Every call runs under
`timeout`; T itself waits at most `channel.PLACE_TIMEOUT` for the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from vmagent.exec import protocol as P

if TYPE_CHECKING:
    from vmagent.exec.session import Session

log = logging.getLogger(__name__)

OP_PLACE = b"place"
OP_GRANT = b"grant"
OP_HOME = b"home"
NO_PROGRAM = "-"


@dataclass(frozen=True, slots=True)
class PlaceRequest:
    """What T asks for one exec (the fields of `op=place`)."""

    req: int
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]
    digest: str
    avoid: tuple[str, ...] = ()  # instances granted last by this tracer, most recent first


def place_request(record: dict[bytes, bytes]) -> PlaceRequest:
    """The request of an `op=place` record; ValueError if malformed."""

    def num(key: bytes) -> int:
        raw = record.get(key, b"")
        if not raw.isdigit() or len(raw) > 12:
            raise ValueError(f"op=place field {key.decode()} is not a number")
        return int(raw)

    raw_groups = record.get(b"groups", b"")
    groups = tuple(int(g) for g in raw_groups.split(b",") if g) if raw_groups != b"-" else ()
    digest = record.get(b"digest", b"").decode(errors="replace")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError("op=place digest is not a sha256")
    avoid = tuple(a.decode() for a in P.unrecord(record.get(b"avoid", b""))[:32])
    return PlaceRequest(num(b"req"), num(b"pid"), num(b"uid"), num(b"gid"), groups, digest, avoid)


def place_record(
    req: int,
    pid: int,
    uid: int,
    gid: int,
    groups: tuple[int, ...],
    digest: str,
    avoid: list[str] | None = None,
) -> bytes:
    """T -> agent: place this exec (T blocks on the answer)."""
    return P.unpairs(
        {
            b"op": OP_PLACE,
            b"req": str(req).encode(),
            b"pid": str(pid).encode(),
            b"uid": str(uid).encode(),
            b"gid": str(gid).encode(),
            b"groups": b",".join(str(g).encode() for g in groups) or b"-",
            b"digest": digest.encode(),
            b"avoid": P.record([a.encode() for a in (avoid or [])[:32]]),
        }
    )


def grant_record(req: int, instance: str, address: str, ticket: str) -> bytes:
    """agent -> T: run the exec on `instance` at `address` with `ticket`."""
    return P.unpairs(
        {
            b"op": OP_GRANT,
            b"req": str(req).encode(),
            b"instance": instance.encode(),
            b"address": address.encode(),
            b"ticket": ticket.encode(),
        }
    )


def home_record(req: int, reason: str) -> bytes:
    """agent -> T: the exec runs where it is (`reason` for the log)."""
    return P.unpairs({b"op": OP_HOME, b"req": str(req).encode(), b"reason": reason.encode()})


class OssPlacements:
    """The OSS's agent placement routes, with this instance's token (aiohttp)."""

    def __init__(self, url: str, token: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"}
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> tuple[aiohttp.ClientSession, str]:
        from vmagent.osslink import http_of

        base, connector = http_of(self.url)
        if self._http is None:
            self._http = aiohttp.ClientSession(connector=connector)
        return self._http, base

    async def _post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        http, base = self._session()
        async with asyncio.timeout(self.timeout):
            async with http.post(base + path, json=body, headers=self._headers) as resp:
                data = await resp.json(content_type=None)
                return resp.status, data

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """POST `body` to the OSS at `path` with this instance's token: (status, JSON)."""
        return await self._post(path, body)

    async def place(self, program: str, request: PlaceRequest) -> tuple[str, str, str] | str:
        """(instance, address, ticket) of a placement, or why there is none."""
        status, data = await self._post(
            f"/v1/agents/programs/{program}/placements",
            {
                "parent_pid": request.pid,
                "exec_as": {
                    "uid": request.uid,
                    "gid": request.gid,
                    "groups": list(request.groups),
                    "digest": request.digest,
                },
                "avoid": list(request.avoid),
            },
        )
        if status != 200 or not isinstance(data, dict):
            message = data.get("message") if isinstance(data, dict) else None
            return f"the OSS placed nothing ({status}: {message or 'no reason'})"
        for g in data.get("exec_grants", []):
            if g.get("tickets"):
                return str(g["instance"]), str(g["address"]), str(g["tickets"][0])
        for a in data.get("assignments", []):
            await self.release(program, str(a["instance"]))
        return "the OSS placed it where no exec ticket can be had"

    async def signal(
        self, program: str, pid: int, sig: int, thread: bool = False, sender: int = 0
    ) -> bool:
        """Ask the OSS to send `sig` to the program's `pid` (a thread's id if `thread`;
        from program pid `sender`, 0: not said) (issue 11); False: it runs nowhere."""
        body: dict[str, object] = {"pid": pid, "signal": sig}
        if thread:
            body["thread"] = True
        if 0 < sender < 2**31:
            body["sender"] = sender
        status, _data = await self._post(f"/v1/agents/programs/{program}/signals", body)
        return status == 200

    async def release(self, program: str, instance: str) -> None:
        """A process placed from here ended."""
        await self._post(f"/v1/agents/programs/{program}/release", {"instance": instance})

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._http is not None:
            await self._http.close()
            self._http = None


class Placer:
    """Session hooks: answer T's `op=place`, release placed processes at their exit."""

    def __init__(self, oss: OssPlacements | None) -> None:
        self.oss = oss
        self._tasks: set[asyncio.Task[None]] = set()
        self._placed: dict[tuple[bytes, int], tuple[str, str]] = {}  # (session, pid) -> prog, inst
        self._said: set[str] = set()

    def _once(self, reason: str) -> None:
        if reason not in self._said:
            self._said.add(reason)
            log.warning("an exec runs on this instance: %s", reason)

    def started(self, session: Session) -> None:
        """Nothing."""

    def output(self, session: Session, fd: int, data: bytes) -> None:
        """Nothing."""

    def ended(self, session: Session, status: int) -> None:
        """Nothing (the tracer reports every exit, also the program's)."""

    def trace_message(self, session: Session, record: dict[bytes, bytes]) -> None:
        """`op=place`: ask the OSS; `op=event kind=exit` of a placed pid: release."""
        op = record.get(b"op")
        if op == OP_PLACE:
            self._spawn(self._place(session, record))
        elif op == b"event" and record.get(b"kind") == b"exit":
            with contextlib.suppress(ValueError):
                key = (session.sid, int(record.get(b"pid", b"0")))
                placed = self._placed.pop(key, None)
                if placed is not None and self.oss is not None:
                    self._spawn(self._release(*placed))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _place(self, session: Session, record: dict[bytes, bytes]) -> None:
        try:
            request = place_request(record)
        except (ValueError, P.FrameError, UnicodeDecodeError) as exc:
            log.warning("session %s: %s", session.sid.hex()[:8], exc)
            return
        view = getattr(session.request, "view", None)
        program = view.program if view is not None else ""
        if self.oss is None:
            answer = home_record(request.req, "this instance has no OSS")
        elif not program or program == NO_PROGRAM:
            answer = home_record(request.req, "the program is not known to the OSS")
        else:
            try:
                got = await self.oss.place(program, request)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                got = f"the OSS did not answer ({type(exc).__name__}: {exc})"
            if isinstance(got, str):
                self._once(got)
                answer = home_record(request.req, got)
            else:
                instance, address, ticket = got
                self._placed[(session.sid, request.pid)] = (program, instance)
                answer = grant_record(request.req, instance, address, ticket)
        sock = getattr(session, "trace_sock", None)
        if sock is None:
            return  # the tracer is gone; a granted slot is released at its exit event
        try:
            sock.send(answer)
        except OSError as exc:
            log.debug("session %s: tracer gone before its answer: %s", session.sid.hex()[:8], exc)

    async def _release(self, program: str, instance: str) -> None:
        assert self.oss is not None
        try:
            await self.oss.release(program, instance)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("release of %s on %s: %s", program, instance, exc)

    async def close(self) -> None:
        """Cancel what is in flight; close the OSS session."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.oss is not None:
            await self.oss.close()
