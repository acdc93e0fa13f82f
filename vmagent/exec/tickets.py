"""Exec tickets: short-lived, single-use credentials bound to one exec.

A ticket has a public part B and a secret part T:

    B = v3.<key>.<nonce>.<issued_ms>.<expiry_ms>.<uid>.<gid>.<groups>.<digest>.<program>.<view>
    T = hex(hmac-sha256(K, B + "." + instance))

`key` names K: `i` = the instance token (local coordinators mint with it),
`x` = the agent's per-process exec key (the OSS mints with it).  `digest` is
`exec_digest(path, argv)` of the one exec the ticket allows; uid/gid/groups are
the credentials the home side vouched for (`groups` is `-` when empty);
`program` the OSS program the exec belongs to (`-`: none) and `view` the digest of
the program's view (`vmagent.exec.view`), which the HELLO's view must match.  The
ticket string handed to a deputy is `B.T`; T never crosses the wire: the deputy
and the agent prove to each other that they hold it (`proof`), so a deputy
talks only to an agent that knows K, and a stranger who learns B alone (it is
not secret) can do nothing with it.

The agent (`TicketCheck`) caps a ticket's lifetime at MAX_LIFETIME whatever the
minter wrote, burns its nonce on use, and refuses tickets issued before the
agent started: with the in-memory nonce list that makes single use hold across
restarts without a journal on disk (a ticket older than the agent may have been
used by its previous process).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from oss.compute import exectickets
from vmagent.errors import AuthError

VERSION = exectickets.VERSION  # v2 tickets (no program, no view) are refused
KEY_TOKEN = "i"  # T is MAC'd with the instance token
KEY_EXEC = "x"  # T is MAC'd with the agent's exec key (OSS-minted)
TICKET_TTL = 20.0  # seconds a freshly minted ticket is valid
MAX_LIFETIME = 30.0  # the agent refuses tickets valid for longer than this from issue
MAX_ID = (1 << 32) - 2  # largest uid/gid (2^32 - 1 is the kernel's "no id")
MAX_GROUPS = 65536


def exec_digest(path: bytes, argv: Sequence[bytes]) -> str:
    """sha256 over the exec's path and argv (each item length-prefixed)."""
    h = hashlib.sha256()
    for item in (path, *argv):
        h.update(len(item).to_bytes(4, "big"))
        h.update(item)
    return h.hexdigest()


def secret_of(key: str, public: str, instance: str) -> str:
    """T for the public part `public` of a ticket for `instance`."""
    return hmac.new(key.encode(), f"{public}.{instance}".encode(), hashlib.sha256).hexdigest()


def proof(secret: str, role: bytes, challenge: bytes) -> bytes:
    """What a holder of T answers to `challenge` (role b"agent" or b"deputy")."""
    return hmac.new(secret.encode(), role + challenge, hashlib.sha256).digest()


