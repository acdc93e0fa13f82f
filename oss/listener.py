"""The OSS's TCP listener: bounded connections, header and idle deadlines.

aiohttp bounds the size of a request line and headers, and closes a
keep-alive connection idle for `keepalive_timeout`, but it has no deadline
for a client to finish sending its headers: a client sending one header byte
a second (slowloris) holds its connection as long as it likes.  `GuardedSite`
wraps aiohttp's protocol factory: every connection must complete the headers
of its first request within `header_timeout` (later requests on a keep-alive
connection are bounded by the idle timeout, which aiohttp re-arms after each
response), and connections beyond `max_connections` in total or
`max_connections_per_peer` from one address are closed on arrival.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

HEADERS_END = b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """Bounds on what one client may hold of the OSS listener (seconds, counts, bytes)."""

    header_timeout: float = 10.0  # connect -> first request's headers complete
    idle_timeout: float = 30.0  # keep-alive connection without a request
    body_timeout: float = 30.0  # headers complete -> body received (checked by the API)
    linger_timeout: float = 0.5  # a refused request's unread body is discarded this long
    max_connections: int = 2048  # open connections in total
    max_connections_per_peer: int = 256  # open connections from one address
    max_line_size: int = 8190  # request line (URL) bytes; longer: 400 without a trace
    max_field_size: int = 8190  # one header's bytes
    max_headers: int = 64  # header count

    def __post_init__(self) -> None:
        for name in ("header_timeout", "idle_timeout", "body_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_connections", "max_connections_per_peer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def runner_args(self) -> dict[str, Any]:
        """The keyword arguments these limits give `web.AppRunner` (its request handlers)."""
        return {
            "keepalive_timeout": self.idle_timeout,
            # After refusing a body (401, 413) aiohttp reads and discards the rest so the
            # client sees the reply rather than a reset; for this long only, then closes.
            "lingering_time": self.linger_timeout,
            "max_line_size": self.max_line_size,
            "max_field_size": self.max_field_size,
            "max_headers": self.max_headers,
            "logger": ProtocolLog(logging.getLogger("aiohttp.server"), {}),
        }


class ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's connection logger, minus tracebacks for requests it refused as malformed.

    aiohttp logs a request it cannot parse (a 100 KB URL, a bad header) with
    `logger.exception`: a traceback at ERROR for the client's mistake.  That is
    one line at INFO here; real server errors keep their traceback.
    """

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        """Log a client's malformed request in one line, anything else with its traceback."""
        if isinstance(exc_info, HttpProcessingError) and 400 <= exc_info.code < 500:
            self.info(
                "%s: refused %s (%d)",
                str(msg) % args if args else msg,
                type(exc_info).__name__,
                exc_info.code,
            )
            return
        super().exception(msg, *args, exc_info=exc_info, **kw)


class ConnectionGuard:
    """A protocol factory around aiohttp's: counts connections and arms the header deadline."""

    def __init__(self, inner: web.Server, limits: ListenerLimits) -> None:
        self._inner = inner
        self.limits = limits
        self.open = 0
        self.per_peer: Counter[str] = Counter()
        self.refused = 0  # connections closed on arrival (over a cap)
        self.timed_out = 0  # connections closed for not finishing their headers

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self, self._inner())


class _Guarded(asyncio.Protocol):
    """Forwards to aiohttp's handler until the connection goes over a bound."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._peer = ""
        self._admitted = False
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # last bytes seen, to find the end of the headers across reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: another loop's TCP transport (uvloop's) is no
        # asyncio.Transport subclass.
        transport = cast(asyncio.Transport, transport)
        g = self._guard
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        if g.open >= g.limits.max_connections or (
            g.per_peer[self._peer] >= g.limits.max_connections_per_peer
        ):
            g.refused += 1
            transport.abort()
            return
        self._admitted = True
        self._transport = transport
        g.open += 1
        g.per_peer[self._peer] += 1
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(g.limits.header_timeout, self._headers_late)
        self._inner.connection_made(transport)

    def _headers_late(self) -> None:
        self._deadline = None
        self._guard.timed_out += 1
        log.debug("closing a connection from %s: headers not complete in time", self._peer)
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:
            seen = self._tail + data
            if HEADERS_END in seen:
                self._deadline.cancel()
                self._deadline = None
                self._tail = b""
            else:
                self._tail = seen[-(len(HEADERS_END) - 1) :]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        g = self._guard
        g.open -= 1
        g.per_peer[self._peer] -= 1
        if g.per_peer[self._peer] <= 0:
            del g.per_peer[self._peer]
        self._transport = None
        self._inner.connection_lost(exc)


class GuardedSite(web.TCPSite):
    """A TCP site whose connections go through a `ConnectionGuard`."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, limits: ListenerLimits, **kw: Any
    ) -> None:
        super().__init__(runner, host, port, **kw)
        self._limits = limits
        self.guard: ConnectionGuard | None = None

    async def start(self) -> None:
        """Listen, handing each connection to aiohttp through the guard."""
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(server, self._limits)
        self._server = await asyncio.get_running_loop().create_server(
            self.guard,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


class GuardedSockSite(web.SockSite):
    """A site on a ready listening socket whose connections go through a `ConnectionGuard`."""

    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, limits: ListenerLimits, **kw: Any
    ) -> None:
        super().__init__(runner, sock, **kw)
        self._limits = limits
        self.guard: ConnectionGuard | None = None

    async def start(self) -> None:
        """Serve the socket, handing each connection to aiohttp through the guard."""
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(server, self._limits)
        self._server = await asyncio.get_running_loop().create_server(
            self.guard, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog
        )
