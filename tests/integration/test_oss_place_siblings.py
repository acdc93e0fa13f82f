"""A placement decided over the program's own instances (issue 15's short path) is the
plan the scheduler makes over every candidate: real SQLite, the real store functions."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

from oss import models as m
from oss.accounts.store import Accounts, Principal
from oss.billing.store import BudgetCheck
from oss.compute import programs as progs
from oss.compute import scheduler
from oss.compute.instances import Instances, candidates
from oss.db.store import Conn, Store, connect
from oss.errors import NoCapacity
from oss.schema import VERSIONS


async def _setup(data: Path, widths: list[int]) -> list[str]:
    """Eight 2-CPU instances (4 slots each) and a program per target width."""
    store = Store(data, VERSIONS)
    await store.open()
    try:
        accounts, instances = Accounts(store), Instances(store)
        programs = progs.Programs(store, BudgetCheck())
        acct, user, _ = await accounts.create_account("a", False, "sum", "u")
        who = Principal(acct["id"], user["id"], False, "t")
        for i in range(8):
            await instances.mint_instance_token(f"i{i}")
            await instances.register_instance(f"i{i}", "a:1", "h", 2, 1, 2)
        out = []
        for width in widths:
            scaling = m.ScalingPolicy(min_instances=width, max_instances=width)
            spec = m.ProgramSubmit(argv=["x"]).model_dump(mode="json")
            spec["resource_policy"] = m.ResourcePolicy().model_dump(mode="json")
            spec["scaling_policy"] = scaling.model_dump(mode="json")
            out.append((await programs.submit(who, spec, None))["id"])
        return out
    finally:
        await store.close()


def _full_plan(c: Conn, program_id: str, processes: int) -> list[tuple[str, int]] | None:
    """The scheduler's plan over every candidate (None: no capacity), reserving nothing."""
    p = c.execute(
        "SELECT resource_policy, target_instances FROM programs WHERE id=?", (program_id,)
    ).fetchone()
    rp = json.loads(p[0])
    policy = scheduler.SelectionPolicy(tenancy=scheduler.Tenancy(rp.get("tenancy", "shared")))
    current = dict(
        c.execute(
            "SELECT instance, processes FROM placements WHERE program_id=?", (program_id,)
        ).fetchall()
    )
    try:
        plan = scheduler.place(
            program_id, processes, policy, candidates(c, program_id, policy), current, p[1]
        )
    except NoCapacity:
        return None
    return [(a.instance, a.processes) for a in plan]


def test_sibling_placements_match_the_full_candidate_plan(tmp_path: Path) -> None:
    ids = asyncio.run(_setup(tmp_path, [1, 1, 2, 3]))
    c = connect(tmp_path / "oss.sqlite3")
    rnd = random.Random(15)
    shortcuts = fallbacks = 0
    try:
        c.execute("BEGIN IMMEDIATE")
        for _ in range(60):  # until the 32 slots run out, interleaving the programs
            pid = rnd.choice(ids)
            n = rnd.choice((1, 1, 1, 2, 3))
            want = _full_plan(c, pid, n)
            width = c.execute("SELECT count(*) FROM placements WHERE program_id=?", (pid,))
            target = c.execute("SELECT target_instances FROM programs WHERE id=?", (pid,))
            if width.fetchone()[0] >= target.fetchone()[0] and want is not None:
                if all(inst in dict(_placed(c, pid)) for inst, _ in want):
                    shortcuts += 1
                else:
                    fallbacks += 1
            try:
                got = progs.place(c, BudgetCheck(), pid, n, 0.0)
            except NoCapacity:
                assert want is None
                continue
            assert [(a["instance"], a["processes"]) for a in got] == want
        c.execute("ROLLBACK")
    finally:
        c.close()
    # Both ways were taken: siblings with room, and siblings full (spill to a new one).
    assert shortcuts > 0 and fallbacks > 0


def _placed(c: Conn, pid: str) -> list[tuple[str, int]]:
    return [
        (r[0], r[1])
        for r in c.execute("SELECT instance, processes FROM placements WHERE program_id=?", (pid,))
    ]
