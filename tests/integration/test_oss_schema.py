"""The schema a fresh OSS database gets is the recorded one (the store split's proof).

`data/schema.sql` is the `sqlite_master` of a freshly migrated database taken before
the migrations were split by service, SQL whitespace-normalised (fragments may be
re-indented), rows sorted by name, then `PRAGMA user_version`.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from oss.db.store import Store
from oss.schema import VERSIONS

GOLDEN = Path(__file__).parent / "data" / "schema.sql"


def dump(db: Path) -> str:
    """The comparable text of a database's schema (same format as the golden file)."""
    conn = sqlite3.connect(db)
    try:
        lines = [
            f"{r[:3]} {' '.join((r[3] or '').split())}"
            for r in conn.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
            )
        ]
        lines.append(str(conn.execute("PRAGMA user_version").fetchone()))
    finally:
        conn.close()
    return "\n".join(lines) + "\n"


def test_fresh_database_has_the_recorded_schema(tmp_path: Path) -> None:
    async def go() -> None:
        s = Store(tmp_path, VERSIONS)
        await s.open()
        await s.close()

    asyncio.run(go())
    assert dump(tmp_path / "oss.sqlite3") == GOLDEN.read_text()
