"""How a home process becomes a deputy: the command line that replaces its execve."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The deputy runs as a file (python -I -S ignores PYTHONPATH and site-packages,
# which is what keeps it fast and immune to the program's environment).
DEPUTY_SCRIPT = str(Path(__file__).resolve().parent / "deputy.py")


PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


def tracer_prefix() -> tuple[bytes, ...]:
    """Command prefix that runs a program under dcptrace on an instance (placement local).

    `-I` keeps the program's PYTHON* variables away from the tracer; the project
    root goes on sys.path explicitly for the same reason.  The prefix is
    followed by the program's path and its argv[1:].
    """
    boot = (
        f"import sys; sys.path.insert(0, {PROJECT_ROOT!r}); "
        "from tracer.cli import main; sys.argv[0] = 'dcptrace'; main()"
    )
    return (interpreter(), b"-I", b"-c", boot.encode(), b"--")


def interpreter() -> bytes:
    """The real Python binary (not a shim script: a shim costs ~30 ms per exec)."""
    return os.fsencode(os.path.realpath(sys.executable))


def deputy_argv(
    agent: str,
    instance: str,
    ticket: str,
    path: bytes,
    argv: tuple[bytes, ...],
    reconnect_window: float | None = None,
) -> tuple[bytes, ...]:
    """argv of the deputy standing in for `execve(path, argv, ...)` run on `instance`."""
    head: list[bytes] = [b"python3", b"-I", b"-S", os.fsencode(DEPUTY_SCRIPT)]
    head += [b"--agent", agent.encode(), b"--instance", instance.encode()]
    head += [b"--ticket", ticket.encode()]
    if reconnect_window is not None:
        head += [b"--reconnect", str(reconnect_window).encode()]
    # An empty argv is legal for execve; the deputy still needs an argv[0] slot.
    return (*head, b"--", path, *(argv or (path,)))


def original_argv(argv: tuple[str, ...]) -> tuple[str, ...] | None:
    """The program's own argv if `argv` is a deputy's command line, else None.

    For records and summaries: a placed process shows the deputy's argv in
    /proc, but the user wants to see the program it stands in for.
    """
    if len(argv) < 6 or os.fsencode(argv[3] if len(argv) > 3 else "") != os.fsencode(DEPUTY_SCRIPT):
        return None
    try:
        cut = argv.index("--")
    except ValueError:
        return None
    return tuple(argv[cut + 2 :]) or None
