"""The storage service's SQL: programs' storage specs and the instances mounting them.

Every function takes a connection inside the caller's transaction
(`Store.write`/`read`).
"""

from __future__ import annotations

import json
from typing import Any

from oss.db.store import Conn


def put_spec(c: Conn, program_id: str, spec: dict[str, Any], now: float) -> None:
    """Declare (or replace) the program's storage; a replaced one's mounts stay."""
    c.execute(
        "INSERT OR REPLACE INTO storage_specs VALUES(?,?,?)",
        (program_id, json.dumps(spec, sort_keys=True), now),
    )


def spec_of(c: Conn, program_id: str) -> tuple[dict[str, Any], set[str]] | None:
    """The program's spec and the instances that mount it (None: none declared)."""
    row = c.execute(
        "SELECT spec_json FROM storage_specs WHERE program_id=?", (program_id,)
    ).fetchone()
    if row is None:
        return None
    mounted = {
        str(r["instance"])
        for r in c.execute("SELECT instance FROM storage_mounts WHERE program_id=?", (program_id,))
    }
    return dict(json.loads(row["spec_json"])), mounted


def mounted(c: Conn, program_id: str, instance: str) -> None:
    """`instance` mounts the program's storage."""
    c.execute("INSERT OR IGNORE INTO storage_mounts VALUES(?,?)", (program_id, instance))


def forget(c: Conn, program_id: str) -> None:
    """The program's storage is gone (unmounted everywhere)."""
    c.execute("DELETE FROM storage_specs WHERE program_id=?", (program_id,))
    c.execute("DELETE FROM storage_mounts WHERE program_id=?", (program_id,))


def forget_instance(c: Conn, instance: str) -> None:
    """A failed instance mounts nothing any more."""
    c.execute("DELETE FROM storage_mounts WHERE instance=?", (instance,))
