"""The agent: exec sessions for deputies plus a small HTTP API, on one listen address.

One TCP port serves two protocols: a connection whose first four bytes are
`protocol.MAGIC` is a deputy's exec session (raw frames, fastest path for stdio;
`vmagent.exec.server`, `vmagent.exec.session`); anything else is handed to
aiohttp (health, load, sessions: this module).  A session outlives its
connection for `reconnect_window` seconds so a deputy can resume with nothing
lost; a session whose deputy never returns has its program killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

from vmagent.checkpoint.criu import CheckpointError, CriuUnavailable
from vmagent.checkpoint.local import Checkpointer, Suspension
from vmagent.checkpoint.migrate import MigrationTickets, Migrator
from vmagent.checkpoint.orders import OUTCOME, TICKET, MigrateOrders, http_post
from vmagent.checkpoint.periodic import FailoverOrders
from vmagent.config import AgentConfig
from vmagent.exec.server import HTTP_LIFETIME, ExecProtocol, ExecService, Sniffer, extend_http
from vmagent.exec.session import Session
from vmagent.exec.tickets import TicketCheck
from vmagent.load import LoadSampler
from vmagent.network.orders import NetworkOrders
from vmagent.network.reporter import ListenerReporter
from vmagent.network.unixrelay import UnixRelay
from vmagent.network.unixrelay import add_routes as add_unix_relay
from vmagent.storage.mounts import MOUNTS, StorageOrders
from vmagent.storage.mounts import OUTCOME as STORAGE_OUTCOME
from vmagent.storage.mounts import add_routes as storage_routes
from vmagent.telemetry.uplink import HttpPost
from vmagent.trace.enforce import Enforcer, detect
from vmagent.trace.placer import OssPlacements, Placer
from vmagent.trace.signals import Signaller
from vmagent.trace.zygote import Tracing

ZYGOTE_EXIT = 2.0  # s the agent waits, when closing, for its zygote to be gone

SERVICE: web.AppKey[ExecService] = web.AppKey("service", ExecService)
SAMPLER: web.AppKey[LoadSampler] = web.AppKey("sampler", LoadSampler)
CONFIG: web.AppKey[AgentConfig] = web.AppKey("config", AgentConfig)


def _is_authorized(request: web.Request) -> bool:
    token = request.app[CONFIG].token
    given = request.headers.get("Authorization", "").encode()
    return hmac.compare_digest(given, f"Bearer {token}".encode())


def _authorized(request: web.Request) -> None:
    if not _is_authorized(request):
        raise web.HTTPUnauthorized(text="missing or wrong bearer token\n")


async def _health(request: web.Request) -> web.Response:
    """Liveness for anyone; details (instance, pid, sessions) for the token's holder."""
    config = request.app[CONFIG]
    if not _is_authorized(request):
        return web.json_response({"ok": True})
    return web.json_response(
        {
            "ok": True,
            "instance": config.instance,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "cpus": os.cpu_count() or 1,
            "sessions": len(request.app[SERVICE].sessions),
        }
    )


async def _load(request: web.Request) -> web.Response:
    _authorized(request)
    return web.json_response(request.app[SAMPLER].sample().as_json())


async def _sessions(request: web.Request) -> web.Response:
    _authorized(request)
    service = request.app[SERVICE]
    return web.json_response(
        {
            "counts": service.counts,
            "sessions": [
                {
                    "session": s.sid.hex(),
                    "program": s.program,
                    "pid": s.pid,
                    "connected": s.proto is not None,
                    "running": s.status is None,
                    "unacked_bytes": s.outbox.held,
                }
                for s in service.sessions.values()
            ],
        }
    )


CHECKPOINTER: web.AppKey[Checkpointer] = web.AppKey("checkpointer", Checkpointer)


def _session_of(request: web.Request) -> Session:
    """The session `{sid}` names, for the token's holder (404 if there is none)."""
    _authorized(request)
    try:
        session = request.app[SERVICE].sessions.get(bytes.fromhex(request.match_info["sid"]))
    except ValueError:
        session = None
    if session is None:
        raise web.HTTPNotFound(text="no such session\n")
    return session


