"""The agent's link to the OSS: register, then heartbeat with load (CONTRACTS.md).

Any failure (OSS down, restarted, 5xx, timeout) leads back to registering
again after an exponential backoff (0.5 s doubling to 30 s), so the link
survives a restart of either side.  Heartbeats are state, not events: a lost
heartbeat is replaced by the next one, whose `seq` keeps increasing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp

from vmagent.errors import AgentError
from vmagent.load import Load

log = logging.getLogger(__name__)


class OssRefused(AgentError):
    """The OSS rejected this instance's credential (401): retrying will not help soon."""


UNIX = "unix:"  # an OSS URL `unix:/path/oss.sock`: a dcptrace run's own OSS (issue 10)


def http_of(url: str) -> tuple[str, aiohttp.BaseConnector | None]:
    """(base URL for requests, connector) of an OSS URL, `http(s)://...` or `unix:PATH`."""
    if url.startswith(UNIX):
        return "http://oss", aiohttp.UnixConnector(path=url[len(UNIX) :])
    return url.rstrip("/"), None


def advertised_address(listen_host: str, port: int, oss_url: str) -> str:
    """The address the OSS should use for us: the local IP on the route to the OSS."""
    if listen_host not in ("0.0.0.0", "", "::"):
        return f"{listen_host}:{port}"
    if oss_url.startswith(UNIX):
        return f"127.0.0.1:{port}"  # an OSS on this host (agents in a netns listen on their IP)
    host = urlsplit(oss_url).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # UDP connect sends nothing; it only picks a route
        return f"{probe.getsockname()[0]}:{port}"


class OssLink:
    """Registers and heartbeats until cancelled."""

    def __init__(
        self,
        url: str,
        instance: str,
        token: str,
        address: str,
        sample: Callable[[], Load],
        memory_mb: int,
        timeout: float = 5.0,
        exec_key: str | None = None,
        on_commands: Callable[[list[dict[str, object]]], Awaitable[list[int]]] | None = None,
        can_checkpoint: Callable[[], Awaitable[bool]] | None = None,
        speed: Callable[[], Awaitable[float]] | None = None,
    ) -> None:
        # Told at registration (issue 12): the CPU score the optimizer compares.
        self.speed = speed
        # Told at registration (issue 12): a hard budget suspends programs here if true.
        self.can_checkpoint = can_checkpoint
        self.oss_url = url
        self.url = url.rstrip("/")
        # The OSS's orders in heartbeat replies (limits act); their ids go back as `done`.
        self.on_commands = on_commands
        self._done: list[int] = []
        self.exec_key = exec_key  # the same key on every (re-)registration of this process
        self.instance = instance
        self.address = address
        self.sample = sample
        self.memory_mb = memory_mb
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {token}"}
        self.seq = 0
        self.registered = asyncio.Event()
        self.heartbeats_sent = 0

    async def _post(self, http: aiohttp.ClientSession, path: str, body: dict) -> dict:
        async with asyncio.timeout(self.timeout):
            async with http.post(self.url + path, json=body, headers=self.headers) as resp:
                if resp.status == 401:
                    raise OssRefused(f"OSS refused the token of instance {self.instance}")
                resp.raise_for_status()
                data = await resp.json()
        if not isinstance(data, dict):
            raise AgentError(f"OSS answered {path} with a non-object")
        return data

    def register_body(self) -> dict[str, object]:
        """The body of POST /v1/agents/register (CONTRACTS.md, plus the optional exec key)."""
        body: dict[str, object] = {
            "instance": self.instance,
            "address": self.address,
            "hostname": socket.gethostname(),
            "cpus": os.cpu_count() or 1,
            "memory_mb": self.memory_mb,
        }
        if self.exec_key:
            body["exec_key"] = self.exec_key
        return body

    async def _obey(self, commands: object) -> None:
        """Carry out the reply's commands (bounded); they are reported done next beat."""
        if not commands or self.on_commands is None:
            return
        if not isinstance(commands, list):
            log.warning("OSS heartbeat reply: commands is not a list; ignored")
            return
        try:
            async with asyncio.timeout(self.timeout):
                self._done += await self.on_commands([c for c in commands if isinstance(c, dict)])
        except TimeoutError:
            log.warning("OSS commands took longer than %.1fs; they are sent again", self.timeout)
        except Exception:  # a bug there must not take the link (and the agent) down
            log.exception("carrying out the OSS's commands failed; they are sent again")

    async def run(self) -> None:
        """Register and heartbeat forever, re-registering after any failure."""
        backoff = 0.5
        base, connector = http_of(self.oss_url)
        self.url = base
        async with aiohttp.ClientSession(connector=connector) as http:
            while True:
                try:
                    announce = self.register_body()
                    if self.can_checkpoint is not None:
                        announce["checkpoint"] = await self.can_checkpoint()
                    if self.speed is not None:
                        announce["speed"] = await self.speed()
                    reply = await self._post(http, "/v1/agents/register", announce)
                    interval = float(reply.get("heartbeat_interval", 2.0))
                    self.registered.set()
                    log.info("registered with %s as %s", self.url, self.instance)
                    backoff = 0.5
                    while True:
                        self.seq += 1
                        body: dict[str, object] = {
                            "instance": self.instance,
                            "seq": self.seq,
                            "load": self.sample().as_json(),
                        }
                        if self._done:
                            body["done"] = self._done[:1024]
                        answer = await self._post(http, "/v1/agents/heartbeat", body)
                        del self._done[:1024]  # delivered: the OSS forgets those commands
                        self.heartbeats_sent += 1
                        await self._obey(answer.get("commands"))
                        await asyncio.sleep(interval)
                except (aiohttp.ClientError, TimeoutError, AgentError, ValueError) as exc:
                    self.registered.clear()
                    log.warning("OSS link: %s; retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
