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
import hmac
import os
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

from vmagent.config import AgentConfig
from vmagent.exec.server import HTTP_LIFETIME, ExecProtocol, ExecService, Sniffer
from vmagent.exec.tickets import TicketCheck
from vmagent.load import LoadSampler
from vmagent.trace.enforce import Enforcer, detect
from vmagent.trace.placer import OssPlacements, Placer
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


def make_app(config: AgentConfig, service: ExecService, sampler: LoadSampler) -> web.Application:
    """The HTTP side of the agent."""
    app = web.Application()
    app[CONFIG] = config
    app[SERVICE] = service
    app[SAMPLER] = sampler
    app.router.add_get("/v1/health", _health)
    app.router.add_get("/v1/load", _load)
    app.router.add_get("/v1/sessions", _sessions)
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
        self._unauthenticated = [0]  # connections counted by their Gate
        # Limits act (issue 10): programs grouped in cgroups, the OSS's stop orders.
        self.enforcer = Enforcer(config.instance, detect(config.instance))
        self.service.hooks.add(self.enforcer)
        self.runner: web.AppRunner | None = None
        self.server: asyncio.Server | None = None
        self.address = ""

    async def start(self) -> str:
        """Listen; return the bound HOST:PORT."""
        self.service.install()
        self.runner = web.AppRunner(
            make_app(self.config, self.service, self.sampler),
            access_log=None,
            keepalive_timeout=HTTP_LIFETIME / 2,
        )
        await self.runner.setup()
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

    async def on_commands(self, commands: list[dict[str, Any]]) -> list[int]:
        """Commands the OSS sent this instance: every handler gets them, in order, then
        the limits enforcer carries them out; the ids done (acknowledged next beat)."""
        for handler in self.command_handlers:
            handler(commands)
        return await self.enforcer.carry_out(commands, list(self.service.sessions.values()))

    async def close(self) -> None:
        """Stop listening and kill every program still running."""
        self.service.shutdown()
        self.enforcer.close()
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
        await self.placer.close()
