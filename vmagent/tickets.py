"""Exec tickets: short-lived, single-use credentials a deputy shows an agent.

The coordinator knows each instance's token; it never puts the token on a
command line (argv is world-readable in /proc).  It mints a ticket instead:
`v1.<nonce>.<expiry>.<hmac-sha256(token, "v1.<nonce>.<expiry>.<instance>")>`.
The agent checks the MAC with its own token, the expiry, and that the nonce was
not used before (it remembers nonces until they expire).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Sequence

from vmagent.errors import AuthError

TICKET_TTL = 300.0


def _mac(token: str, body: str) -> str:
    return hmac.new(token.encode(), body.encode(), hashlib.sha256).hexdigest()


def mint(token: str, instance: str, ttl: float = TICKET_TTL, now: float | None = None) -> str:
    """A fresh ticket for `instance`, valid for `ttl` seconds."""
    expiry = int((time.time() if now is None else now) + ttl)
    body = f"v1.{secrets.token_hex(12)}.{expiry}"
    return f"{body}.{_mac(token, body + '.' + instance)}"


class TicketCheck:
    """The agent side: verify and burn tickets.

    A ticket is valid when MAC'd with the instance token (local coordinators)
    or with one of `exec_keys` (the agent's per-process key, registered with the
    OSS, which mints tickets for its clients).
    """

    def __init__(
        self,
        token: str,
        instance: str,
        clock: Callable[[], float] = time.time,
        *,
        exec_keys: Sequence[str] = (),
    ) -> None:
        self._token = token
        self._keys = (token, *exec_keys)
        self._instance = instance
        self._clock = clock
        self._used: dict[str, int] = {}  # nonce -> expiry

    def verify(self, ticket: str) -> None:
        """Accept a ticket once; raise AuthError otherwise."""
        parts = ticket.split(".")
        if len(parts) != 4 or parts[0] != "v1" or not parts[2].isdigit():
            raise AuthError("malformed exec ticket")
        body = ".".join(parts[:3])
        signed = body + "." + self._instance
        if not any(hmac.compare_digest(parts[3], _mac(key, signed)) for key in self._keys):
            raise AuthError("exec ticket not valid for this instance")
        now = self._clock()
        expiry = int(parts[2])
        if expiry < now:
            raise AuthError("exec ticket expired")
        self._used = {n: e for n, e in self._used.items() if e >= now}
        if parts[1] in self._used:
            raise AuthError("exec ticket already used")
        self._used[parts[1]] = expiry
