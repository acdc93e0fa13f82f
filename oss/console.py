"""What every `dcp-oss` command that talks to a running OSS shares.

Connection: `--oss URL` (or `--url`; environment DCP_OSS or DCP_OSS_URL), the
account token from a private file (`--token-file`, mode 0600, owned by the caller)
or the environment variable DCP_TOKEN; never from the command line.

Output: a plain table for people, `--json` for scripts: the command's API response
model as /openapi.json describes it (`components.schemas.<Model>`, named in each
command's help), one JSON document on stdout.

Exit codes: 0 done; 1 the OSS refused or failed (one line on stderr,
`dcp-oss COMMAND: message`); 2 bad usage (click's); 3 the OSS could not be reached.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import click
from pydantic import BaseModel

from oss.errors import OssError

T = TypeVar("T")

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
TIMEOUT = 30.0  # s: one API call of a quick command
MAX_TOKEN = 4096  # bytes: a token file larger than this is not a token
PROGRESS_TICK = 0.2  # s between redraws of a progress line


@dataclass(frozen=True)
class Target:
    """A running OSS and how to talk to it."""

    url: str
    token: str = field(repr=False)
    json: bool = False

    def client(self, timeout: float = TIMEOUT) -> Any:
        """An `OssClient` for this OSS (use as `async with`)."""
        from oss.client import OssClient

        return OssClient(self.url, self.token, timeout=timeout)


def read_token_file(path: str) -> str:
    """The token in `path`, refused (one line) unless a regular 0600 file of the caller."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        fail(f"cannot open the token file {path}: {exc.strerror}", EXIT_USAGE)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            fail(
                f"refusing the token file {path}: group or others may read it, or it is not "
                f"yours (mode {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}; want 0600, "
                f"uid {os.geteuid()})",
                EXIT_USAGE,
            )
        data = os.read(fd, MAX_TOKEN + 1)
    finally:
        os.close(fd)
    token = data.decode("ascii", errors="replace").strip()
    if len(data) > MAX_TOKEN or not token or any(c.isspace() or not c.isprintable() for c in token):
        fail(f"the token file {path} does not hold one token", EXIT_USAGE)
    return token


def account_token(token_file: str | None) -> str:
    """The account token: --token-file, else DCP_TOKEN (a usage error without either)."""
    if token_file:
        return read_token_file(token_file)
    token = os.environ.get("DCP_TOKEN", "").strip()
    if not token:
        fail("give the account token by --token-file FILE (0600) or DCP_TOKEN", EXIT_USAGE)
    return token


def connection(json_output: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command: add --oss/--url, --token-file (and --json); pass `target`."""

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def inner(**kw: Any) -> Any:
            url, token_file = kw.pop("oss_url"), kw.pop("token_file")
            if not url:
                fail("give the OSS by --oss URL or DCP_OSS", EXIT_USAGE)
            as_json = bool(kw.pop("as_json", False))
            kw["target"] = Target(url, account_token(token_file), as_json)
            return f(**kw)

        cmd = inner
        if json_output:
            cmd = click.option(
                "--json", "as_json", is_flag=True, help="Print JSON (schema in the help above)."
            )(cmd)
        cmd = click.option(
            "--token-file",
            "token_file",
            envvar="DCP_TOKEN_FILE",
            metavar="FILE",
            default=None,
            help="Account token file, mode 0600 (else DCP_TOKEN).",
        )(cmd)
        return click.option(
            "--oss",
            "--url",
            "oss_url",
            envvar=["DCP_OSS", "DCP_OSS_URL"],
            metavar="URL",
            default=None,
            help="OSS base URL (env DCP_OSS).",
        )(cmd)

    return wrap


def command_name() -> str:
    """`dcp-oss programs list`, however the program was started."""
    ctx = click.get_current_context(silent=True)
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["dcp-oss", *reversed(names)])


def fail(message: str, code: int = EXIT_REFUSED) -> NoReturn:
    """Print one error line and exit."""
    click.echo(f"{command_name()}: {message}", err=True)
    sys.exit(code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's coroutine; an OSS error is one line and exit 1 (3: unreachable)."""
    from oss.client import Unreachable

    try:
        return asyncio.run(coro)
    except Unreachable as exc:
        cause = exc.__cause__
        why = "timed out" if isinstance(cause, TimeoutError) else str(cause or exc)
        fail(f"cannot reach the OSS: {why}", EXIT_UNREACHABLE)
    except OssError as exc:
        fail(str(exc))  # str: the server's own message (the client rebuilt its error)
    except BrokenPipeError:
        sys.stderr.close()  # `| head`: the reader has what it wanted
        sys.exit(0)
    raise AssertionError("unreachable")


def emit_json(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> None:
    """One JSON document on stdout."""
    if isinstance(value, BaseModel):
        click.echo(value.model_dump_json(indent=2))
    elif isinstance(value, dict):
        click.echo(json.dumps(value, indent=2, sort_keys=True))
    else:
        click.echo(json.dumps([x.model_dump(mode="json") for x in value], indent=2))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Columns aligned left, two spaces apart, headers first; the last column runs on."""
    cells = [[str(h) for h in headers]] + [[_cell(x) for x in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for r in cells:
        parts = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [r[-1]]
        out.append("  ".join(parts).rstrip())
    click.echo("\n".join(out))


def fields(pairs: Sequence[tuple[str, Any]]) -> None:
    """`key: value` lines, keys aligned."""
    width = max(len(k) for k, _ in pairs)
    click.echo("\n".join(f"{k + ':':<{width + 1}} {_cell(v)}" for k, v in pairs))


def _cell(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2f}"
    return str(x)


def money(micros: int | float | None) -> str:
    """Micro-units of account currency as a plain decimal (6 places)."""
    if micros is None:
        return "-"
    return f"{micros / 1e6:.6f}"


def when(ts: float | None) -> str:
    """A time as local `YYYY-MM-DD HH:MM:SS`."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def age(ts: float | None, now: float | None = None) -> str:
    """How long ago: 5s, 3m, 2h, 4d."""
    if ts is None:
        return "-"
    s = max(0.0, (now if now is not None else time.time()) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit}"
    return f"{int(s)}s"


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(value: str | None, now: float | None = None) -> float | None:
    """`--since`: a duration back from now (90s, 30m, 2h, 7d), epoch seconds or an ISO date."""
    if value is None:
        return None
    v = value.strip()
    now = now if now is not None else time.time()
    if v and v[-1] in _UNITS and v[:-1].replace(".", "", 1).isdigit():
        return now - float(v[:-1]) * _UNITS[v[-1]]
    try:
        return float(v)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(v).timestamp()
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: expected a duration (30m, 2h, 7d), epoch seconds or an ISO date",
            param_hint="--since",
        ) from None


async def with_progress(label: str, work: Awaitable[T]) -> tuple[T, float]:
    """Await `work` while a terminal on stderr shows `label` and the elapsed time (one
    line redrawn every 0.2 s, erased at the end); (result, seconds).  Off a terminal
    nothing is drawn: scripts get the command's summary line only.
    """
    tty = sys.stderr.isatty()
    t0 = time.monotonic()
    task = asyncio.ensure_future(work)
    name = command_name()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=PROGRESS_TICK)
            if done:
                break
            if tty:
                elapsed = time.monotonic() - t0
                sys.stderr.write(f"\r{name}: {label} ... {elapsed:.1f} s\x1b[K")
                sys.stderr.flush()
    finally:
        if not task.done():
            task.cancel()
        if tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
    return task.result(), time.monotonic() - t0
