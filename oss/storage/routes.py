"""The storage service's HTTP routes: a program's storage relayed to its instances.

`dcptrace --oss` (account token) gives its program's storage spec, asks for a
mount on each instance a process of it is placed on, and at the end for every
mount to go; agents (instance tokens) report the outcome of each order
(`oss.storage.relay`).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from aiohttp import web
from pydantic import Field, StringConstraints

from oss import models as m
from oss.api import PROGRAM_PATH, Route, principal
from oss.errors import Unauthorized
from oss.service import Oss
from oss.storage.relay import StorageNotMounted

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]


class StorageSpec(m.Api):
    """A program's storage, as its instances' agents mount it (kept in the OSS's private
    store until unmounted, never logged)."""

    name: Name
    server: Annotated[str, StringConstraints(min_length=3, max_length=300)]  # HOST:PORT
    key: Annotated[str, StringConstraints(min_length=16, max_length=256)] = Field(repr=False)
    host_key: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    volumes: Annotated[int, Field(ge=1, le=64)]
    memory_capacity: Annotated[int, Field(ge=0, le=2**50)] | None = None
    disk_capacity: Annotated[int, Field(ge=0, le=2**50)] | None = None
    policy: dict[str, int | str | None] = {}


class StorageMount(m.Api):
    """Mount the program's storage on this instance (one a process of it is placed on)."""

    instance: Annotated[str, StringConstraints(min_length=1, max_length=128)]


class StorageMounted(m.Api):
    """The instances that mount the program's storage."""

    program_id: str
    instances: list[str]


class StorageUnmounted(m.Api):
    """The instances told to unmount; those that did not confirm, with why."""

    program_id: str
    failed: dict[str, str] = {}


class StorageOutcome(m.Api):
    """An agent's word on a mount or unmount order."""

    command: Annotated[int, Field(ge=1, le=2**62)]
    ok: bool
    error: Annotated[str, StringConstraints(max_length=4096)] = ""


async def h_put(oss: Oss, r: web.Request, who: Any, b: StorageSpec, q: Any) -> m.Ok:
    pid = r.match_info["program_id"]
    await oss.programs.program(principal(who).account_id, pid)  # NotFound: not yours
    await oss.storage.put(pid, b.model_dump())
    return m.Ok()


async def h_mount(oss: Oss, r: web.Request, who: Any, b: StorageMount, q: Any) -> StorageMounted:
    pid = r.match_info["program_id"]
    await oss.programs.program(principal(who).account_id, pid)
    # Only where the program runs: the key goes to no other instance.
    await oss.programs.placed_on(pid, b.instance)
    started = time.monotonic()
    try:
        await oss.storage.mount(pid, b.instance)
    except StorageNotMounted as exc:
        await oss.program_log(pid, f"storage not mounted on {b.instance}: {exc.detail}")
        raise
    took = time.monotonic() - started
    await oss.program_log(pid, f"storage mounted on {b.instance} ({took:.1f} s)")
    return StorageMounted(program_id=pid, instances=sorted(oss.storage.mounted.get(pid, ())))


async def h_delete(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> StorageUnmounted:
    pid = r.match_info["program_id"]
    await oss.programs.program(principal(who).account_id, pid)
    return StorageUnmounted(program_id=pid, failed=await oss.storage.unmount_all(pid))


Tier = Annotated[str, StringConstraints(pattern=r"^(memory|disk|net)$")]


class StorageUsageReport(m.Api):
    """The GiB-seconds per tier a run's storage server measured (billed once each)."""

    gib_seconds: dict[Tier, Annotated[float, Field(ge=0, le=1e12)]]


class StorageBilled(m.Api):
    """What the measured storage was billed (micro-units)."""

    program_id: str
    amount_micros: int


async def h_usage(
    oss: Oss, r: web.Request, who: Any, b: StorageUsageReport, q: Any
) -> StorageBilled:
    pid = r.match_info["program_id"]
    await oss.programs.program(principal(who).account_id, pid)
    amount = await oss.billing.bill_storage(pid, b.gib_seconds)
    return StorageBilled(program_id=pid, amount_micros=amount)


async def h_outcome(oss: Oss, r: web.Request, who: Any, b: StorageOutcome, q: Any) -> m.Ok:
    if not isinstance(who, str):
        raise Unauthorized("an instance token is needed")
    oss.storage.outcome(who, b.command, b.ok, b.error)
    return m.Ok()


ROUTES: tuple[Route, ...] = (
    Route(
        "PUT",
        f"{PROGRAM_PATH}/storage",
        h_put,
        "account",
        "Declare the program's storage (its server and key; kept until it is unmounted)",
        StorageSpec,
        m.Ok,
    ),
    Route(
        "POST",
        f"{PROGRAM_PATH}/storage/mounts",
        h_mount,
        "account",
        "Mount the program's storage on an instance it is placed on (waits for it)",
        StorageMount,
        StorageMounted,
    ),
    Route(
        "DELETE",
        f"{PROGRAM_PATH}/storage",
        h_delete,
        "account",
        "Unmount the program's storage everywhere (publishing open files) and forget it",
        response=StorageUnmounted,
    ),
    Route(
        "POST",
        f"{PROGRAM_PATH}/storage/usage",
        h_usage,
        "account",
        "Bill the GiB-seconds per tier the run's storage server measured",
        StorageUsageReport,
        StorageBilled,
    ),
    Route(
        "POST",
        "/v1/agents/storage/outcome",
        h_outcome,
        "agent",
        "The outcome of a mount or unmount order this instance was given",
        StorageOutcome,
        m.Ok,
    ),
)
