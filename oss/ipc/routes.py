"""The IPC service's HTTP routes: the agents' leases (locking service) and signals."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from oss import models as m
from oss.api import Route, principal
from oss.ipc import signals
from oss.service import Oss


async def h_lease_acquire(
    oss: Oss, r: web.Request, who: Any, b: m.LeaseAcquire, q: Any
) -> m.LeaseOut:
    lease = await oss.locks.acquire(b.name, str(who), b.ttl)
    return m.LeaseOut(
        name=lease.name, holder=lease.holder, fencing=lease.fencing, expires=lease.expires
    )


async def h_lease_release(oss: Oss, r: web.Request, who: Any, b: m.LeaseRef, q: Any) -> m.Ok:
    await oss.locks.release_token(b.name, str(who), b.fencing)
    return m.Ok()


async def h_lease_validate(oss: Oss, r: web.Request, who: Any, b: m.LeaseRef, q: Any) -> m.Ok:
    await oss.locks.validate(b.name, b.fencing)
    return m.Ok()


async def h_agent_signal(
    oss: Oss, r: web.Request, who: Any, b: m.SignalRequest, q: Any
) -> m.SignalQueued:
    """A signal for a pid forked on another instance of the program (`oss.ipc.signals`)."""
    sent = await signals.send(oss, r.match_info["program_id"], str(who), b)
    return m.SignalQueued(instances=sent)


async def h_signal(
    oss: Oss, r: web.Request, who: Any, b: m.SignalRequest, q: Any
) -> m.SignalQueued:
    """The program's home signals a pid forked on one of its instances."""
    account = principal(who).account_id
    sent = await signals.send_from_home(oss, account, r.match_info["program_id"], b)
    return m.SignalQueued(instances=sent)


ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/agents/leases/acquire",
        h_lease_acquire,
        "agent",
        "Acquire or renew a lease (409 if held)",
        m.LeaseAcquire,
        m.LeaseOut,
    ),
    Route(
        "POST",
        "/v1/agents/leases/release",
        h_lease_release,
        "agent",
        "Release a lease",
        m.LeaseRef,
        m.Ok,
    ),
    Route(
        "POST",
        "/v1/agents/leases/validate",
        h_lease_validate,
        "agent",
        "Check a fencing token is current (409 if stale)",
        m.LeaseRef,
        m.Ok,
    ),
    Route(
        "POST",
        "/v1/agents/programs/{program_id}/signals",
        h_agent_signal,
        "agent",
        "Signal a pid of a program the instance runs, wherever it was forked (404 if not)",
        m.SignalRequest,
        m.SignalQueued,
    ),
    Route(
        "POST",
        "/v1/programs/{program_id}/signals",
        h_signal,
        "account",
        "Signal a pid forked on an instance of the program (404 if it runs on none)",
        m.SignalRequest,
        m.SignalQueued,
    ),
)
