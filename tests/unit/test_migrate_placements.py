"""A moved process's slot follows it; a draining instance takes no placements (issue 12).

On the OSS's real schema (SQLite, every migration), with the compute store's SQL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from oss.compute import scheduler
from oss.compute.instances import candidates, move_slot, release_placed
from oss.db.migrations import migrate
from oss.db.store import connect
from oss.schema import VERSIONS

SHARED = scheduler.SelectionPolicy(None, None, None, None, scheduler.Tenancy.SHARED)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = connect(tmp_path / "oss.sqlite3")
    migrate(c, VERSIONS)
    c.execute("PRAGMA foreign_keys=OFF")  # placements of a program row this test does not make
    for name in ("a", "b"):
        c.execute(
            "INSERT INTO instances(name, state, cpus, slots, created) VALUES(?,'ready',1,4,0)",
            (name,),
        )
    c.execute("INSERT INTO placements VALUES('p','a',2,'acct','user')")
    c.execute("UPDATE instances SET used_slots=2 WHERE name='a'")
    yield c
    c.close()


def slots(c: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """instance -> (used slots, the program's placed processes)."""
    used = dict(c.execute("SELECT name, used_slots FROM instances").fetchall())
    placed = dict(c.execute("SELECT instance, processes FROM placements").fetchall())
    return {n: (used[n], placed.get(n, 0)) for n in sorted(used)}


def test_a_moved_process_takes_its_slot_and_its_release_follows_it(
    db: sqlite3.Connection,
) -> None:
    move_slot(db, "p", "a", "b")
    assert slots(db) == {"a": (1, 1), "b": (1, 1)}
    # The home releases both naming `a`, where it placed them: the one still there,
    # then the moved one, released where it went.
    assert release_placed(db, "p", "a", 1) == 1
    assert slots(db) == {"a": (0, 0), "b": (1, 1)}
    assert release_placed(db, "p", "a", 1) == 1
    assert slots(db) == {"a": (0, 0), "b": (0, 0)}
    assert release_placed(db, "p", "a", 1) == 0  # nothing left to release


def test_there_and_back_leaves_the_slot_where_it_runs(db: sqlite3.Connection) -> None:
    move_slot(db, "p", "a", "b")
    move_slot(db, "p", "b", "a")
    assert slots(db) == {"a": (2, 2), "b": (0, 0)}
    assert release_placed(db, "p", "a", 2) == 2
    assert slots(db) == {"a": (0, 0), "b": (0, 0)}


def test_a_draining_instance_is_no_candidate_even_for_its_own_programs(
    db: sqlite3.Connection,
) -> None:
    assert {c.name for c in candidates(db, "p", SHARED)} == {"a", "b"}
    db.execute("UPDATE instances SET draining=1 WHERE name='a'")
    assert {c.name for c in candidates(db, "p", SHARED)} == {"b"}
