"""The billing repository: limits at every scope, metering into billing records.

`BudgetCheck` is the `Budget` the compute repository places programs under: it
reads limits here, usage through compute's and spend totals through accounts'
conn-level functions, inside compute's transaction (so the check and the
reservation stay one atomic step).  Metering charges the program (compute) and
its account and user (accounts), and stops programs at a hard budget, in one
writer transaction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from oss.accounts import store as accounts
from oss.billing import limits as lim
from oss.billing import pricing
from oss.compute import programs
from oss.db.store import Conn, Store, to_json
from oss.errors import BudgetExhausted, Conflict, NotFound
from oss.telemetry import processes


@dataclass(frozen=True, slots=True)
class Stopped:
    """A program metering stopped: why, and the instances that were running it."""

    program_id: str
    breach: lim.Breach
    instances: tuple[str, ...]
    suspended: bool = False  # checkpointed at its hard budget, placements kept (issue 12)

    @property
    def reason(self) -> str:
        """The program's status_reason: `stopped: program hard budget of ...`
        (`suspended: ...` when it was checkpointed)."""
        return f"{'suspended' if self.suspended else 'stopped'}: {self.breach.message()}"


@dataclass(frozen=True, slots=True)
class MeterResult:
    """What a metering pass did."""

    records: int
    stopped: tuple[Stopped, ...]


class Billing:
    """Limits and billing records; the metering pass."""

    def __init__(self, db: Store) -> None:
        self._db = db

    async def budget_left(self, program_id: str) -> int | None:
        """Micros left before the tightest budget, soft or hard, of the program, its user
        or its account (None: no budget at any level).  Issue 12: optimizer moves."""

        def op(c: Conn) -> int | None:
            left = None
            for _, limits_, use in _levels(c, program_id):
                for budget in (limits_.budget_micros, limits_.hard_budget_micros):
                    if budget is not None:
                        room = max(0, budget - use.spent_micros)
                        left = room if left is None else min(left, room)
            return left

        return await self._db.read(op)

    async def get_limits(self, scope: str, scope_id: str) -> dict[str, Any]:
        """Limits at one scope (empty dict: unlimited)."""
        return await self._db.read(lambda c: limits(c, scope, scope_id))

    async def set_limits(self, scope: str, scope_id: str, body: Mapping[str, Any]) -> None:
        """Replace the limits at one scope."""

        def op(c: Conn) -> None:
            c.execute(
                "INSERT OR REPLACE INTO limits VALUES(?,?,?)", (scope, scope_id, to_json(body))
            )

        await self._db.write(op)

    async def meter(
        self,
        rates: pricing.Rates,
        suspendable: Callable[[Sequence[str]], bool] = lambda instances: False,
    ) -> MeterResult:
        """Bill every running program for the whole seconds since it was last metered.

        Network is billed from the bytes the instances measured (telemetry's
        `measured_net`), taken in this transaction: bytes are billed exactly once, by
        the first pass after they were reported.  Then stop programs past a limit at
        any level (`limits.breach`: a hard budget reached, or instances, storage or
        bandwidth above their limit, storage and bandwidth as measured) in the same
        transaction: a stopped program is never billed again, so what it is billed
        exceeds its hard budget by at most this pass's charge.

        A program at its hard budget whose instances can all checkpoint
        (`suspendable`, issue 12) is suspended instead: placements kept, not
        metered while suspended (`resume` continues it).
        """
        now = self._db.clock()

        def op(c: Conn) -> MeterResult:
            n = 0
            net_bytes = processes.take_net(c)
            measured_net = dict(net_bytes)  # limits see it whole; billing pops what it bills
            models: dict[str, str] = {}
            secs_by_program: dict[str, int] = {}
            storage_by_program: dict[str, int] = {}
            for p in programs.metered(c):
                secs = pricing.whole_seconds(p["last_metered"], now)
                if secs == 0 and not net_bytes.get(p["id"]):
                    continue
                secs_by_program[p["id"]] = secs
                uses = [
                    pricing.InstanceUse(
                        r["instance"],
                        r["price_micros_per_s"],
                        r["processes"],
                        r["slots"],
                        r["dedicated_to"] == p["id"],
                    )
                    for r in programs.instance_uses(c, p["id"])
                ]
                # Storage as the program's instances measured its view; the declared
                # figure only where none did (no view, or a walk cut at its cap).
                storage = processes.storage_mb(c, p["id"], now)
                if storage is None:
                    storage = p["storage_mb"]
                else:
                    storage_by_program[p["id"]] = storage
                m = pricing.Metered(secs, uses, storage, net_bytes.get(p["id"], 0))
                if p["account_id"] not in models:
                    models[p["account_id"]] = accounts.pricing_model(c, p["account_id"])
                model = pricing.PricingModel(models[p["account_id"]])
                ch = pricing.charge(m, model, rates)
                end = p["last_metered"] + secs
                detail = dict(
                    instance_micros=float(ch.instance_micros),
                    storage_micros=float(ch.storage_micros),
                    net_micros=float(ch.net_micros),
                    premium_micros=float(ch.premium_micros),
                )
                c.execute(
                    "INSERT INTO billing(program_id, account_id, user_id, start, end, seconds,"
                    " model, amount_micros, detail) VALUES(?,?,?,?,?,?,?,?,?)",
                    (
                        p["id"],
                        p["account_id"],
                        p["user_id"],
                        p["last_metered"],
                        end,
                        secs,
                        model.value,
                        ch.amount_micros,
                        to_json(detail),
                    ),
                )
                programs.charge(c, p["id"], ch.amount_micros, end)
                accounts.add_spent(c, p["account_id"], p["user_id"], ch.amount_micros)
                n += 1
                net_bytes.pop(p["id"], None)
            # Bytes measured after a program stopped running (its last processes'
            # final figures) are billed too: a record of no seconds, network only.
            for program_id, nbytes in sorted(net_bytes.items()):
                n += _bill_late_net(c, program_id, nbytes, rates, models)
            stopped = _stop_breaches(
                c, now, measured_net, secs_by_program, storage_by_program, suspendable
            )
            return MeterResult(n, tuple(stopped))

        return await self._db.write(op)

    async def resume(self, account_id: str, program_id: str, user_id: str) -> list[str]:
        """Run a suspended program again (issue 12); the instances holding it.

        Refused (one line) while it is not suspended, or while a limit that
        stops it is still past (raise the budget first).  Metering bills it
        again from now: the time it spent suspended is not charged.
        """
        now = self._db.clock()

        def op(c: Conn) -> list[str]:
            p = programs.program_row(c, program_id, account_id)
            if p["state"] != programs.SUSPENDED:
                raise Conflict(f"program {program_id} is {p['state']}, not suspended")
            levels = _levels(c, program_id)
            measured = {level: use for level, _, use in levels}
            found = lim.breach([(level, limits_) for level, limits_, _ in levels], measured)
            if found is not None:
                raise BudgetExhausted(
                    f"program {program_id} stays suspended: {found.message()}; raise it first"
                )
            programs.unsuspend(c, program_id, f"resumed by {user_id}", now)
            return [r["instance"] for r in programs.instance_uses(c, program_id)]

        return await self._db.write(op)

    async def bill_storage(self, program_id: str, gib_seconds: Mapping[str, float]) -> int:
        """Bill a program's measured storage (GiB-seconds per tier, issue 14) as one record
        of no seconds; its amount in micro-units (whole, rounded up)."""
        from oss.billing.storage import charge

        amount = math.ceil(charge(gib_seconds))

        def op(c: Conn) -> int:
            p = programs.program_row(c, program_id, None)
            model = accounts.pricing_model(c, p["account_id"])
            now = self._db.clock()
            detail = dict(
                instance_micros=0.0, storage_micros=float(amount), net_micros=0.0,
                premium_micros=0.0, storage_gib_seconds=dict(gib_seconds),
            )  # fmt: skip
            c.execute(
                "INSERT INTO billing(program_id, account_id, user_id, start, end, seconds,"
                " model, amount_micros, detail) VALUES(?,?,?,?,?,?,?,?,?)",
                (p["id"], p["account_id"], p["user_id"], now, now, 0, model, amount,
                 to_json(detail)),
            )  # fmt: skip
            programs.charge(c, p["id"], amount, p["last_metered"])
            accounts.add_spent(c, p["account_id"], p["user_id"], amount)
            return amount

        return await self._db.write(op)

    async def billing(
        self,
        account_id: str,
        program_id: str | None = None,
        since: float | None = None,
        user_id: str | None = None,
    ) -> tuple[int, list[dict[str, Any]]]:
        """The account's (or one program's) billing records and total (records ending at
        or after `since`, of `user_id`'s programs, if given)."""

        def op(c: Conn) -> tuple[int, list[dict[str, Any]]]:
            if program_id is not None:
                programs.check_program(c, program_id, account_id)
            q = "SELECT * FROM billing WHERE account_id=?"
            args: list[Any] = [account_id]
            for clause, value in (
                (" AND program_id=?", program_id),
                (' AND "end">=?', since),
                (" AND user_id=?", user_id),
            ):
                if value is not None:
                    q += clause
                    args.append(value)
            rows = c.execute(q + " ORDER BY id", args).fetchall()
            recs = [
                dict(
                    id=r["id"],
                    program_id=r["program_id"],
                    user_id=r["user_id"],
                    start=r["start"],
                    end=r["end"],
                    seconds=r["seconds"],
                    model=r["model"],
                    amount_micros=r["amount_micros"],
                    **json.loads(r["detail"]),
                )
                for r in rows
            ]
            return sum(r["amount_micros"] for r in recs), recs

        return await self._db.read(op)

    async def spend(self, account_id: str, user_ids: dict[str, str], limit: int) -> dict[str, Any]:
        """Spent against budgets: the account, each user (id -> name), the newest `limit`
        programs."""

        def op(c: Conn) -> dict[str, Any]:
            def level(kind: str, sid: str, name: str, spent: int) -> dict[str, Any]:
                got = limits(c, kind, sid)
                return dict(
                    level=kind,
                    id=sid,
                    name=name,
                    spent_micros=spent,
                    budget_micros=got.get("budget_micros"),
                    hard_budget_micros=got.get("hard_budget_micros"),
                )

            by_user, progs = programs.spent(c, account_id, limit)
            return dict(
                account=level("account", account_id, "", sum(by_user.values())),
                users=[level("user", u, n, by_user.get(u, 0)) for u, n in user_ids.items()],
                programs=[
                    level("program", p["id"], " ".join(json.loads(p["argv"]))[:80],
                          p["spent_micros"])
                    for p in progs
                ],
            )  # fmt: skip

        return await self._db.read(op)


class BudgetCheck:
    """Compute's `Budget`: limits and budgets at account, user and program level."""

    def check(
        self, c: Conn, program_id: str, instances: int, storage_mb: int, bandwidth_mbps: int
    ) -> None:
        """Raise LimitExceeded/BudgetExhausted if the program may not add these resources."""
        if instances <= 0 and storage_mb <= 0 and bandwidth_mbps <= 0:
            return  # adds nothing: no limit nor budget can refuse it (`lim.check`)
        lim.check(_levels(c, program_id), lim.Delta(instances, storage_mb, bandwidth_mbps))

    def set_program_limits(self, c: Conn, program_id: str, body: Mapping[str, Any]) -> None:
        """Set a new program's own limits."""
        c.execute("INSERT INTO limits VALUES('program',?,?)", (program_id, to_json(dict(body))))

    def headroom(self, c: Conn, program_id: str) -> int:
        """How many more instances the limits allow this program (large if unlimited)."""
        room = 1 << 30
        for _, limits_, use in _levels(c, program_id):
            if limits_.max_instances is not None:
                room = min(room, limits_.max_instances - use.instances)
            if lim.budget_state(use.spent_micros, limits_) is not lim.BudgetState.OK:
                room = 0
        return max(room, 0)

    def program_budget(self, c: Conn, program_id: str) -> int | None:
        """The program's own soft budget in micros (None: none)."""
        budget = limits(c, "program", program_id).get("budget_micros")
        return None if budget is None else int(budget)


# -- run inside a transaction (this repository's or compute's) -------------------


_STOPPING = ("hard_budget_micros", "max_instances", "max_storage_mb", "max_bandwidth_mbps")


def _stop_breaches(
    c: Conn,
    now: float,
    net_bytes: Mapping[str, int],
    secs: Mapping[str, int],
    storage: Mapping[str, int],
    suspendable: Callable[[Sequence[str]], bool],
) -> list[Stopped]:
    """Stop every active program past a limit; return what was stopped."""
    # Only programs under some limit that stops can be stopped: find those scopes first.
    limited = {
        (r[0], r[1])
        for r in c.execute(
            "SELECT scope, scope_id FROM limits WHERE "
            + " OR ".join(f"json_extract(body, '$.{k}') IS NOT NULL" for k in _STOPPING)
        )
    }
    if not limited:
        return []
    stopped = []
    for p in programs.active_owners(c):
        if not limited & {
            ("account", p["account_id"]),
            ("user", p["user_id"]),
            ("program", p["id"]),
        }:
            continue
        levels = _levels(c, p["id"])
        measured = {level: use for level, _, use in levels}
        # Bandwidth as metered this pass (bytes over its whole seconds) where it is
        # above the declared reservation.
        seconds = secs.get(p["id"], 0)
        use = measured[lim.Level.PROGRAM]
        if seconds and net_bytes.get(p["id"]):
            mbps = net_bytes[p["id"]] * 8 // (1_000_000 * seconds)
            if mbps > use.bandwidth_mbps:
                use = replace(use, bandwidth_mbps=mbps)
        # Storage as its instances measured the program's view (declared where none did).
        if p["id"] in storage:
            use = replace(use, storage_mb=storage[p["id"]])
        measured[lim.Level.PROGRAM] = use
        found = lim.breach([(level, limits_) for level, limits_, _ in levels], measured)
        if found is None:
            continue
        instances = tuple(r["instance"] for r in programs.instance_uses(c, p["id"]))
        suspend = (
            found.resource == "hard_budget_micros" and bool(instances) and suspendable(instances)
        )
        s = Stopped(p["id"], found, instances, suspend)
        if suspend:
            programs.suspend(c, p["id"], s.reason, now)
        else:
            programs.end(c, p["id"], found.state, s.reason, None, None, now)
        programs.set_stop(c, p["id"], stop_info(found))
        stopped.append(s)
    return stopped


def stop_info(b: lim.Breach) -> dict[str, Any]:
    """A breach as the API shows it (`Program.stop`)."""
    return dict(level=b.level.value, resource=b.resource, limit=b.limit, value=b.value)


def _bill_late_net(
    c: Conn, program_id: str, nbytes: int, rates: pricing.Rates, models: dict[str, str]
) -> int:
    """Bill measured bytes of a program no longer metered; the records written (0/1)."""
    try:
        p = programs.program_row(c, program_id, None)
    except NotFound:
        return 0
    if p["account_id"] not in models:
        models[p["account_id"]] = accounts.pricing_model(c, p["account_id"])
    model = pricing.PricingModel(models[p["account_id"]])
    ch = pricing.charge(pricing.Metered(0, [], 0, nbytes), model, rates)
    detail = dict(
        instance_micros=0.0,
        storage_micros=0.0,
        net_micros=float(ch.net_micros),
        premium_micros=float(ch.premium_micros),
    )
    c.execute(
        "INSERT INTO billing(program_id, account_id, user_id, start, end, seconds,"
        " model, amount_micros, detail) VALUES(?,?,?,?,?,?,?,?,?)",
        (
            p["id"], p["account_id"], p["user_id"], p["last_metered"], p["last_metered"], 0,
            model.value, ch.amount_micros, to_json(detail),
        ),
    )  # fmt: skip
    programs.charge(c, p["id"], ch.amount_micros, p["last_metered"])
    accounts.add_spent(c, p["account_id"], p["user_id"], ch.amount_micros)
    return 1


def limits(c: Conn, scope: str, scope_id: str) -> dict[str, Any]:
    """The limits set at one scope (empty dict: unlimited)."""
    r = c.execute(
        "SELECT body FROM limits WHERE scope=? AND scope_id=?", (scope, scope_id)
    ).fetchone()
    return json.loads(r["body"]) if r else {}


def _usage(c: Conn, scope: str, scope_id: str) -> lim.Usage:
    """Usage of active programs in a scope (account, user or program)."""
    inst, storage, bandwidth, spent = programs.usage(c, scope, scope_id)
    if scope != "program":
        spent = accounts.spent(c, scope, scope_id)
    return lim.Usage(inst, storage, bandwidth, spent)


def _as_limits(d: Mapping[str, Any]) -> lim.Limits:
    return lim.Limits(**{k: d.get(k) for k in lim.Limits.__dataclass_fields__})


def _levels(c: Conn, program_id: str) -> list[tuple[lim.Level, lim.Limits, lim.Usage]]:
    """Limits and usage at each level.  A level without any limit gets zero usage
    without querying it: with every limit None, no check can fail there."""
    account_id, user_id = programs.owner(c, program_id)
    scopes = (
        (lim.Level.ACCOUNT, "account", account_id),
        (lim.Level.USER, "user", user_id),
        (lim.Level.PROGRAM, "program", program_id),
    )
    # The three levels' limits in one read (a placement's check, issue 15).
    bodies = {
        (r[0], r[1]): r[2]
        for r in c.execute(
            "SELECT scope, scope_id, body FROM limits WHERE (scope='account' AND scope_id=?)"
            " OR (scope='user' AND scope_id=?) OR (scope='program' AND scope_id=?)",
            (account_id, user_id, program_id),
        )
    }
    out = []
    for level, scope, sid in scopes:
        body = bodies.get((scope, sid))
        limits_ = _as_limits(json.loads(body)) if body else _NO_LIMITS
        use = _usage(c, scope, sid) if limits_ != _NO_LIMITS else lim.Usage()
        out.append((level, limits_, use))
    return out


_NO_LIMITS = lim.Limits()


def bandwidth_cap_kbit(c: Conn, program_id: str) -> int:
    """The tightest `max_bandwidth_mbps` of the program's account, user and program, in
    kbit/s (0: no limit); the network manager shapes the program's egress to it."""
    caps = [
        limits_.max_bandwidth_mbps
        for _, limits_, _ in _levels(c, program_id)
        if limits_.max_bandwidth_mbps is not None
    ]
    return max(min(caps) * 1000, 8) if caps else 0
