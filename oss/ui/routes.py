"""The web view's routes: its page and scripts at /ui (public: no data in them) and the
live event stream (account token, as every data route).

The page never carries a token in a URL: the operator types it into a form, the page
keeps it in sessionStorage and sends it as `Authorization: Bearer` on every request,
the event stream included (read with fetch, since EventSource cannot send headers).
Every asset is served from here (no CDN); the Content-Security-Policy allows nothing
else.
"""

from __future__ import annotations

import asyncio
import json
import logging
from importlib import resources
from typing import Any

from aiohttp import web
from pydantic import Field

from oss import models as m
from oss.api import Route, principal
from oss.errors import NotFound
from oss.service import Oss

log = logging.getLogger(__name__)

STATIC = {  # file -> content type: the only files served
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
EVENT_POLL = 1.0  # s between looks for changes on one event stream
KEEPALIVE = 15.0  # s: a comment line keeps proxies and the listener's idle timer quiet
ACTIVE = ("pending", "running", "recovering")


def _asset(name: str) -> bytes:
    return resources.files("oss.ui").joinpath("static", name).read_bytes()


async def h_page(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> web.Response:
    return web.Response(body=_asset("index.html"), content_type="text/html", headers=HEADERS)


async def h_static(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> web.Response:
    name = r.match_info["file"]
    if name not in STATIC:
        raise NotFound(f"/ui/{name}")
    return web.Response(body=_asset(name), content_type=STATIC[name], headers=HEADERS)


class EventQuery(m.Api):
    """`?programs=N`: watch the newest N programs of the account."""

    programs: int = Field(100, ge=1, le=1000)


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def h_events(oss: Oss, r: web.Request, who: Any, b: Any, q: EventQuery) -> web.StreamResponse:
    """Server-sent events: `hello` (server time), then `programs`, `processes` and
    `instances` naming what changed, each time it changes (the page fetches the pages
    it shows again)."""
    p = principal(who)
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
    )
    await resp.prepare(r)
    loop = asyncio.get_running_loop()
    progs: dict[str, tuple[Any, ...]] = {}
    procs: dict[str, tuple[Any, ...]] = {}
    insts: dict[str, tuple[Any, ...]] = {}
    quiet_since = loop.time()
    try:
        await resp.write(_sse("hello", {"now": oss.clock(), "poll": EVENT_POLL}))
        while r.transport is not None and not r.transport.is_closing():
            rows = await oss.programs.programs(p.account_id, None, q.programs)
            now_progs = {
                x["id"]: (x["state"], x["updated"], x["spent_micros"], x["lost_processes"])
                for x in rows
            }
            watch = [i for i, sig in now_progs.items() if sig[0] in ACTIVE or progs.get(i) != sig]
            now_procs = {**procs, **await oss.processes.digest(watch)}
            now_insts = {
                i["name"]: (i["state"], i["used_slots"], oss.seen(i["name"]))
                for i in await oss.instances.instances(None if p.admin else p.account_id)
            }
            sent = False
            for event, old, new in (
                ("programs", progs, now_progs),
                ("processes", procs, now_procs),
                ("instances", insts, now_insts),
            ):
                changed = sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k))
                if changed:
                    await resp.write(_sse(event, {"changed": changed[:1000], "now": oss.clock()}))
                    sent = True
            progs, procs, insts = now_progs, now_procs, now_insts
            if sent:
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= KEEPALIVE:
                await resp.write(b": keepalive\n\n")
                quiet_since = loop.time()
            await asyncio.sleep(EVENT_POLL)
    except ConnectionError:  # includes aiohttp's ClientConnectionResetError
        log.debug("an event stream's reader went away")
    return resp


ROUTES: tuple[Route, ...] = (
    Route("GET", "/ui", h_page, "public", "The web view", content_type="text/html"),
    Route("GET", "/ui/{file}", h_static, "public", "The web view's files", content_type="text/*"),
    Route(
        "GET",
        "/v1/events",
        h_events,
        "account",
        "Live changes of programs, processes and instances (text/event-stream)",
        query=EventQuery,
        content_type="text/event-stream",
    ),
)
