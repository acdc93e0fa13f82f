"""The migration runner: applies one ordered sequence of schema versions.

The sequence itself lives in `oss.schema` (assembled from each service's
`schema.py` fragments); this module knows no service.  Version n is applied as
one script: its fragments joined, `PRAGMA user_version=n`, in one transaction.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence

from oss.errors import StoreError

log = logging.getLogger(__name__)

# (version number, its DDL fragments in order)
Version = tuple[int, tuple[str, ...]]


class SchemaSequenceError(StoreError):
    """The schema versions are not numbered 1..N in order."""


def check_sequence(versions: Sequence[Version]) -> None:
    """Raise unless the versions are numbered 1, 2, ... N with no gap or repeat."""
    numbers = [n for n, _ in versions]
    if numbers != list(range(1, len(numbers) + 1)):
        raise SchemaSequenceError(f"schema versions must be 1..N in order, got {numbers}")


def script(version: Version) -> str:
    """The one transaction that applies a version."""
    n, fragments = version
    body = "\n".join(fragments)
    return f"BEGIN IMMEDIATE;\n{body}\nPRAGMA user_version={n};\nCOMMIT;"


def migrate(conn: sqlite3.Connection, versions: Sequence[Version]) -> None:
    """Apply the versions the database has not seen yet."""
    check_sequence(versions)
    have = conn.execute("PRAGMA user_version").fetchone()[0]
    for version in versions:
        if version[0] > have:
            conn.executescript(script(version))
            log.info("store migrated to version %d", version[0])
