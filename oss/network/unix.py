"""The routes of AF_UNIX paths across instances (issue 13; `oss.network.unixpaths`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field

from oss import models as m
from oss.api import Route
from oss.errors import NotFound
from oss.network.unixpaths import MAX_PATH, Bound, mint_relay_ticket
from oss.service import Oss

SocketPath = Annotated[str, Field(min_length=2, max_length=MAX_PATH, pattern=r"^/[^\x00]*$")]


class UnixBindReport(m.Api):
    """A path socket of the program bound (`open`) or gone on the calling instance."""

    path: SocketPath
    pid: Annotated[int, Field(ge=0, le=1 << 22)] = 0
    kind: Literal["stream", "dgram", "seqpacket"] = "stream"
    boot: Annotated[str, Field(max_length=64)] = ""
    open: bool = True


class UnixBindAck(m.Api):
    """Recorded."""

    path: str


class UnixConnectRequest(m.Api):
    """Where is `path` of the program bound?"""

    path: SocketPath


class UnixRelayOffer(m.Api):
    """The binder's agent, the socket's type, its kernel's boot id and a one-use ticket
    to reach it there."""

    instance: str
    address: str
    kind: str
    boot: str
    ticket: str


async def h_unix_bind(oss: Oss, r: web.Request, who: Any, b: UnixBindReport, q: Any) -> UnixBindAck:
    program = r.match_info["program_id"]
    await oss.programs.placed_on(program, str(who))  # NotFound unless it runs there
    if b.open:
        oss.unix_paths.bind(program, b.path, Bound(str(who), b.pid, b.kind, b.boot))
    else:
        oss.unix_paths.unbind(program, b.path, str(who))
    return UnixBindAck(path=b.path)


async def h_unix_connect(
    oss: Oss, r: web.Request, who: Any, b: UnixConnectRequest, q: Any
) -> UnixRelayOffer:
    program = r.match_info["program_id"]
    await oss.programs.placed_on(program, str(who))
    held = oss.unix_paths.find(program, b.path)
    if held is None or held.instance == str(who):
        raise NotFound(f"socket {b.path} on another instance")
    found = await oss.instances.exec_targets([held.instance])
    if held.instance not in found:
        raise NotFound(f"instance {held.instance} (not ready)")
    address, key = found[held.instance]
    return UnixRelayOffer(
        instance=held.instance,
        address=address,
        kind=held.kind,
        boot=held.boot,
        ticket=mint_relay_ticket(key, held.instance, program, b.path),
    )


ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/agents/programs/{program_id}/network/unix",
        h_unix_bind,
        "agent",
        "A path socket of a program bound or gone on this instance",
        UnixBindReport,
        UnixBindAck,
    ),
    Route(
        "POST",
        "/v1/agents/programs/{program_id}/network/unix/connect",
        h_unix_connect,
        "agent",
        "Where a program's path socket is bound, and a ticket to reach it there",
        UnixConnectRequest,
        UnixRelayOffer,
    ),
)
