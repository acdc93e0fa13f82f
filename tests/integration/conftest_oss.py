"""Fixtures for the OSS integration tests (import explicitly: `from conftest_oss import ...`).

`OssServer` runs the real aiohttp app on 127.0.0.1 (ephemeral port) in a
background thread with its own event loop, over a real SQLite directory.
Tests talk to it over HTTP (`http` below, or oss.client in their own loop) and
may run coroutines on the server's loop (`srv.call`) to drive periodic duties
deterministically (metering, availability) with a controllable clock.
"""

from __future__ import annotations

import asyncio
import http.client as httpclient
import json
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from oss.compute.pool import Provider
from oss.server import make_app
from oss.service import Oss, OssConfig

T = TypeVar("T")


class Clock:
    """A settable clock (seconds); starts at a fixed epoch."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Response:
    status: int
    body: Any
    raw: bytes
    content_type: str


class OssServer:
    """A real OSS on loopback in a thread."""

    def __init__(
        self,
        data_dir: Path,
        clock: Clock | None = None,
        providers: dict[str, Provider] | None = None,
        **config: Any,
    ) -> None:
        config.setdefault("tick", 3600.0)  # duties are driven by the tests
        self.config = OssConfig(data_dir=data_dir, **config)
        self.clock = clock
        self.providers = providers
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.oss: Oss

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        kw: dict[str, Any] = {"providers": self.providers}
        if self.clock is not None:
            kw["clock"] = self.clock
        self.oss = Oss(self.config, **kw)
        self._runner = web.AppRunner(make_app(self.oss), access_log=None, shutdown_timeout=5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> OssServer:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        if self.loop.is_closed():
            return
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop)
        fut.result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def account(self, name: str, admin: bool = False, pricing_model: str = "sum") -> Account:
        """Create an account directly in the store; return its ids and token."""
        acct, user, token = self.call(
            self.oss.accounts.create_account(name, admin, pricing_model, "u")
        )
        return Account(acct["id"], user["id"], token)

    def instance(self, name: str, cpus: int = 2, pool: str | None = None) -> str:
        """Create and register an instance (as its agent would); return its token."""
        token = self.call(self.oss.mint_instance_token(name, pool))
        r = http(
            self,
            "POST",
            "/v1/agents/register",
            token,
            {
                "instance": name,
                "address": "127.0.0.1:1",
                "hostname": name,
                "cpus": cpus,
                "memory_mb": 1024,
            },
        )
        assert r.status == 200, r.body
        return token

    def http(
        self, method: str, path: str, token: str | None = None, body: Any = None, **kw: Any
    ) -> Response:
        return http(self, method, path, token, body, **kw)


@dataclass(frozen=True)
class Account:
    id: str
    user_id: str
    token: str


_NO_BODY = object()


def http(
    srv: OssServer,
    method: str,
    path: str,
    token: str | None = None,
    body: Any = _NO_BODY,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """One blocking HTTP request to the server."""
    conn = httpclient.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    data = raw
    if data is None and body is not _NO_BODY and body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        payload = resp.read()
        ctype = resp.getheader("Content-Type", "")
    finally:
        conn.close()
    parsed: Any = None
    if ctype.startswith("application/json"):
        parsed = json.loads(payload)
    return Response(resp.status, parsed, payload, ctype)


@pytest.fixture
def oss_factory(tmp_path: Path) -> Iterator[Any]:
    """Factory: start OSS servers (each in its own data dir); all stopped at teardown."""
    servers: list[OssServer] = []

    def make(
        clock: Clock | None = None,
        providers: dict[str, Provider] | None = None,
        data_dir: Path | None = None,
        **config: Any,
    ) -> OssServer:
        d = data_dir or tmp_path / f"oss{len(servers)}"
        srv = OssServer(d, clock, providers, **config).start()
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def srv(oss_factory: Any) -> OssServer:
    """One OSS with a settable clock."""
    return oss_factory(clock=Clock())
