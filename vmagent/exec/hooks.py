"""What other agent services learn about exec sessions (telemetry, limits, tracing).

The exec service calls these at fixed points of a session's life; each hook runs
on the agent's loop and must not block.  `NullHooks` is the default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vmagent.exec.session import Session


class SessionHooks(Protocol):
    """Observer of exec sessions."""

    def started(self, session: Session) -> None:
        """The program was forked (session.pid is set)."""

    def output(self, session: Session, fd: int, data: bytes) -> None:
        """The program wrote `data` on its streamed descriptor `fd` (1, 2, ...)."""

    def ended(self, session: Session, status: int) -> None:
        """The program was reaped with raw wait status `status`."""

    def trace_message(self, session: Session, record: dict[bytes, bytes]) -> None:
        """The session's instance tracer reported `record` (vmagent.trace.channel)."""


class NullHooks:
    """Hooks that do nothing."""

    def started(self, session: Session) -> None:
        """Nothing."""

    def output(self, session: Session, fd: int, data: bytes) -> None:
        """Nothing."""

    def ended(self, session: Session, status: int) -> None:
        """Nothing."""

    def trace_message(self, session: Session, record: dict[bytes, bytes]) -> None:
        """Nothing."""


class HookList:
    """Several observers called in order."""

    def __init__(self, *hooks: SessionHooks) -> None:
        self.hooks = list(hooks)

    def add(self, hooks: SessionHooks) -> None:
        """Call `hooks` too, after those already present."""
        self.hooks.append(hooks)

    def started(self, session: Session) -> None:
        """Tell every observer."""
        for h in self.hooks:
            h.started(session)

    def output(self, session: Session, fd: int, data: bytes) -> None:
        """Tell every observer."""
        for h in self.hooks:
            h.output(session, fd, data)

    def ended(self, session: Session, status: int) -> None:
        """Tell every observer."""
        for h in self.hooks:
            h.ended(session, status)

    def trace_message(self, session: Session, record: dict[bytes, bytes]) -> None:
        """Tell every observer."""
        for h in self.hooks:
            h.trace_message(session, record)
