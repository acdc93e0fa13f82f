"""The network service's HTTP routes.

Agents: `POST /v1/agents/programs/{program_id}/network/listeners` reports a
listening socket opened (`open: true`) or closed on the calling instance, for
a program that has processes there (404 otherwise: an instance cannot steer
another's programs); 409 when another instance of the program listens on
that port.  Accounts: `GET /v1/programs/{program_id}/network` shows the
program's address, instances and listeners.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field

from oss import models as m
from oss.api import PROGRAM_PATH, Route, principal
from oss.service import Oss


class ListenerReport(m.Api):
    """A listening socket of the program opened or closed on the calling instance."""

    pid: Annotated[int, Field(ge=0, le=1 << 22)]
    port: Annotated[int, Field(ge=1, le=65535)]
    proto: Literal["tcp", "udp"] = "tcp"
    local: Annotated[str, Field(max_length=64)] = "0.0.0.0"
    open: bool = True


class ListenerAck(m.Api):
    """The program's address (empty: this instance is not on the program's network)."""

    address: str


class NetListener(m.Api):
    """One listener."""

    instance: str
    port: int
    proto: str
    bound: str
    pid: int


class ProgramNetwork(m.Api):
    """A program's address and where it listens (address None: it has none, e.g. this
    OSS has no network prefix, or no process of it was placed yet)."""

    program_id: str
    address: str | None
    instances: list[str]
    listeners: list[NetListener]


PROTO = {"tcp": 6, "udp": 17}


async def h_listener(oss: Oss, r: web.Request, who: Any, b: ListenerReport, q: Any) -> ListenerAck:
    program = r.match_info["program_id"]
    net = oss.network
    if not b.open and net is not None:
        # A close may come after the instance's last process of the program was released
        # (its heartbeat raced the report): it ends only what this instance holds.
        await net.unlisten(program, str(who), b.port, PROTO[b.proto])
    await oss.programs.placed_on(program, str(who))  # NotFound unless it runs there
    if net is None:
        return ListenerAck(address="")
    if b.open:
        address = await net.listen(program, str(who), b.pid, b.port, b.local, PROTO[b.proto])
    else:
        address = await net.address_of(program) or ""
    return ListenerAck(address=address)


async def h_network(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> ProgramNetwork:
    program = r.match_info["program_id"]
    await oss.programs.program(principal(who).account_id, program)  # NotFound: not yours
    shown = await oss.network.show(program) if oss.network is not None else None
    if shown is None:
        return ProgramNetwork(program_id=program, address=None, instances=[], listeners=[])
    return ProgramNetwork(
        program_id=program,
        address=shown["address"],
        instances=shown["instances"],
        listeners=[NetListener(**x) for x in shown["listeners"]],
    )


ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/agents/programs/{program_id}/network/listeners",
        h_listener,
        "agent",
        "A listening socket of a program opened or closed on this instance",
        ListenerReport,
        ListenerAck,
    ),
    Route(
        "GET",
        PROGRAM_PATH + "/network",
        h_network,
        "account",
        "A program's address, instances and listeners",
        response=ProgramNetwork,
    ),
)