async def _checkpoint(request: web.Request) -> web.Response:
    """POST /v1/sessions/{sid}/checkpoint {"restore": bool, "images": dir?} (vmagent.checkpoint)."""
    session = _session_of(request)
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        raise web.HTTPBadRequest(text="the body is not JSON\n") from None
    restore = body.get("restore", False) if isinstance(body, dict) else None
    images = body.get("images") if isinstance(body, dict) else None
    if not isinstance(restore, bool) or not (images is None or isinstance(images, str)):
        raise web.HTTPBadRequest(text='expected {"restore": bool, "images": path}\n')
    try:
        done = await request.app[CHECKPOINTER].checkpoint(session, restore=restore, images=images)
    except CriuUnavailable as exc:
        raise web.HTTPServiceUnavailable(text=f"{exc}\n") from None
    except CheckpointError as exc:
        raise web.HTTPConflict(text=f"{exc}\n") from None
    return web.json_response(done.as_json())


async def _suspend(request: web.Request) -> web.Response:
    """POST /v1/sessions/{sid}/suspend: dump the tree, kill it, hold the session (issue 12)."""
    session = _session_of(request)
    try:
        held = await request.app[CHECKPOINTER].suspend(session)
    except CriuUnavailable as exc:
        raise web.HTTPServiceUnavailable(text=f"{exc}\n") from None
    except CheckpointError as exc:
        raise web.HTTPConflict(text=f"{exc}\n") from None
    return web.json_response({"pids": list(held.pids), "image_bytes": held.image_bytes})


async def _resume(request: web.Request) -> web.Response:
    """POST /v1/sessions/{sid}/resume: restore a suspended session's tree (issue 12)."""
    session = _session_of(request)
    try:
        took = await request.app[CHECKPOINTER].resume(session)
    except CriuUnavailable as exc:
        raise web.HTTPServiceUnavailable(text=f"{exc}\n") from None
    except CheckpointError as exc:
        raise web.HTTPConflict(text=f"{exc}\n") from None
    return web.json_response({"pid": session.pid, "restore_ms": round(took, 1)})


MIGRATOR: web.AppKey[Migrator] = web.AppKey("migrator", Migrator)
# s a migration's connections may live once authenticated (HTTP_LIFETIME otherwise): the
# source's /migrate call, the target's image uploads (bounded by their own stall timeouts).
MIGRATION_LIFETIME = 20 * 60.0


async def _migrate(request: web.Request) -> web.Response:
    """POST /v1/sessions/{sid}/migrate {"to": HOST:PORT, "instance": NAME, "ticket": T}."""
    session = _session_of(request)
    try:
        body = await request.json()
    except ValueError:
        body = None
    fields = [body.get(k) if isinstance(body, dict) else None for k in ("to", "instance", "ticket")]
    # Pre-copy and the page server: the agent's default (--no-migrate-fast) unless said.
    precopy = body.get("precopy") if isinstance(body, dict) else False
    pages = body.get("page_server") if isinstance(body, dict) else False
    if (
        not all(isinstance(f, str) and f for f in fields)
        or not isinstance(precopy, (bool, type(None)))
        or not isinstance(pages, (bool, type(None)))
    ):
        raise web.HTTPBadRequest(
            text='expected {"to", "instance", "ticket", "precopy"?: bool, "page_server"?: bool}\n'
        )
    to, instance, ticket = (str(f) for f in fields)
    extend_http(request.transport, MIGRATION_LIFETIME)  # a move under TCG outlasts 30 s
    try:
        done = await request.app[MIGRATOR].migrate(
            session, to, instance, ticket, precopy, page_server=pages
        )
    except CriuUnavailable as exc:
        raise web.HTTPServiceUnavailable(text=f"{exc}\n") from None
    except CheckpointError as exc:
        raise web.HTTPConflict(text=f"{exc}\n") from None
    return web.json_response(done)


def _migration_ticket(request: web.Request) -> str:
    scheme, _, ticket = request.headers.get("Authorization", "").partition(" ")
    if scheme != "DCP-Migrate" or not ticket:
        raise web.HTTPUnauthorized(text="missing migration ticket\n")
    return ticket


