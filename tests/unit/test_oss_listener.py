"""The listener guard's bookkeeping: header deadline across reads, connection caps."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oss.listener import ConnectionGuard, ListenerLimits


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 1234) if name == "peername" else default

    def abort(self) -> None:
        self.aborted = True


class FakeHandler(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.made = self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def _guard(**kw: Any) -> ConnectionGuard:
    return ConnectionGuard(FakeHandler, ListenerLimits(**kw))  # type: ignore[arg-type]


def test_headers_split_across_reads_disarm_the_deadline() -> None:
    async def go() -> tuple[bool, bool, bytes]:
        g = _guard(header_timeout=0.05)
        p, t = g(), FakeTransport("10.0.0.1")
        p.connection_made(t)
        for piece in (b"GET / HTTP/1.1\r\nHost: x\r", b"\n\r", b"\n"):
            p.data_received(piece)
        await asyncio.sleep(0.1)
        slow, t2 = g(), FakeTransport("10.0.0.1")
        slow.connection_made(t2)
        slow.data_received(b"GET / HTTP/1.1\r\nX: ")
        await asyncio.sleep(0.1)
        return t.aborted, t2.aborted, p._inner.data  # type: ignore[attr-defined]

    complete_aborted, slow_aborted, forwarded = asyncio.run(go())
    assert not complete_aborted and slow_aborted
    assert forwarded == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def test_connections_over_a_cap_are_closed_on_arrival_and_counted_back() -> None:
    async def go() -> None:
        g = _guard(max_connections=3, max_connections_per_peer=2)
        a = [(g(), FakeTransport("10.0.0.1")) for _ in range(3)]
        for p, t in a:
            p.connection_made(t)
        assert [t.aborted for _, t in a] == [False, False, True]
        b, tb = g(), FakeTransport("10.0.0.2")
        b.connection_made(tb)
        c, tc = g(), FakeTransport("10.0.0.3")
        c.connection_made(tc)
        assert not tb.aborted and tc.aborted  # 3 in total
        a[0][0].connection_lost(None)
        a[2][0].connection_lost(None)  # a refused one gives nothing back
        assert g.open == 2 and g.per_peer == {"10.0.0.1": 1, "10.0.0.2": 1}
        d, td = g(), FakeTransport("10.0.0.1")
        d.connection_made(td)
        assert not td.aborted and g.refused == 2

    asyncio.run(go())


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="header_timeout"):
        ListenerLimits(header_timeout=0)
    with pytest.raises(ValueError, match="max_connections_per_peer"):
        ListenerLimits(max_connections_per_peer=0)
