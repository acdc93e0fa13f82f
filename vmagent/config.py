"""The agent's one configuration object, validated at the edge (flags/env)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vmagent.errors import AgentError


class ConfigError(AgentError):
    """An agent option is missing or invalid."""


def parse_hostport(value: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); ConfigError if malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Settings of one `dcp-agent` process."""

    instance: str  # this instance's name (as the OSS knows it)
    token: str  # per-instance credential: OSS bearer token and exec-ticket key
    listen_host: str  # where the exec/HTTP API listens
    listen_port: int  # 0 = any free port (reported on stdout as `listening HOST:PORT`)
    oss_url: str | None = None  # register + heartbeat here; None = stand-alone
    hostname: str | None = None  # set the UTS hostname first (fresh UTS namespace only)
    reconnect_window: float = 10.0  # how long a session waits for its deputy to come back
    drain_grace: float = 0.5  # after the program exits, wait this long for its pipes' EOF
    # Per-process key for exec tickets minted by the OSS (sent when registering;
    # a restarted agent has a new one, which retires tickets for the old process).
    exec_key: str | None = field(default=None, repr=False)
    call_timeout: float = 5.0  # timeout of every call to the OSS
    trace: bool = False  # run programs under dcptrace (placement local) on this instance
    lifeline: int | None = None  # fd whose EOF means "the process that started us died"

    def __post_init__(self) -> None:
        if not self.instance or "/" in self.instance:
            raise ConfigError("--instance must be a non-empty name without '/'")
        if not self.token:
            raise ConfigError("--token is required (the per-instance credential)")
        if self.reconnect_window <= 0 or self.call_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        if self.oss_url is not None and not self.oss_url.startswith(("http://", "https://")):
            raise ConfigError(f"--oss must be an http(s) URL, got {self.oss_url!r}")
