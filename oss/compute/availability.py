"""Availability decisions (pure): which instances have gone silent."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Failure:
    """An instance silent past the timeout."""

    instance: str
    silent_for: float


def silent(last_seen: Mapping[str, float], now: float, timeout: float) -> list[Failure]:
    """Instances whose last heartbeat is older than `timeout` seconds, by name."""
    return [
        Failure(name, now - seen)
        for name, seen in sorted(last_seen.items())
        if now - seen > timeout
    ]
