"""The telemetry repository of logs: zstd chunks of program and OSS log lines.

Ownership is checked through compute's conn-level functions inside the same
transaction: a program's log is its account's, and an agent appends only to
programs placed on its instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from oss.compute import programs
from oss.db.store import Conn, Store
from oss.errors import NotFound
from oss.telemetry import logs as logmod


class Logs:
    """Program logs and the OSS log (program None)."""

    def __init__(self, db: Store) -> None:
        self._db = db

    async def append_logs(
        self,
        account_id: str | None,
        program_id: str | None,
        lines: Sequence[logmod.LogLine],
        instance_owner: str | None = None,
    ) -> int:
        """Append lines (zstd chunks of up to CHUNK_LINES per instance); durable on return."""
        blobs = chunk_blobs(lines)

        def op(c: Conn) -> int:
            acct = account_id
            if program_id is not None:
                p = programs.program_row(c, program_id, account_id)
                acct = p["account_id"]
                if instance_owner is not None and not programs.is_placed(
                    c, program_id, instance_owner
                ):
                    raise NotFound(f"program {program_id} on instance {instance_owner}")
            return insert_chunks(c, acct, program_id, blobs)

        return await self._db.write(op)

    async def read_logs(
        self, account_id: str | None, program_id: str | None, q: logmod.LogQuery
    ) -> tuple[list[tuple[int, logmod.LogLine]], int, int]:
        """A page of a program's log (or the OSS log: program None) from `q.cursor`.

        Returns (lines, the cursor after them, chunks decoded).  Chunks are read
        and decompressed one at a time on a reader thread, up to the one holding
        the page's last line: the cost follows what is returned, not the log size.
        """
        start_chunk, _ = logmod.split_cursor(q.cursor)

        def op(c: Conn) -> tuple[list[tuple[int, logmod.LogLine]], int, int]:
            if program_id is not None:
                programs.check_program(c, program_id, account_id)
            # The last chunk first: chunks committed while this page is read are not
            # skipped by the cursor (the read transaction is one snapshot anyway).
            last = c.execute(
                "SELECT coalesce(max(id), 0) FROM log_chunks WHERE program_id IS ?", (program_id,)
            ).fetchone()[0]
            where = ["program_id IS ?", "id >= ?", "id <= ?"]
            args: list[Any] = [program_id, start_chunk, last]
            if q.instance is not None:
                where.append("instance IS ?")
                args.append(q.instance)
            if q.since is not None:
                where.append("ts_max >= ?")
                args.append(q.since)
            if q.until is not None:
                where.append("ts_min <= ?")
                args.append(q.until)
            rows = c.execute(
                "SELECT id, data FROM log_chunks WHERE " + " AND ".join(where) + " ORDER BY id",
                args,
            )
            lines, after, decoded = logmod.page(((r[0], r[1]) for r in rows), q)
            if after is None:  # read to the end: resume after the last chunk
                after = max(q.cursor, logmod.cursor(last + 1, 0))
            return lines, after, decoded

        return await self._db.read(op)


# A stored chunk before insertion: (instance, ts_min, ts_max, lines, zstd data).
Blob = tuple[str | None, float, float, int, bytes]


def chunk_blobs(lines: Sequence[logmod.LogLine]) -> list[Blob]:
    """Lines as compressed chunks, one run per instance (off the writer: zstd costs)."""
    groups: dict[str | None, list[logmod.LogLine]] = {}
    for ln in lines:
        groups.setdefault(ln.instance, []).append(ln)
    return [
        (inst, chunk[0].ts, chunk[-1].ts, len(chunk), logmod.encode(chunk))
        for inst, g in groups.items()
        for chunk in logmod.chunks_of(g)
    ]


def insert_chunks(
    c: Conn, account_id: str | None, program_id: str | None, blobs: Sequence[Blob]
) -> int:
    """Store compressed chunks in the caller's transaction; the number of lines."""
    for inst, lo, hi, n, blob in blobs:
        c.execute(
            "INSERT INTO log_chunks(account_id, program_id, instance, ts_min, ts_max,"
            " n, data) VALUES(?,?,?,?,?,?,?)",
            (account_id, program_id, inst, lo, hi, n, blob),
        )
    return sum(b[3] for b in blobs)
