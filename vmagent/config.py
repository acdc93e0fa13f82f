"""The agent's one configuration object, validated at the edge (flags/env)."""

from __future__ import annotations

import os
import stat
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
    token: str = field(repr=False)  # per-instance credential: OSS bearer + exec-ticket key
    listen_host: str  # where the exec/HTTP API listens
    listen_port: int  # 0 = any free port (reported on stdout as `listening HOST:PORT`)
    oss_url: str | None = None  # register + heartbeat here; None = stand-alone
    hostname: str | None = None  # set the UTS hostname first (fresh UTS namespace only)
    reconnect_window: float = 10.0  # how long a session waits for its deputy to come back
    drain_grace: float = 0.5  # after the program exits, wait this long for its pipes' EOF
    tracer_grace: float = 1.0  # ... and this long for its instance tracer's end
    # Per-process key for exec tickets minted by the OSS (sent when registering;
    # a restarted agent has a new one, which retires tickets for the old process).
    exec_key: str | None = field(default=None, repr=False)
    call_timeout: float = 5.0  # timeout of every call to the OSS
    # s from a program's fork to its exec: its instance tracer's seize (slow under TCG)
    trace_timeout: float = 10.0
    lifeline: int | None = None  # fd whose EOF means "the process that started us died"
    # Migrations copy memory in pre-copy rounds while the program runs and stream the
    # pages through the target's CRIU page server (issue 12); False: one frozen dump, packed.
    migrate_fast: bool = True
    # Measure the CPU score sent at registration (issue 12, optimizer moves); off where
    # every instance shares this machine's cores (`dcptrace --instances`).
    cpu_score: bool = True

    def __post_init__(self) -> None:
        if not self.instance or "/" in self.instance:
            raise ConfigError("--instance must be a non-empty name without '/'")
        if not self.token:
            raise ConfigError("an instance token is required (--token-file or --token-fd)")
        if self.reconnect_window <= 0 or self.call_timeout <= 0 or self.trace_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        # unix:PATH is a dcptrace run's own OSS (issue 10: `oss.local.PrivateOss`).
        schemes = ("http://", "https://", "unix:/")
        if self.oss_url is not None and not self.oss_url.startswith(schemes):
            raise ConfigError(f"--oss must be an http(s) URL or unix:PATH, got {self.oss_url!r}")


MAX_TOKEN = 4096  # bytes; a token file larger than this is not a token


def read_token(path: str | None, fd: int | None) -> str:
    """The instance token from a private file or an inherited fd (never argv or env).

    A file must be a regular file owned by this user with no group/other
    permission bits: a token others can read is already leaked, so refuse it.
    The fd is read to EOF and closed.
    """
    if (path is None) == (fd is None):
        raise ConfigError("give the instance token by exactly one of --token-file or --token-fd")
    if path is not None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"cannot open the token file {path}: {exc.strerror}") from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            os.close(fd)
            raise ConfigError(
                f"refusing the token file {path}: it must be a regular file owned by uid "
                f"{os.geteuid()} with mode 0600 (it is uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):04o})"
            )
    assert fd is not None
    data = b""
    try:
        while len(data) <= MAX_TOKEN:
            chunk = os.read(fd, MAX_TOKEN + 1)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise ConfigError(f"cannot read the instance token: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN:
        raise ConfigError(f"the instance token is longer than {MAX_TOKEN} bytes")
    token = data.decode("ascii", errors="replace").strip()
    if not token or any(not c.isprintable() or c.isspace() for c in token):
        raise ConfigError("the instance token is empty or holds non-printable characters")
    return token
