"""The one ordered migration sequence: numbered 1..N, applied once each, in order."""

from __future__ import annotations

import sqlite3

import pytest

from oss.db.migrations import SchemaSequenceError, check_sequence, migrate, script
from oss.schema import VERSIONS


@pytest.mark.parametrize(
    "numbers", [(2,), (1, 3), (1, 1), (2, 1)], ids=["no-1", "gap", "repeat", "order"]
)
def test_a_broken_sequence_is_refused(numbers: tuple[int, ...]) -> None:
    with pytest.raises(SchemaSequenceError, match="1..N"):
        check_sequence([(n, ("",)) for n in numbers])


def test_the_oss_sequence_is_contiguous() -> None:
    check_sequence(VERSIONS)
    assert [n for n, _ in VERSIONS] == list(range(1, len(VERSIONS) + 1))


def test_a_version_is_its_fragments_in_one_transaction() -> None:
    text = script((7, ("CREATE TABLE a(x);", "CREATE TABLE b(y);")))
    assert text == (
        "BEGIN IMMEDIATE;\nCREATE TABLE a(x);\nCREATE TABLE b(y);\nPRAGMA user_version=7;\nCOMMIT;"
    )


def test_migrate_applies_only_the_versions_not_yet_seen() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    versions = [(1, ("CREATE TABLE t(n INTEGER);",)), (2, ("INSERT INTO t VALUES(2);",))]
    migrate(conn, versions[:1])
    conn.execute("INSERT INTO t VALUES(1)")
    migrate(conn, versions)
    migrate(conn, versions)  # nothing left to apply: the insert of version 2 runs once
    assert [r[0] for r in conn.execute("SELECT n FROM t ORDER BY n")] == [1, 2]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
