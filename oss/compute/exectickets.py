"""Exec tickets the OSS mints for a client that runs a process on an instance.

The one minter of the ticket format (`vmagent.exec.tickets` checks tickets and
mints local ones through this function: `oss` may not import `vmagent`): public part
`v2.<key>.<nonce>.<issued_ms>.<expiry_ms>.<uid>.<gid>.<groups>.<digest>` and secret
`hmac-sha256(exec_key, public + "." + instance)`, handed out as `public.secret`.
`key` is `x` for the instance agent's per-process exec key, sent at registration
(the OSS's tickets), or `i` for the instance token (a local coordinator's).
`digest` binds the ticket to one exec (the client computes it over the path and
argv); uid/gid/groups are credentials the account may use (`Account.exec_ids`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence

TICKET_TTL = 20.0  # seconds; agents refuse tickets living longer than 30 s


def mint(
    key: str,
    instance: str,
    *,
    uid: int,
    gid: int,
    digest: str,
    groups: Sequence[int] = (),
    ttl: float = TICKET_TTL,
    now: float | None = None,
    kind: str = "x",
) -> str:
    """A fresh single-use ticket for one exec on `instance`, MAC'd with `key` (of `kind`)."""
    # Wall time, not the OSS clock: the agent checks the expiry against its own clock.
    issued = int((time.time() if now is None else now) * 1000)
    public = ".".join(
        (
            "v2",
            kind,
            secrets.token_hex(12),
            str(issued),
            str(issued + int(ttl * 1000)),
            str(uid),
            str(gid),
            ",".join(str(g) for g in groups) or "-",
            digest,
        )
    )
    mac = hmac.new(key.encode(), f"{public}.{instance}".encode(), hashlib.sha256).hexdigest()
    return f"{public}.{mac}"