async def _migration_check(request: web.Request) -> web.Response:
    """POST /v1/migrations/check {"pids": [...]}: could this instance take that tree?"""
    ticket = _migration_ticket(request)
    try:
        body = await request.json()
    except ValueError:
        body = None
    try:
        request.app[MIGRATOR].check(ticket, body.get("pids") if isinstance(body, dict) else None)
        # Proven: the source's next request here may come after a long pre-dump round.
        extend_http(request.transport, MIGRATION_LIFETIME)
        await request.app[CHECKPOINTER].criu()
    except CriuUnavailable as exc:
        raise web.HTTPServiceUnavailable(text=f"{exc}\n") from None
    except CheckpointError as exc:
        raise web.HTTPConflict(text=f"{exc}\n") from None
    return web.json_response({"ok": True})


async def _migration_commit(request: web.Request) -> web.Response:
    """POST /v1/migrations/commit {"session": sid}: the source's go for a restored tree."""
    ticket = _migration_ticket(request)
    try:
        body = await request.json()
    except ValueError:
        body = None
    try:
        request.app[MIGRATOR].commit(
            ticket, body.get("session") if isinstance(body, dict) else None
        )
    except CheckpointError as exc:
        raise web.HTTPConflict(text=f"{exc}\n") from None
    return web.json_response({"running": True})


async def _migration_receive(request: web.Request) -> web.Response:
    """POST /v1/migrations: a moved session (description + zstd images), restored here."""
    ticket = _migration_ticket(request)
    try:
        request.app[MIGRATOR].tickets.authentic(ticket)  # its maker is this instance's
    except CheckpointError as exc:
        raise web.HTTPConflict(text=f"{exc}\n") from None
    extend_http(request.transport, MIGRATION_LIFETIME)
    try:
        done = await request.app[MIGRATOR].receive(ticket, request.content)
    except CriuUnavailable as exc:
        raise web.HTTPServiceUnavailable(text=f"{exc}\n") from None
    except (CheckpointError, asyncio.IncompleteReadError) as exc:
        raise web.HTTPConflict(text=f"{exc}\n") from None
    return web.json_response(done)


async def _migration_round(request: web.Request) -> web.Response:
    """POST /v1/migrations/round?session=SID&round=K: a pre-copy round's images."""
    ticket = _migration_ticket(request)
    k = request.query.get("round", "")
    try:
        request.app[MIGRATOR].tickets.authentic(ticket)
    except CheckpointError as exc:
        raise web.HTTPConflict(text=f"{exc}\n") from None
    extend_http(request.transport, MIGRATION_LIFETIME)
    try:
        done = await request.app[MIGRATOR].receive_round(
            ticket,
            request.query.get("session"),
            int(k) if k.isdigit() and len(k) < 4 else None,
            request.content,
            pages=request.query.get("pages") == "1",
        )
    except (CheckpointError, asyncio.IncompleteReadError) as exc:
        raise web.HTTPConflict(text=f"{exc}\n") from None
    return web.json_response(done)


async def _migration_pages(request: web.Request) -> web.Response:
    """POST /v1/migrations/pages?session=SID&into=pre<k>|final: a page server for a move."""
    ticket = _migration_ticket(request)
    try:
        request.app[MIGRATOR].tickets.authentic(ticket)
    except CheckpointError as exc:
        raise web.HTTPConflict(text=f"{exc}\n") from None
    # The source's next request on this connection may come after a long pre-dump round.
    extend_http(request.transport, MIGRATION_LIFETIME)
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not isinstance(sockname, tuple):
        raise web.HTTPConflict(text="no page server on a unix socket\n")
    try:
        done = await request.app[MIGRATOR].serve_pages(
            ticket, request.query.get("session"), request.query.get("into"), str(sockname[0])
        )
    except CriuUnavailable as exc:
        raise web.HTTPServiceUnavailable(text=f"{exc}\n") from None
    except (CheckpointError, OSError) as exc:
        raise web.HTTPConflict(text=f"{exc}\n") from None
    return web.json_response(done)


