"""Where CRIU is, whether it works on this kernel, and its command lines.

Debian 12's criu 3.17 fails `criu check` on newer kernels; `.ci/build-criu.sh`
installs upstream 4.2.1 under `DEFAULT_PREFIX`.  `find_criu` prefers that
prefix (or `$DCP_CRIU`), then PATH, and `check` runs `criu check` once per
binary: without a working CRIU every checkpoint request fails at once with the
one line of `CriuUnavailable`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vmagent.errors import AgentError

DEFAULT_PREFIX = "/opt/dcp/criu"
CHECK_TIMEOUT = 30.0  # s for `criu check` (it probes the kernel; slow under TCG)


class CheckpointError(AgentError):
    """A checkpoint or restore failed."""


class CriuUnavailable(CheckpointError):
    """no working CRIU on this instance"""

    def __init__(self, reason: str) -> None:
        super().__init__(f"checkpoint unavailable: {reason}")
        self.reason = reason


class CriuFailed(CheckpointError):
    """CRIU failed"""

    def __init__(self, action: str, detail: str) -> None:
        super().__init__(f"criu {action} failed: {detail}")
        self.action = action
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Criu:
    """A CRIU binary that passed `criu check` on this kernel."""

    path: str
    version: str


def find_criu(env: dict[str, str] | None = None) -> str | None:
    """The criu binary to use: `$DCP_CRIU`, then `DEFAULT_PREFIX/sbin/criu`, then PATH."""
    env = dict(os.environ) if env is None else env
    explicit = env.get("DCP_CRIU")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    built = os.path.join(DEFAULT_PREFIX, "sbin", "criu")
    if os.access(built, os.X_OK):
        return built
    return shutil.which("criu", path=env.get("PATH", os.defpath))


_checked: dict[str, Criu | CriuUnavailable] = {}


def check(path: str | None = None) -> Criu:
    """The working CRIU (checked once per binary); CriuUnavailable naming the cause."""
    path = path if path is not None else find_criu()
    if path is None:
        raise CriuUnavailable(
            f"criu not found (build it with .ci/build-criu.sh into {DEFAULT_PREFIX}, "
            "or set DCP_CRIU)"
        )
    known = _checked.get(path)
    if known is None:
        known = _checked[path] = _run_check(path)
    if isinstance(known, CriuUnavailable):
        raise known
    return known


def _run_check(path: str) -> Criu | CriuUnavailable:
    try:
        done = subprocess.run(
            [path, "check"], capture_output=True, text=True, timeout=CHECK_TIMEOUT
        )
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=CHECK_TIMEOUT
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CriuUnavailable(f"{path} does not run: {exc}")
    return verdict(path, done.returncode, done.stdout + done.stderr, version)


def remember(path: str, result: Criu | CriuUnavailable) -> Criu:
    """Cache the outcome of a check run elsewhere (the agent runs it as its own child)."""
    _checked[path] = result
    return check(path)


def verdict(path: str, returncode: int, output: str, version: str) -> Criu | CriuUnavailable:
    """What `criu check`'s exit code and output (and `--version`'s) say about `path`."""
    said = output.strip()
    if returncode != 0 or "Looks good" not in said:
        return CriuUnavailable(f"{path} check failed: {first_error(said)}")
    number = next(
        (ln.split(":", 1)[1].strip() for ln in version.splitlines() if ln.startswith("Version:")),
        "?",
    )
    return Criu(path, number)


def first_error(output: str) -> str:
    """The line of CRIU's output that says what went wrong (its first `Error`)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for line in lines:
        if "Error" in line and "RLIMIT_NOFILE" not in line:  # that one is harmless here
            return line
    return lines[-1] if lines else "no output"


# -- command lines (pure) -----------------------------------------------------------


def dump_argv(
    criu: str,
    pid: int,
    images: str,
    *,
    tcp: bool = True,
    parent: str | None = None,
    ps_socket: int | None = None,
) -> list[str]:
    """Dump the tree of `pid` into `images`, leaving it stopped (the caller decides its fate).

    `parent`: the last pre-dump's directory, relative to `images` (only the pages
    dirtied since go into `images`; CRIU links `images/parent` to it).
    `ps_socket`: our descriptor of a connection to the target's `criu page-server`
    (`page_server_argv`): the pages (and their map) go there, the rest to `images`.
    """
    argv = [criu, "dump", "-t", str(pid), "-D", images, "-o", "dump.log", "-v2"]
    argv += ["--leave-stopped", "--file-locks"]
    if tcp:
        argv.append("--tcp-established")
    if parent is not None:
        argv += ["--track-mem", "--prev-images-dir", parent]
    return argv + _page_server(ps_socket)


