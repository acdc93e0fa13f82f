"""Exec tickets the OSS mints for a client that runs a process on an instance.

The same format as `vmagent.tickets` (kept apart so `oss` does not depend on
`vmagent`): `v1.<nonce>.<expiry>.<hmac-sha256(key, "v1.<nonce>.<expiry>.<instance>")>`.
The key is the instance agent's per-process exec key, sent at registration;
the agent accepts a ticket once, before its expiry.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

TICKET_TTL = 300.0  # seconds; the agent remembers used nonces this long


def mint(key: str, instance: str, ttl: float = TICKET_TTL, now: float | None = None) -> str:
    """A fresh single-use ticket for `instance`, MAC'd with its agent's exec key."""
    # Wall time, not the OSS clock: the agent checks the expiry against its own clock.
    expiry = int((time.time() if now is None else now) + ttl)
    body = f"v1.{secrets.token_hex(12)}.{expiry}"
    mac = hmac.new(key.encode(), f"{body}.{instance}".encode(), hashlib.sha256).hexdigest()
    return f"{body}.{mac}"