async def _close_migrator(app: web.Application) -> None:
    app[MIGRATOR].scratch.close()


def make_app(config: AgentConfig, service: ExecService, sampler: LoadSampler) -> web.Application:
    """The HTTP side of the agent."""
    app = web.Application()
    app[CONFIG] = config
    app[SERVICE] = service
    app[SAMPLER] = sampler
    app.router.add_get("/v1/health", _health)
    app.router.add_get("/v1/load", _load)
    app.router.add_get("/v1/sessions", _sessions)
    app[CHECKPOINTER] = Checkpointer(service)
    app.router.add_post("/v1/sessions/{sid}/checkpoint", _checkpoint)
    app.router.add_post("/v1/sessions/{sid}/suspend", _suspend)
    app.router.add_post("/v1/sessions/{sid}/resume", _resume)
    app[MIGRATOR] = Migrator(
        app[CHECKPOINTER],
        MigrationTickets(config.token, config.instance, exec_key=config.exec_key),
        config.instance,
        fast=config.migrate_fast,
    )
    app.on_cleanup.append(_close_migrator)
    app.router.add_post("/v1/sessions/{sid}/migrate", _migrate)
    app.router.add_post("/v1/migrations/check", _migration_check)
    app.router.add_post("/v1/migrations", _migration_receive)
    app.router.add_post("/v1/migrations/commit", _migration_commit)
    app.router.add_post("/v1/migrations/round", _migration_round)
    app.router.add_post("/v1/migrations/pages", _migration_pages)
    storage_routes(app, config.instance, _authorized)  # issue 14: program namespaces
    return app


