"""The failover routes (issue 12): checkpoints in from instances, out to the
replacement ordered to restore them, its outcome, and a program's restorations
for its home (`oss.compute.failover`)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from oss import models as m
from oss.api import PROGRAM_PATH, Route, principal
from oss.compute.failover import Failover
from oss.service import Oss


async def h_put_checkpoint(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Ok:
    failover: Failover = oss.failover
    await failover.receive(str(who), r.match_info["program_id"], r.match_info["session"], r.content)
    return m.Ok()


async def h_drop_checkpoint(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Ok:
    failover: Failover = oss.failover
    failover.ended(str(who), r.match_info["program_id"], r.match_info["session"])
    return m.Ok()


async def h_get_checkpoint(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> web.FileResponse:
    failover: Failover = oss.failover
    path = failover.serving(str(who), r.match_info["program_id"], r.match_info["session"])
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


async def h_restored(oss: Oss, r: web.Request, who: Any, b: m.RestoreOutcome, q: Any) -> m.Ok:
    failover: Failover = oss.failover
    await failover.outcome(str(who), b)
    return m.Ok()


async def h_restorations(
    oss: Oss, r: web.Request, who: Any, b: Any, q: Any
) -> list[m.Restoration]:
    program = r.match_info["program_id"]
    await oss.programs.program(principal(who).account_id, program)  # 404: not yours
    failover: Failover = oss.failover
    return failover.of_program(program)


CHECKPOINT_PATH = "/v1/agents/checkpoints/{program_id}/{session}"
ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        CHECKPOINT_PATH,
        h_put_checkpoint,
        "agent",
        "A periodic checkpoint of a session (description, then packed images)",
        response=m.Ok,
    ),
    Route(
        "GET",
        CHECKPOINT_PATH,
        h_get_checkpoint,
        "agent",
        "The last checkpoint of a session, for the instance ordered to restore it",
        content_type="application/octet-stream",
    ),
    Route(
        "DELETE",
        CHECKPOINT_PATH,
        h_drop_checkpoint,
        "agent",
        "A session ended where it was held: its checkpoint goes",
        response=m.Ok,
    ),
    Route(
        "POST",
        "/v1/agents/checkpoints/restored",
        h_restored,
        "agent",
        "The outcome of a restore command this instance was given",
        m.RestoreOutcome,
        m.Ok,
    ),
    Route(
        "GET",
        PROGRAM_PATH + "/restorations",
        h_restorations,
        "account",
        "The program's processes restored from checkpoints after an instance was lost",
        response=m.Restoration,
        many=True,
    ),
)
