"""The route vocabulary of the OSS HTTP API, shared by every service's routes.py.

A `Route` is one operation: method, path, handler, who may call it (`Scope`) and
its body, response and query models.  oss.server mounts every service's routes,
authenticates the caller by scope, validates the body and query, and maps errors
to statuses; a handler gets (oss, request, caller, body, query).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

from oss import models as m
from oss.accounts.store import Principal
from oss.service import Oss

PROGRAM_PATH = "/v1/programs/{program_id}"

Scope = Literal["public", "admin", "account", "agent"]

Caller = Principal | str | None  # account principal, instance name, or nobody

Result = BaseModel | Sequence[BaseModel] | web.StreamResponse

Handler = Callable[[Oss, web.Request, Any, Any, Any], Awaitable[Result]]


class NoQuery(m.Api):
    """No query parameters."""


@dataclass(frozen=True, slots=True)
class Route:
    """One API operation."""

    method: str
    path: str
    handler: Handler
    scope: Scope
    summary: str
    body: type[m.Api] | None = None
    response: type[BaseModel] | None = None
    many: bool = False  # the response is a list of `response`
    query: type[m.Api] = NoQuery
    content_type: str = "application/json"
    big_body: bool = False  # body up to OssConfig.max_body_bytes, else SMALL_BODY


def principal(who: Caller) -> Principal:
    """The account principal of an "account" or "admin" route's caller."""
    assert isinstance(who, Principal)
    return who
