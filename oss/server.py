"""The OSS HTTP API (aiohttp): one route table drives dispatch, auth and /openapi.json.

Each service declares its routes and handlers in its `routes.py` (vocabulary in
oss.api); `ROUTES` here mounts them all after the core ones (health, this document).

HTTP statuses live here only, in `STATUS` (error type -> status).  Every
failure becomes a JSON `ErrorBody`; a 500 means a bug (the fuzz test hunts
for them).  Tenant isolation: account routes pass the caller's account id to
the store, which answers NotFound (404) for another account's objects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler as AioHandler
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from oss import models as m
from oss.accounts import routes as accounts_routes
from oss.api import Caller, NoQuery, Route
from oss.billing import routes as billing_routes
from oss.compute import failover_routes
from oss.compute import routes as compute_routes
from oss.errors import (
    BudgetExhausted,
    Conflict,
    Forbidden,
    InvalidRequest,
    LeaseError,
    LimitExceeded,
    NoCapacity,
    NotFound,
    OssError,
    PayloadTooLarge,
    ProviderError,
    RequestTimeout,
    StoreError,
    Unauthorized,
    ValidationFailed,
)
from oss.ipc import routes as ipc_routes
from oss.listener import ListenerLimits
from oss.network import routes as network_routes
from oss.network import unix as unix_routes
from oss.service import Oss
from oss.storage import routes as storage_routes
from oss.telemetry import routes as telemetry_routes
from oss.ui import routes as ui_routes

log = logging.getLogger(__name__)

OSS_KEY = web.AppKey("oss", Oss)
LIMITS_KEY = web.AppKey("limits", ListenerLimits)

# The one error -> HTTP status table (most specific class first).
STATUS: tuple[tuple[type[OssError], int], ...] = (
    (PayloadTooLarge, 413),
    (RequestTimeout, 408),
    (ValidationFailed, 422),
    (InvalidRequest, 400),
    (Unauthorized, 401),
    (BudgetExhausted, 402),
    (Forbidden, 403),
    (NotFound, 404),
    (LimitExceeded, 409),
    (LeaseError, 409),
    (Conflict, 409),
    (ProviderError, 502),
    (NoCapacity, 503),
    (StoreError, 503),
)


def status_of(exc: OssError) -> int:
    """The HTTP status of an OSS error."""
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


SMALL_BODY = 64 << 10  # bytes: the body cap of every route but the few that carry bulk
INLINE_BODY = 8 << 10  # bytes: bodies up to this size are validated on the loop
MAX_ERRORS = 20  # validation errors listed in a 422 (the count says how many in all)
NO_QUERY = NoQuery()


# -- handlers (oss, request, caller, body, query) -> result -------------------


async def h_health(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> m.Ok:
    return m.Ok()


async def h_openapi(oss: Oss, r: web.Request, who: Any, b: Any, q: Any) -> web.Response:
    return web.json_response(openapi())


CORE: tuple[Route, ...] = (
    Route("GET", "/healthz", h_health, "public", "Liveness", response=m.Ok),
    Route("GET", "/openapi.json", h_openapi, "public", "This document"),
)
ROUTES: tuple[Route, ...] = (
    CORE
    + accounts_routes.ROUTES
    + billing_routes.ROUTES
    + compute_routes.ROUTES
    + failover_routes.ROUTES
    + telemetry_routes.ROUTES
    + ipc_routes.ROUTES
    + storage_routes.ROUTES
    + network_routes.ROUTES
    + unix_routes.ROUTES
    + ui_routes.ROUTES
)


def _error(
    status: int, code: str, message: str, fields: dict[str, Any] | None = None
) -> web.Response:
    body = m.ErrorBody(error=code, message=message, fields=fields or {})
    return web.Response(status=status, body=body.model_dump_json(), content_type="application/json")


def _bearer(r: web.Request) -> str:
    h = r.headers.get("Authorization", "")
    scheme, _, token = h.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send Authorization: Bearer <token>")
    return token.strip()


def _validation_fields(e: ValidationError) -> dict[str, Any]:
    return {
        "errors": [
            {"loc": [str(x) for x in err["loc"]], "msg": err["msg"], "type": err["type"]}
            for err in e.errors(include_url=False, include_input=False, include_context=False)[
                :MAX_ERRORS
            ]
        ]
    }


def _parse_body(model: type[m.Api], raw: bytes) -> m.Api:
    """The body as `model`, strictly: "5" or true is not an integer, 1 is not a string.

    JSON-mode strict validation still takes enum values as their strings.  Text
    pydantic's parser refuses is parsed again by Python's to say why (400), and
    text only Python's accepts (a lone surrogate) is validated from its value.
    """
    text = raw if raw.strip() else b"{}"
    try:
        return model.model_validate_json(text, strict=True)
    except ValidationError as exc:
        if not any(e["type"] == "json_invalid" for e in exc.errors()):
            raise ValidationFailed(
                f"{exc.error_count()} error(s) in the body", **_validation_fields(exc)
            ) from exc
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc2:
            raise InvalidRequest(f"body is not valid JSON: {exc2}") from exc2
        except RecursionError as exc2:
            raise InvalidRequest("body is nested too deeply") from exc2
        try:
            model.model_validate(data)
        except ValidationError as exc2:
            exc = exc2
        raise ValidationFailed(
            f"{exc.error_count()} error(s) in the body", **_validation_fields(exc)
        ) from exc


async def _read_body(r: web.Request, cap: int, timeout: float) -> bytes:
    """The request body, refused (413) past `cap` bytes and (408) past `timeout` seconds."""
    if r.content_length is not None and r.content_length > cap:
        raise PayloadTooLarge(f"limit is {cap} bytes")
    if r.content.is_eof():  # all of it came with the headers: no wait, so no timer
        raw = r.content.read_nowait()
        if len(raw) > cap:
            raise PayloadTooLarge(f"limit is {cap} bytes")
        return raw
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await r.content.readany():
                size += len(chunk)
                if size > cap:
                    raise PayloadTooLarge(f"limit is {cap} bytes")
                parts.append(chunk)
    except TimeoutError as exc:
        raise RequestTimeout(f"body not received within {timeout:g} s") from exc
    return b"".join(parts)


def _dispatch(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    no_query = route.query is NoQuery

    async def handle(r: web.Request) -> web.StreamResponse:
        oss = r.app[OSS_KEY]
        who: Caller = None
        if route.scope in ("account", "admin"):
            who = await oss.authenticate(_bearer(r))
            if route.scope == "admin" and not who.admin:
                raise Forbidden("admin account required")
        elif route.scope == "agent":
            who = await oss.authenticate_instance(_bearer(r), None)
        body: Any = None
        if route.body is not None:
            # Read only now, after the token checked out, and never more than the cap.
            cap = oss.config.max_body_bytes if route.big_body else SMALL_BODY
            raw = await _read_body(r, cap, r.app[LIMITS_KEY].body_timeout)
            if len(raw) <= INLINE_BODY:
                body = _parse_body(route.body, raw)
            else:  # a big body takes milliseconds to validate: not on the loop
                body = await asyncio.to_thread(_parse_body, route.body, raw)
        try:
            if no_query and not r.query_string:
                query: Any = NO_QUERY  # nothing to validate: most requests (issue 15)
            else:
                query = route.query.model_validate(dict(r.query))
        except ValidationError as exc:
            raise ValidationFailed(
                f"{exc.error_count()} error(s) in the query", **_validation_fields(exc)
            ) from exc
        out = await route.handler(oss, r, who, body, query)
        if isinstance(out, web.StreamResponse):
            return out
        if isinstance(out, BaseModel):
            text = out.model_dump_json()
        else:
            text = "[" + ",".join(x.model_dump_json() for x in out) + "]"
        return web.Response(text=text, content_type="application/json")

    return handle


@web.middleware
async def _errors(request: web.Request, handler: AioHandler) -> web.StreamResponse:
    t0 = time.perf_counter()
    route = (
        request.match_info.route.resource.canonical
        if request.match_info.route.resource
        else "unmatched"
    )
    try:
        return await handler(request)
    except OssError as exc:
        resp = _error(status_of(exc), exc.code, exc.message, _jsonable(exc.fields))
        if not request.content.at_eof():
            # A refused body is not drained: close rather than read what nobody wants.
            resp.force_close()
        return resp
    except web.HTTPRequestEntityTooLarge as exc:
        return _error(413, PayloadTooLarge.code, f"{PayloadTooLarge().message}: {exc.text}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, "http_error", exc.reason)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "internal", "internal error (a bug: see the OSS log)")
    finally:
        request.app[OSS_KEY].metrics.observe_api(route, time.perf_counter() - t0)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(d)
        return d
    except (TypeError, ValueError):
        return {k: str(v) for k, v in d.items()}


def make_app(
    oss: Oss,
    *,
    manage: bool = True,
    limits: ListenerLimits | None = None,
    scopes: tuple[str, ...] | None = None,
) -> web.Application:
    """The aiohttp application; with `manage`, it starts and closes `oss` with the app.

    `scopes` keeps only the routes of those scopes (a `dcptrace --instances` run
    serves its agents' routes alone: `oss.local.PrivateOss`).
    """
    app = web.Application(client_max_size=oss.config.max_body_bytes, middlewares=[_errors])
    app[OSS_KEY] = oss
    app[LIMITS_KEY] = limits or ListenerLimits()
    for route in ROUTES:
        if scopes is None or route.scope in scopes:
            app.router.add_route(route.method, route.path, _dispatch(route))
    if manage:

        async def lifecycle(app: web.Application) -> Any:
            await oss.start()
            yield
            await oss.close()

        app.cleanup_ctx.append(lifecycle)
    return app


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document, generated from the route table and the models."""
    models: list[type[BaseModel]] = [m.ErrorBody]
    for rt in ROUTES:
        for x in (rt.body, rt.response):
            if x is not None and x not in models:
                models.append(x)
    keyed, top = models_json_schema(
        [(x, "validation") for x in models], ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    ref = {x: keyed[(x, "validation")] for x in models}
    paths: dict[str, Any] = {}
    for rt in ROUTES:
        op: dict[str, Any] = {
            "summary": rt.summary,
            "operationId": rt.method.lower()
            + re.sub(r"[^a-z0-9]+", "_", rt.path.lower()).rstrip("_"),
            "x-scope": rt.scope,
            "responses": {
                "default": {
                    "description": "error",
                    "content": {"application/json": {"schema": ref[m.ErrorBody]}},
                }
            },
        }
        if rt.response is not None:
            schema = ref[rt.response]
            if rt.many:
                schema = {"type": "array", "items": schema}
            op["responses"]["200"] = {
                "description": "ok",
                "content": {"application/json": {"schema": schema}},
            }
        else:
            op["responses"]["200"] = {"description": "ok", "content": {rt.content_type: {}}}
        if rt.scope != "public":
            op["security"] = [{"bearer": []}]
        params: list[dict[str, Any]] = [
            {"name": seg[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for seg in rt.path.split("/")
            if seg.startswith("{")
        ]
        qschema = rt.query.model_json_schema()
        for name, prop in qschema.get("properties", {}).items():
            params.append({"name": name, "in": "query", "required": False, "schema": prop})
        if params:
            op["parameters"] = params
        if rt.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref[rt.body]}},
            }
        paths.setdefault(rt.path, {})[rt.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "DCP operating system service", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
