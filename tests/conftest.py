"""Shared test helpers: run programs natively and under dcptrace."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The OSS tests share fixtures from tests/integration/conftest_oss.py, which
# they import by name: let pytest rewrite its asserts too.
pytest.register_assert_rewrite("conftest_oss")

# A harness may start the tests with SIGINT and SIGQUIT ignored (a background
# job of a non-interactive shell), and ignored signals survive exec: give the
# programs under test what an interactive user's shell gives them.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: bytes
    stderr: bytes


def dcptrace_argv(*options: str) -> list[str]:
    """The command line that runs dcptrace from this checkout."""
    return [sys.executable, "-m", "tracer.cli", *options]


# Runs under test record their local OSS state here, never in the user's home
# (set for the whole test process, so every subprocess inherits it).
DATA_DIR = tempfile.mkdtemp(prefix="dcp-test-data-")
os.environ["DCP_DATA"] = DATA_DIR
_DATA_OWNER = os.getpid()


@atexit.register
def _remove_data_dir() -> None:
    """Removed with the test process that made it (a fork's exit leaves it)."""
    if os.getpid() == _DATA_OWNER:
        shutil.rmtree(DATA_DIR, ignore_errors=True)


def traced_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["DCP_DATA"] = DATA_DIR
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def run(
    argv: Sequence[str],
    cwd: Path | str | None = None,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> Run:
    p = subprocess.run(
        list(argv), cwd=cwd, input=stdin, capture_output=True, env=env, timeout=timeout
    )
    return Run(p.returncode, p.stdout, p.stderr)


def traced(argv: Sequence[str], *options: str, **kw: object) -> Run:
    """Run argv under dcptrace with options."""
    return run([*dcptrace_argv(*options), "--", *argv], env=traced_env(), **kw)  # type: ignore[arg-type]


@pytest.fixture
def has_ptrace() -> None:
    """Skip (with the reason) where ptrace is not allowed."""
    scope = Path("/proc/sys/kernel/yama/ptrace_scope")
    if scope.exists() and scope.read_text().strip() == "3":
        pytest.skip("ptrace is disabled (yama ptrace_scope=3)")


def secret_file(secret: str, directory: Path | str | None = None) -> str:
    """Write `secret` to a new 0600 file (how secrets reach an agent); return its path.

    The file is removed when the test process exits (an agent reads it at start).
    """
    fd, path = tempfile.mkstemp(prefix="dcp-secret-", dir=directory)  # mkstemp: mode 0600
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    atexit.register(_remove_quietly, path)
    return path


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def wait_for(predicate: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Poll `predicate` until true or `seconds` pass (bounded; for process state)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def needs_fastpath() -> None:
    """Skip the calling test module (with the reason) where tracer._fastpath is not built."""
    try:
        from tracer import _fastpath  # noqa: F401
    except ImportError:
        pytest.skip(
            "tracer._fastpath is not built (pip install -e . or setup.py build_ext --inplace)",
            allow_module_level=True,
        )


def compile_c(directory: Path, source: str, name: str, *flags: str) -> Path:
    """Compile a C test program with gcc; skip (saying why) where that cannot be done."""
    import shutil

    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    src = directory / f"{name}.c"
    src.write_text(source)
    exe = directory / name
    res = subprocess.run(["gcc", "-O1", *flags, "-o", str(exe), str(src)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot build {name} with gcc {' '.join(flags)}: {res.stderr.decode()[:200]}")
    return exe


# The instance a shell runs on, with builtins only (no exec to be placed): the
# programs see their home's hostname everywhere (issue 11), but a namespaced
# instance's PID 1 is its agent, whose command line ends `--hostname NAME`
# (dash's `read` drops the NULs).  Prints the home's init line at home.
WHERE_SH = 'read w < /proc/1/cmdline; echo "${w##*--hostname}"'