def _page_server(ps_socket: int | None) -> list[str]:
    return [] if ps_socket is None else ["--page-server", "--ps-socket", str(ps_socket)]


def page_server_argv(criu: str, images: str, ps_socket: int) -> list[str]:
    """Take the pages a dump or pre-dump sends over the connected socket `ps_socket`.

    It writes them into `images` (whose `parent` link names the round before)
    and exits once the dump says it is done.
    """
    argv = [criu, "page-server", "-D", images, "-o", "page-server.log", "-v2"]
    return argv + ["--ps-socket", str(ps_socket)]


def predump_argv(
    criu: str,
    pid: int,
    images: str,
    parent: str | None,
    *,
    freeze_cgroup: str | None = None,
    ps_socket: int | None = None,
) -> list[str]:
    """One pre-copy round: the pages of `pid`'s tree dirtied since `parent` (all, without).

    The tree is stopped only while its pages are collected; CRIU leaves a tree
    it found stopped stopped again (and skips its pages: a pre-dump copies
    nothing of a stopped task).

    `freeze_cgroup`: the cgroup (v2 directory) the tree is held frozen in.
    CRIU seizes the frozen tasks, thaws the group so that its parasite can run
    in them (a task resumed inside a frozen group goes back to the freezer's
    trap: without this option the pre-dump waits for it forever), and freezes
    the group again before it lets them go.
    `ps_socket`: as for `dump_argv`.
    """
    argv = [criu, "pre-dump", "-t", str(pid), "-D", images, "-o", "dump.log", "-v2"]
    argv.append("--track-mem")
    if parent is not None:
        argv += ["--prev-images-dir", parent]
    if freeze_cgroup is not None:
        argv += ["--freeze-cgroup", freeze_cgroup]
    return argv + _page_server(ps_socket)


def precopy_argv(criu: str) -> list[str]:
    """Whether this kernel tracks dirty memory (pre-dump works): exit status 0 if so."""
    return [criu, "check", "--feature", "mem_dirty_track"]


PRECOPY_ROUNDS = 4  # pre-dump rounds at most before the final dump
PRECOPY_MIN = 4 << 20  # bytes: below this, a round costs more than the freeze it saves
PRECOPY_SHRINK = 0.5  # another round only if the last wrote at most this share of the one before


def keep_copying(written: Sequence[int]) -> bool:
    """The stopping rule of pre-copy, given the bytes each round wrote so far.

    Another round while rounds remain, the last round still wrote PRECOPY_MIN
    or more (the final dump would copy that much frozen), and the dirty set is
    still shrinking fast (at most PRECOPY_SHRINK of the round before).
    """
    if not written or len(written) >= PRECOPY_ROUNDS or written[-1] < PRECOPY_MIN:
        return False
    return len(written) == 1 or written[-1] <= written[-2] * PRECOPY_SHRINK


def restore_argv(
    criu: str, images: str, inherit: Iterable[tuple[int, str]], *, tcp: bool = True
) -> list[str]:
    """Restore from `images`, detached and stopped (its tracer adopts it before it runs).

    `inherit`: (our fd, CRIU key such as `pipe:[1234]`) for each file whose other
    end lives outside the tree (the agent's end of the session's pipes).
    """
    argv = [criu, "restore", "-D", images, "-o", "restore.log", "-v2", "-d", "--leave-stopped"]
    argv.append("--restore-sibling")  # the agent stays its parent (PDEATHSIG, reaping)
    argv.append("--file-locks")
    # The tree joins the restoring agent's cgroups, not the ones it was dumped from:
    # local instances share a kernel, and the source's (a slow instance's CPU quota, its
    # program freezer group) must not follow it (issue 12: optimizer moves).
    argv.append("--manage-cgroups=ignore")
    if tcp:
        argv.append("--tcp-established")
    for fd, key in inherit:
        argv += ["--inherit-fd", f"fd[{fd}]:{key}"]
    return argv


def image_bytes(images: str, names: Sequence[str] | None = None) -> int:
    """Total size of the image files in `images` (logs aside)."""
    total = 0
    for name in names if names is not None else os.listdir(images):
        if name.endswith(".img"):
            total += os.path.getsize(os.path.join(images, name))
    return total
