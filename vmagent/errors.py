"""Errors of the compute-instance layer: one base, one subclass per failure."""

from __future__ import annotations


class AgentError(Exception):
    """A compute-instance operation failed."""


class ProtocolError(AgentError):
    """The peer sent bytes that are not a valid DCP exec frame."""


class AuthError(AgentError):
    """The exec ticket or bearer token was refused."""


class BadRequest(AgentError):
    """An exec request is malformed (missing or invalid fields)."""


class InstanceLost(AgentError):
    """The instance running a remote process stopped answering."""

    def __init__(self, instance: str, address: str, detail: str) -> None:
        super().__init__(f"instance {instance} ({address}) lost: {detail}")
        self.instance = instance
        self.address = address
        self.detail = detail


class ClusterError(AgentError):
    """Local instances could not be started or reached."""

    def __init__(self, instance: str, detail: str) -> None:
        super().__init__(f"instance {instance}: {detail}")
        self.instance = instance
        self.detail = detail


class NoInstances(AgentError):
    """Placement was asked to choose among zero instances."""
