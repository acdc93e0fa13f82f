"""Typed async client for the OSS API (used by `dcptrace --oss URL` and by agents).

    async with OssClient(url, token) as oss:
        prog = await oss.submit(ProgramSubmit(argv=["/bin/true"]))
        placed = await oss.place(prog.id, processes=1)

Errors come back as the same `OssError` subclasses the server raised (mapped
back from the JSON `error` code), each call under `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel

from oss import errors
from oss import models as m

T = TypeVar("T", bound=BaseModel)

_BY_CODE: dict[str, type[errors.OssError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidRequest,
        errors.ValidationFailed,
        errors.PayloadTooLarge,
        errors.Unauthorized,
        errors.Forbidden,
        errors.NotFound,
        errors.Conflict,
        errors.BudgetExhausted,
        errors.NoCapacity,
        errors.ProviderError,
        errors.StoreError,
        errors.LeaseError,
        errors.LimitExceeded,
    )
}


class ApiError(errors.OssError):
    """The OSS answered with an error this client does not know."""

    code = "api_error"


class Unreachable(errors.OssError):
    """The OSS could not be reached (connection failed, reset or timed out)."""

    code = "unreachable"


class OssClient:
    """One API session (connection pool) with one bearer token."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._session = session
        self._own = session is None

    async def __aenter__(self) -> OssClient:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client opened it."""
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: BaseModel | dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON or raise the server's error type."""
        if self._session is None:
            await self.__aenter__()
        assert self._session is not None
        data = None
        if body is not None:
            data = (
                body.model_dump_json(exclude_unset=True)
                if isinstance(body, BaseModel)
                else json.dumps(body)
            )
        headers = {"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"}
        q = {
            k: str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in (params or {}).items()
            if v is not None
        }
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session.request(
                    method, self.base_url + path, data=data, headers=headers, params=q
                ) as resp:
                    raw = await resp.read()
                    status, ctype = resp.status, resp.content_type
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Unreachable(f"{method} {path}: {exc!r}") from exc
        if status >= 400:
            raise _error(status, raw)
        if ctype == "application/json":
            return json.loads(raw)
        return raw.decode()

    async def _get(
        self, model: type[T], method: str, path: str, body: Any = None, params: Any = None
    ) -> T:
        return model.model_validate(await self.request(method, path, body, params))

    async def _list(self, model: type[T], path: str, params: Any = None) -> list[T]:
        raw = await self.request("GET", path, None, params)
        return [model.model_validate(x) for x in raw]

    # -- programs --------------------------------------------------------------

    async def submit(self, spec: m.ProgramSubmit) -> m.Program:
        """Submit a program execution."""
        return await self._get(m.Program, "POST", "/v1/programs", spec)

    async def programs(self, state: str | None = None, limit: int = 100) -> list[m.Program]:
        """The account's programs, newest first."""
        return await self._list(m.Program, "/v1/programs", {"state": state, "limit": limit})

    async def program(self, program_id: str) -> m.Program:
        """Inspect a program."""
        return await self._get(m.Program, "GET", f"/v1/programs/{program_id}")

    async def cancel(self, program_id: str) -> m.Program:
        """Cancel a program."""
        return await self._get(m.Program, "POST", f"/v1/programs/{program_id}/cancel")

    async def resume(self, program_id: str) -> m.Program:
        """Continue a program suspended at its hard budget (issue 12)."""
        return await self._get(m.Program, "POST", f"/v1/programs/{program_id}/resume")

    async def migrate(self, program_id: str, to: str, pid: int | None = None) -> m.MigrateResult:
        """Move a running process tree of the program (all of them without `pid`) to `to`."""
        return await self._get(
            m.MigrateResult,
            "POST",
            f"/v1/programs/{program_id}/migrate",
            m.MigrateRequest(to=to, pid=pid),
        )

    async def drain(self, instance: str) -> m.DrainResult:
        """Move every program off an instance, then release it (admin)."""
        return await self._get(m.DrainResult, "POST", f"/v1/instances/{instance}/drain")

    async def finish(
        self, program_id: str, exit_status: int | None, signal: int | None = None
    ) -> m.Program:
        """Report that the program ended."""
        body = m.ProgramFinish(exit_status=exit_status, signal=signal)
        return await self._get(m.Program, "POST", f"/v1/programs/{program_id}/finish", body)

    async def place(
        self,
        program_id: str,
        processes: int = 1,
        avoid: list[str] | None = None,
        exec_as: dict[str, Any] | None = None,
    ) -> m.PlacementResult:
        """Ask where new processes of the program run (with exec tickets where possible)."""
        spec: dict[str, Any] = {"processes": processes}
        if avoid:
            spec["avoid"] = avoid
        if exec_as is not None:
            spec["exec_as"] = m.ExecIdentity(**exec_as)
        body = m.PlacementRequest(**spec)
        return await self._get(
            m.PlacementResult, "POST", f"/v1/programs/{program_id}/placements", body
        )

    async def release(self, program_id: str, instance: str, processes: int = 1) -> None:
        """Processes of the program on an instance ended."""
        body = m.ReleaseRequest(instance=instance, processes=processes)
        await self.request("POST", f"/v1/programs/{program_id}/release", body)

    async def signal(
        self, program_id: str, pid: int, sig: int, thread: bool = False, sender: int = 0
    ) -> m.SignalQueued:
        """Send `sig` to the program's `pid` forked on one of its instances (issue 11;
        `thread`: a thread's id, which alone gets it)."""
        body = m.SignalRequest(pid=pid, signal=sig, thread=thread, sender=sender)
        data = await self.request("POST", f"/v1/programs/{program_id}/signals", body)
        return m.SignalQueued.model_validate(data)

    async def append_logs(self, program_id: str, lines: list[m.LogLineIn]) -> None:
        """Append stdout/stderr/log lines (durable when this returns)."""
        await self.request("POST", f"/v1/programs/{program_id}/logs", m.LogAppend(lines=lines))

    async def logs(self, program_id: str, stream: str | None = None, **filters: Any) -> m.LogPage:
        """Read the program's consolidated log (or one stream of it)."""
        path = f"/v1/programs/{program_id}/" + (
            stream if stream in ("stdout", "stderr") else "logs"
        )
        params = dict(filters)
        if stream in ("log", "event"):
            params["stream"] = stream
        return await self._get(m.LogPage, "GET", path, None, params)

    async def follow(
        self, program_id: str, stream: str | None = None, **filters: Any
    ) -> AsyncIterator[m.LogLineOut]:
        """Stream the program's log lines until it ends (`filters`: instance, since)."""
        if self._session is None:
            await self.__aenter__()
        assert self._session is not None
        path = f"/v1/programs/{program_id}/" + (
            stream if stream in ("stdout", "stderr") else "logs"
        )
        params = {"follow": "true", **{k: str(v) for k, v in filters.items() if v is not None}}
        if stream in ("log", "event"):
            params["stream"] = stream
        async with self._session.get(
            self.base_url + path,
            params=params,
            headers={"Authorization": f"Bearer {self._token}"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout),
        ) as resp:
            if resp.status >= 400:
                raise _error(resp.status, await resp.read())
            async for line in resp.content:
                if line.strip():
                    yield m.LogLineOut.model_validate_json(line)

    async def processes(
        self, program_id: str, final_wait: float = 0.0, expect: int = 0
    ) -> m.ProcessList:
        """The program's processes with their measured usage (waiting up to `final_wait`
        seconds for `expect` of them to be recorded and every one to have its final
        figures)."""
        params = {"final_wait": final_wait, "expect": expect} if final_wait else None
        return await self._get(
            m.ProcessList, "GET", f"/v1/programs/{program_id}/processes", None, params
        )

    async def report_metrics(self, program_id: str, report: m.MetricsReport) -> None:
        """Add counter increments for a program."""
        await self.request("POST", f"/v1/programs/{program_id}/metrics", report)

    async def program_metrics(self, program_id: str) -> m.Counters:
        """A program's counters."""
        return await self._get(m.Counters, "GET", f"/v1/programs/{program_id}/metrics")

    async def billing(self, program_id: str | None = None) -> m.Billing:
        """Billing records of the account (or one program)."""
        path = f"/v1/programs/{program_id}/billing" if program_id else "/v1/billing"
        return await self._get(m.Billing, "GET", path)

    # -- accounts, limits, policies -------------------------------------------

    async def create_account(self, body: m.AccountCreate) -> m.AccountCreated:
        """Create an account (admin token)."""
        return await self._get(m.AccountCreated, "POST", "/v1/accounts", body)

    async def create_user(self, name: str) -> m.User:
        """Add a user to the account."""
        return await self._get(m.User, "POST", "/v1/users", m.UserCreate(name=name))

    async def create_token(self, user_id: str | None = None, label: str = "") -> m.TokenCreated:
        """Mint a token."""
        return await self._get(
            m.TokenCreated, "POST", "/v1/tokens", m.TokenCreate(user_id=user_id, label=label)
        )

    async def set_limits(
        self, limits: m.LimitsBody, *, user_id: str | None = None, program_id: str | None = None
    ) -> None:
        """Set account (default), user or program limits."""
        path = (
            f"/v1/users/{user_id}/limits"
            if user_id
            else f"/v1/programs/{program_id}/limits"
            if program_id
            else "/v1/limits"
        )
        await self.request("PUT", path, limits)

    async def set_policies(self, policies: m.Policies) -> None:
        """Set the account's default policies."""
        await self.request("PUT", "/v1/policies", policies)

    # -- instances and pools ---------------------------------------------------

    async def instances(self) -> list[m.Instance]:
        """Instances visible to the account."""
        return await self._list(m.Instance, "/v1/instances")

    async def instance(self, name: str) -> m.Instance:
        """Inspect an instance."""
        return await self._get(m.Instance, "GET", f"/v1/instances/{name}")

    async def create_instance(self, name: str, pool: str | None = None) -> str:
        """Create an instance credential (admin); returns the instance token."""
        res = await self._get(
            m.InstanceToken, "POST", "/v1/instances", m.InstanceCreate(name=name, pool=pool)
        )
        return res.token

    async def put_instance_type(self, t: m.InstanceTypeBody) -> None:
        """Create an instance type (admin)."""
        await self.request("PUT", "/v1/instance-types", t)

    async def put_pool(self, p: m.PoolCreate) -> m.Pool:
        """Create or resize a pool (admin)."""
        return await self._get(m.Pool, "PUT", "/v1/pools", p)

    async def pools(self) -> list[m.Pool]:
        """List pools."""
        return await self._list(m.Pool, "/v1/pools")

    # -- agents (instance token) -----------------------------------------------

    async def register(self, body: m.AgentRegister) -> m.AgentRegistered:
        """Agent registration."""
        return await self._get(m.AgentRegistered, "POST", "/v1/agents/register", body)

    async def heartbeat(self, body: m.AgentHeartbeat) -> None:
        """Agent heartbeat."""
        await self.request("POST", "/v1/agents/heartbeat", body)

    async def lease(self, name: str, ttl: float = 10.0) -> m.LeaseOut:
        """Acquire or renew a lease for this instance (LeaseError: held by another)."""
        return await self._get(
            m.LeaseOut, "POST", "/v1/agents/leases/acquire", m.LeaseAcquire(name=name, ttl=ttl)
        )

    async def release_lease(self, name: str, fencing: int) -> None:
        """Release this instance's lease."""
        await self.request(
            "POST", "/v1/agents/leases/release", m.LeaseRef(name=name, fencing=fencing)
        )

    async def validate_lease(self, name: str, fencing: int) -> None:
        """LeaseError unless `fencing` is the current token for `name`."""
        await self.request(
            "POST", "/v1/agents/leases/validate", m.LeaseRef(name=name, fencing=fencing)
        )


def _error(status: int, raw: bytes) -> errors.OssError:
    """Rebuild the server's error type (str(exc): its message; .status: the HTTP status)."""
    try:
        body = m.ErrorBody.model_validate_json(raw)
        code, message, fields = body.error, body.message, dict(body.fields)
    except ValueError:
        code, message, fields = "http_error", raw.decode(errors="replace")[:500], {}
    cls = _BY_CODE.get(code, ApiError)
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.detail = message
    exc.fields = fields
    exc.status = status  # type: ignore[attr-defined]
    return exc
