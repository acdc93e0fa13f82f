"""The failover state's SQL (issue 12): what `oss.compute.failover.Failover` keeps
so that a restarted OSS goes on checkpointing its programs and restoring the
sessions of lost instances.

Every function takes a connection inside the caller's transaction
(`Store.write`/`read`).  The checkpoint files themselves stay under the OSS's
data directory; `failover_checkpoints` is their index (who holds each session,
what the file holds), and `Failover.load` keeps only rows whose file is whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from oss import models as m
from oss.db.store import Conn


@dataclass(slots=True)
class Row:
    """A stored checkpoint's index entry."""

    program: str
    session: str
    holder: str  # the instance holding the session now
    instance: str  # where the checkpoint was taken
    pid: int
    nonce: str
    argv: str
    taken: float
    size: int


@dataclass(slots=True)
class Saved:
    """Everything `load` reads back."""

    every: dict[str, float] = field(default_factory=dict)
    ordered: dict[str, set[str]] = field(default_factory=dict)
    checkpoints: list[Row] = field(default_factory=list)
    restorations: dict[str, list[m.Restoration]] = field(default_factory=dict)
    fenced: dict[str, set[str]] = field(default_factory=dict)
    capable: set[str] = field(default_factory=set)


def load(c: Conn) -> Saved:
    """The whole failover state."""
    out = Saved()
    for r in c.execute("SELECT program_id, every FROM failover_policies"):
        out.every[str(r["program_id"])] = float(r["every"])
    for r in c.execute("SELECT program_id, instance FROM failover_ordered"):
        out.ordered.setdefault(str(r["program_id"]), set()).add(str(r["instance"]))
    for r in c.execute(
        "SELECT program_id, session, holder, instance, pid, nonce, argv, taken, size"
        " FROM failover_checkpoints ORDER BY program_id, session"
    ):
        out.checkpoints.append(Row(*r))
    rows = c.execute("SELECT program_id, restoration_json FROM failover_restorations ORDER BY id")
    for r in rows:
        found = m.Restoration.model_validate_json(r["restoration_json"])
        out.restorations.setdefault(str(r["program_id"]), []).append(found)
    for r in c.execute("SELECT instance, program_id FROM failover_fenced"):
        out.fenced.setdefault(str(r["instance"]), set()).add(str(r["program_id"]))
    capable = c.execute("SELECT instance FROM checkpoint_instances")
    out.capable = {str(r["instance"]) for r in capable}
    return out


def want(c: Conn, program: str, every: float) -> None:
    """The program's checkpoint interval."""
    c.execute("INSERT OR REPLACE INTO failover_policies VALUES(?,?)", (program, every))


def ordered(c: Conn, program: str, instance: str) -> None:
    """`instance` was given the program's policy."""
    c.execute("INSERT OR IGNORE INTO failover_ordered VALUES(?,?)", (program, instance))


def put(c: Conn, row: Row) -> None:
    """A checkpoint (its file is whole and in place)."""
    c.execute(
        "INSERT OR REPLACE INTO failover_checkpoints VALUES(?,?,?,?,?,?,?,?,?)",
        (row.program, row.session, row.holder, row.instance, row.pid, row.nonce, row.argv,
         row.taken, row.size),
    )  # fmt: skip


def hold(c: Conn, program: str, session: str, holder: str) -> None:
    """The session is held by `holder` now (migrated or restored there)."""
    c.execute(
        "UPDATE failover_checkpoints SET holder=? WHERE program_id=? AND session=?",
        (holder, program, session),
    )


def drop(c: Conn, program: str, session: str) -> None:
    """The session's checkpoint is gone."""
    c.execute(
        "DELETE FROM failover_checkpoints WHERE program_id=? AND session=?", (program, session)
    )


def restored(c: Conn, program: str, restoration: m.Restoration) -> None:
    """A restoration the program's home is to hear of (done or given up)."""
    c.execute(
        "INSERT INTO failover_restorations(program_id, restoration_json) VALUES(?,?)",
        (program, restoration.model_dump_json()),
    )


def fence(c: Conn, instance: str, programs: set[str]) -> None:
    """The lost `instance` held `programs`: their copies there are killed if it returns."""
    c.executemany(
        "INSERT OR IGNORE INTO failover_fenced VALUES(?,?)", [(instance, p) for p in programs]
    )


def unfence(c: Conn, instance: str) -> None:
    """`instance` registered again and was fenced."""
    c.execute("DELETE FROM failover_fenced WHERE instance=?", (instance,))


def capable(c: Conn, instance: str, ok: bool) -> None:
    """Whether the instance's CRIU works (its agent says at each registration)."""
    if ok:
        c.execute("INSERT OR IGNORE INTO checkpoint_instances VALUES(?)", (instance,))
    else:
        c.execute("DELETE FROM checkpoint_instances WHERE instance=?", (instance,))


def forget(c: Conn, program: str) -> None:
    """The program ended: its policy, checkpoints and restorations go."""
    for table in ("failover_policies", "failover_ordered", "failover_checkpoints",
                  "failover_restorations"):  # fmt: skip
        c.execute(f"DELETE FROM {table} WHERE program_id=?", (program,))  # noqa: S608

