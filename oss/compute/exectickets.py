"""Exec tickets the OSS mints for a client that runs a process on an instance.

The one minter of the ticket format (`vmagent.exec.tickets` checks tickets and
mints local ones through this function: `oss` may not import `vmagent`): public
part `v3.<key>.<nonce>.<issued_ms>.<expiry_ms>.<uid>.<gid>.<groups>.<digest>.
<program>.<view>` and secret `hmac-sha256(exec_key, public + "." + instance)`,
handed out as `public.secret`.  `key` is `x` for the instance agent's
per-process exec key, sent at registration (the OSS's tickets), or `i` for the
instance token (a local coordinator's).  `digest` binds the ticket to one exec
(the client computes it over the path and argv); uid/gid/groups are credentials
the account may use (`Account.exec_ids`).  `program` is the OSS program id (`-`
for a run the OSS does not know) and `view` the digest of the program's view
(`view_digest`): the agent checks the view a HELLO carries against it, so no
process can widen its maps or charge another program.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Sequence

TICKET_TTL = 20.0  # seconds; agents refuse tickets living longer than 30 s
VERSION = "v3"
NO_PROGRAM = "-"


def view_digest(
    maps: Sequence[Sequence[str]],
    placement: str = "spread",
    metering: str = "exec",
    home: str = "",
    extra: Sequence[Sequence[str]] = (),
) -> str:
    """The digest a ticket binds for a program's view (32 hex digits).

    The one definition: `vmagent.exec.view.View.digest` calls it, and the OSS
    computes it from the view it stored.  Canonical JSON of the fields (maps
    sorted); the program id is not part of it: the ticket binds it on its own.
    """
    canon = {
        "maps": sorted([str(v), str(r)] for v, r in maps),
        "placement": placement,
        "metering": metering,
        "home": home,
        "extra": sorted([str(k), str(v)] for k, v in extra),
    }
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# The digest of the empty view (no maps): what a ticket binds when none is given.
EMPTY_VIEW = view_digest(())


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
    program: str = NO_PROGRAM,
    view: str | None = None,
) -> str:
    """A fresh single-use ticket for one exec on `instance`, MAC'd with `key` (of `kind`)."""
    # Wall time, not the OSS clock: the agent checks the expiry against its own clock.
    issued = int((time.time() if now is None else now) * 1000)
    public = ".".join(
        (
            VERSION,
            kind,
            secrets.token_hex(12),
            str(issued),
            str(issued + int(ttl * 1000)),
            str(uid),
            str(gid),
            ",".join(str(g) for g in groups) or "-",
            digest,
            program or NO_PROGRAM,
            EMPTY_VIEW if view is None else view,
        )
    )
    mac = hmac.new(key.encode(), f"{public}.{instance}".encode(), hashlib.sha256).hexdigest()
    return f"{public}.{mac}"