def mint(
    token: str,
    instance: str,
    *,
    uid: int,
    gid: int,
    digest: str,
    groups: Sequence[int] = (),
    ttl: float = TICKET_TTL,
    now: float | None = None,
    key: str = KEY_TOKEN,
    program: str = exectickets.NO_PROGRAM,
    view: str | None = None,
) -> str:
    """A fresh ticket `B.T` for one exec on `instance`, MAC'd with `token`."""
    return exectickets.mint(
        token, instance, uid=uid, gid=gid, digest=digest, groups=groups, ttl=ttl, now=now,
        kind=key, program=program, view=view,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Grant:
    """The public part of a ticket, parsed: what it allows."""

    public: str
    key: str
    nonce: str
    issued_ms: int
    expiry_ms: int
    uid: int
    gid: int
    groups: tuple[int, ...]
    digest: str
    program: str = exectickets.NO_PROGRAM
    view: str = exectickets.EMPTY_VIEW


def _hex(raw: str, size: int) -> bool:
    return len(raw) == size and all(c in "0123456789abcdef" for c in raw)


def _id(raw: str, what: str) -> int:
    if not raw.isdigit() or int(raw) > MAX_ID:
        raise AuthError(f"exec ticket has a bad {what}")
    return int(raw)


def parse(public: str) -> Grant:
    """The public part of a ticket as a Grant; AuthError if malformed."""
    parts = public.split(".")
    if parts and parts[0] in ("v1", "v2"):
        raise AuthError(f"exec ticket of the old format {parts[0]} (no program or view): refused")
    if len(parts) != 11 or parts[0] != VERSION or parts[1] not in (KEY_TOKEN, KEY_EXEC):
        raise AuthError("malformed exec ticket")
    _, key, nonce, issued, expiry, uid, gid, groups, digest, program, view = parts
    if not _hex(view, 32) or not program or len(program) > 64:
        raise AuthError("malformed exec ticket")
    if not all(c.isalnum() or c in "_-" for c in program):
        raise AuthError("malformed exec ticket")
    if not (issued.isdigit() and expiry.isdigit() and len(issued) < 16 and len(expiry) < 16):
        raise AuthError("malformed exec ticket")
    if not nonce or len(nonce) > 64 or len(digest) != 64:
        raise AuthError("malformed exec ticket")
    group_ids = () if groups == "-" else tuple(_id(g, "group") for g in groups.split(","))
    if len(group_ids) > MAX_GROUPS:
        raise AuthError("exec ticket has too many groups")
    return Grant(
        public,
        key,
        nonce,
        int(issued),
        int(expiry),
        _id(uid, "uid"),
        _id(gid, "gid"),
        group_ids,
        digest,
        program,
        view,
    )


def split(ticket: str) -> tuple[str, str]:
    """`B.T` -> (B, T)."""
    public, _, secret = ticket.rpartition(".")
    if not public or len(secret) != 64:
        raise AuthError("malformed exec ticket")
    return public, secret


class TicketCheck:
    """The agent side: derive T, and admit each ticket once within its lifetime."""

    def __init__(
        self,
        token: str,
        instance: str,
        clock: Callable[[], float] = time.time,
        *,
        exec_key: str | None = None,
        started: float | None = None,
        max_lifetime: float = MAX_LIFETIME,
    ) -> None:
        self._keys = {KEY_TOKEN: token}
        if exec_key:
            self._keys[KEY_EXEC] = exec_key
        self._instance = instance
        self._clock = clock
        self._started_ms = int((clock() if started is None else started) * 1000)
        self._max_ms = int(max_lifetime * 1000)
        self._used: dict[str, int] = {}  # nonce -> expiry (ms)

    def secret(self, public: str) -> tuple[Grant, str]:
        """(grant, T) for a ticket's public part; AuthError if this agent cannot know T."""
        grant = parse(public)
        key = self._keys.get(grant.key)
        if key is None:
            raise AuthError("exec ticket minted with an exec key this agent does not have")
        return grant, secret_of(key, public, self._instance)

    def fresh(self, grant: Grant) -> None:
        """Raise AuthError unless the ticket may start a program now (not yet burnt)."""
        now = int(self._clock() * 1000)
        if grant.expiry_ms < now:
            raise AuthError("exec ticket expired")
        if grant.expiry_ms - grant.issued_ms > self._max_ms or grant.expiry_ms - now > self._max_ms:
            raise AuthError(f"exec ticket lives longer than {self._max_ms // 1000} s")
        # Exec keys are per agent process: an older process's tickets fail the MAC.
        if grant.key == KEY_TOKEN and grant.issued_ms < self._started_ms:
            raise AuthError("exec ticket issued before this agent started")
        self._used = {n: e for n, e in self._used.items() if e >= now}
        if grant.nonce in self._used:
            raise AuthError("exec ticket already used")

    def burn(self, grant: Grant) -> None:
        """Admit the ticket: check it is fresh, then remember its nonce until expiry."""
        self.fresh(grant)
        self._used[grant.nonce] = grant.expiry_ms

    def verify(self, ticket: str) -> Grant:
        """Check and burn a whole `B.T` ticket (for callers that hold T themselves)."""
        public, given = split(ticket)
        grant, secret = self.secret(public)
        if not hmac.compare_digest(given, secret):
            raise AuthError("exec ticket not valid for this instance")
        self.burn(grant)
        return grant