class Agent:
    """The running agent: listener, sessions, optional OSS link.

    Every program runs under the instance tracer: `tracing` is the zygote
    `dcp-agent` forked before its loop (`Tracing.fork`); without one, a fresh
    zygote is exec'd.  `untraced` is for a benchmark's baseline only.
    """

    def __init__(
        self, config: AgentConfig, tracing: Tracing | None = None, *, untraced: bool = False
    ) -> None:
        self.config = config
        self.sampler = LoadSampler()
        if tracing is None and not untraced:
            tracing = Tracing.spawn(config.instance)
        self.tracing = tracing
        self.service = ExecService(
            config,
            TicketCheck(config.token, config.instance, exec_key=config.exec_key),
            tracing,
        )
        # Observers of the OSS's commands to this instance (heartbeat reply `commands`).
        self.command_handlers: list[Callable[[list[dict[str, Any]]], None]] = []
        # Issue 10 (B): execs the instance tracers place elsewhere, through the OSS.
        oss = (
            OssPlacements(config.oss_url, config.token, config.call_timeout)
            if config.oss_url
            else None
        )
        self.placer = Placer(oss)
        self.service.hooks.add(self.placer)
        # Issue 11: signals for pids forked on other instances, through the OSS.
        self.signaller = Signaller(config.instance, oss, lambda: self.service.sessions.values())
        self.service.hooks.add(self.signaller)
        self.command_handlers.append(self.signaller.on_commands)
        # Issue 13: listening sockets the instance tracers see, steered by the OSS.
        self.listeners = ListenerReporter(oss)
        self.service.hooks.add(self.listeners)
        # Issue 13 on VMs: AF_UNIX path sockets between kernels, relayed agent to agent.
        self.unix_relay = UnixRelay(config.instance, config.exec_key, oss)
        self.service.hooks.add(self.unix_relay)
        self._unauthenticated = [0]  # connections counted by their Gate
        # Limits act (issue 10): programs grouped in cgroups, the OSS's stop orders.
        self.enforcer = Enforcer(config.instance, detect(config.instance))
        self.service.hooks.add(self.enforcer)
        self.runner: web.AppRunner | None = None
        self.server: asyncio.Server | None = None
        self.address = ""
        self._criu_check: asyncio.Future[None] | None = None
        self._checkpointer: Checkpointer | None = None
        self.orders: MigrateOrders | None = None  # the OSS's migrate commands (issue 12)
        self._order_posts: list[HttpPost] = []
        # Issue 13 on VMs: the OSS's `network` commands (this instance's node states).
        self.network_orders = NetworkOrders(config.instance)
        self.command_handlers.append(self.network_orders.on_commands)
        self.storage_orders: StorageOrders | None = None
        self.failover: FailoverOrders | None = None  # periodic checkpoints, restores (issue 12)

    async def start(self) -> str:
        """Listen; return the bound HOST:PORT."""
        self.service.install()
        app = make_app(self.config, self.service, self.sampler)
        add_unix_relay(app, self.unix_relay)
        self.runner = web.AppRunner(
            app,
            access_log=None,
            keepalive_timeout=HTTP_LIFETIME / 2,
        )
        await self.runner.setup()
        # `criu check` once, in the background: the first checkpoint does not wait for it.
        self._criu_check = asyncio.ensure_future(app[CHECKPOINTER].warm())
        self._checkpointer = app[CHECKPOINTER]
        self.enforcer.suspension = Suspension(app[CHECKPOINTER])  # budget stops (issue 12)
        if self.config.oss_url:
            c = self.config
            assert c.oss_url is not None
            posts = {p: HttpPost(c.oss_url, c.token, c.call_timeout, p) for p in (TICKET, OUTCOME)}
            self._order_posts = list(posts.values())
            self.orders = MigrateOrders(
                app[MIGRATOR], lambda: list(self.service.sessions.values()), http_post(posts.get)
            )
            self.command_handlers.append(self.orders.on_commands)
            # Issue 14: the OSS relays `dcptrace --oss` runs' storage to this instance.
            storage_post = HttpPost(c.oss_url, c.token, c.call_timeout, STORAGE_OUTCOME)
            self._order_posts.append(storage_post)
            self.storage_orders = StorageOrders(app[MOUNTS], storage_post)
            self.command_handlers.append(self.storage_orders.on_commands)
            # Issue 12: periodic checkpoints to the OSS, restores on a lost instance's behalf.
            self.failover = FailoverOrders(
                app[MIGRATOR], lambda: list(self.service.sessions.values()),
                c.oss_url, c.token, c.call_timeout,
            )  # fmt: skip
            self.command_handlers.append(self.failover.on_commands)
        http = self.runner.server
        assert http is not None
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Sniffer(
                lambda gate: ExecProtocol(self.service, gate), http, self._unauthenticated
            ),
            self.config.listen_host,
            self.config.listen_port,
            reuse_address=True,
        )
        host, port = self.server.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        return self.address

    async def can_checkpoint(self) -> bool:
        """Does CRIU work here?  Told to the OSS at registration (issue 12: budget stops)."""
        return self._checkpointer is not None and await self._checkpointer.works()

    async def on_commands(self, commands: list[dict[str, Any]]) -> list[int]:
        """Commands the OSS sent this instance: every handler gets them, in order, then
        the limits enforcer carries them out; the ids done (acknowledged next beat)."""
        for handler in self.command_handlers:
            handler(commands)
        return await self.enforcer.carry_out(commands, list(self.service.sessions.values()))

    async def close(self) -> None:
        """Stop listening and kill every program still running."""
        self.service.shutdown()
        if self.orders is not None:
            await self.orders.close()
        await self.network_orders.close()
        if self.storage_orders is not None:
            await self.storage_orders.close()
        if self.failover is not None:
            await self.failover.close()
        for post in self._order_posts:
            await post.close()
        if self._criu_check is not None:
            self._criu_check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._criu_check
        self.enforcer.close()
        if self._checkpointer is not None:
            self._checkpointer.close()
        if self.server is not None:
            self.server.close()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.tracing is not None:
            self.tracing.close()
            # Reap the zygote while the loop still handles SIGCHLD: its exit
            # during the loop's own shutdown would hit a closed wakeup fd.
            deadline = asyncio.get_running_loop().time() + ZYGOTE_EXIT
            while not self.tracing.reaped() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
        await self.signaller.close()
        await self.listeners.close()
        await self.unix_relay.close()
        await self.placer.close()
