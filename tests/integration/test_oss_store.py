"""The SQLite store: migrations, pragmas, group commit with per-operation rollback."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from oss.accounts.store import Accounts
from oss.db.migrations import migrate, script
from oss.db.store import Store, connect
from oss.errors import Conflict
from oss.schema import VERSIONS


def test_pragmas_and_latest_schema(tmp_path: Path) -> None:
    async def go() -> None:
        s = Store(tmp_path, VERSIONS)
        await s.open()
        try:
            mode = await s.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
            ver = await s.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0])
            sync = await s.write(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
            assert (mode, ver, sync) == ("wal", len(VERSIONS), 2)  # 2 = FULL
        finally:
            await s.close()

    asyncio.run(go())


def test_migration_2_backfills_spend_from_version_1(tmp_path: Path) -> None:
    path = tmp_path / "oss.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(script(VERSIONS[0]))
    conn.execute("INSERT INTO accounts VALUES('a1','acme',0,'sum',0)")
    conn.execute("INSERT INTO users VALUES('u1','a1','bob',0)")
    for amount in (5, 7):
        conn.execute(
            "INSERT INTO billing(program_id, account_id, user_id, start, end, seconds, model,"
            " amount_micros, detail) VALUES('p','a1','u1',0,1,1,'sum',?,'{}')",
            (amount,),
        )
    conn.close()
    c = connect(path)
    migrate(c, VERSIONS)
    assert c.execute("SELECT spent_micros FROM accounts").fetchone()[0] == 12
    assert c.execute("SELECT spent_micros FROM users").fetchone()[0] == 12
    assert c.execute("PRAGMA user_version").fetchone()[0] == len(VERSIONS)
    c.close()


def test_failing_operation_rolls_back_alone_in_a_group_commit(tmp_path: Path) -> None:
    async def go() -> list[Any]:
        s = Store(tmp_path, VERSIONS)
        await s.open()
        try:

            def ok(i: int) -> Any:
                return lambda c: (
                    c.execute("INSERT INTO leases VALUES(?,NULL,1,0)", (f"k{i}",)).rowcount
                )

            def bad(c: Any) -> None:
                c.execute("INSERT INTO leases VALUES('doomed',NULL,1,0)")
                raise Conflict("no")

            res = await asyncio.gather(
                *(s.write(ok(i)) for i in range(50)), s.write(bad), return_exceptions=True
            )
            names = await s.read(lambda c: {r[0] for r in c.execute("SELECT name FROM leases")})
            assert "doomed" not in names and len(names) == 50
            return res
        finally:
            await s.close()

    res = asyncio.run(go())
    assert res[:50] == [1] * 50 and isinstance(res[50], Conflict)


def test_second_process_style_connection_sees_committed_state(tmp_path: Path) -> None:
    async def go() -> None:
        s = Store(tmp_path, VERSIONS)
        await s.open()
        try:
            await Accounts(s).create_account("acme", False, "sum", "u")
            other = connect(s.path)
            assert other.execute("SELECT name FROM accounts").fetchone()[0] == "acme"
            other.close()
            with pytest.raises(Conflict):
                await Accounts(s).create_account("acme", False, "sum", "u")
        finally:
            await s.close()

    asyncio.run(go())


def test_use_after_close_fails_fast(tmp_path: Path) -> None:
    from oss.errors import StoreError

    async def go() -> None:
        s = Store(tmp_path, VERSIONS)
        await s.open()
        await s.close()
        with pytest.raises(StoreError, match="closed"):
            await s.write(lambda c: None)
        with pytest.raises(StoreError, match="not open"):
            await s.read(lambda c: None)

    asyncio.run(go())


def test_failed_commit_fails_the_batch_and_the_writer_survives(tmp_path: Path) -> None:
    from oss.errors import StoreError

    async def go() -> None:
        s = Store(tmp_path, VERSIONS)
        await s.open()
        try:
            # An operation that breaks the writer's own bookkeeping: its RELEASE then fails.
            def sabotage(c: Any) -> None:
                c.execute("RELEASE op")

            with pytest.raises(StoreError):
                await s.write(sabotage)
            assert await s.write(lambda c: 42) == 42  # the writer thread is still there
        finally:
            await s.close()

    asyncio.run(go())


# Holds the database's write lock (another process, as a second `dcp-oss` command
# would) until a line arrives on stdin.
HOLD_LOCK = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
c.execute("COMMIT")
"""


def test_a_write_waits_for_another_process_lock_off_the_loop(tmp_path: Path) -> None:
    """Write operations and short reads run on the event loop (issue 15): a write that
    must wait for another process's lock waits on the writer's thread, and the loop
    goes on answering meanwhile."""

    async def go() -> None:
        s = Store(tmp_path, VERSIONS)
        await s.open()
        holder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            HOLD_LOCK,
            str(s.path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert holder.stdin is not None and holder.stdout is not None
        try:
            assert await asyncio.wait_for(holder.stdout.readline(), 60) == b"locked\n"
            here = threading.get_ident()
            assert await s.read(lambda c: threading.get_ident(), short=True) == here
            assert await s.read(lambda c: threading.get_ident()) != here  # a reader thread

            def add(c: Any) -> int:
                return int(c.execute("INSERT INTO leases VALUES('late',NULL,1,0)").rowcount)

            def count(c: Any) -> int:
                return int(c.execute("SELECT count(*) FROM leases").fetchone()[0])

            write = asyncio.ensure_future(s.write(add))
            for _ in range(20):  # the loop runs, short reads answer, the write waits
                assert await s.read(count, short=True) == 0
                await asyncio.sleep(0.01)
            assert not write.done()
            holder.stdin.write(b"go\n")
            await holder.stdin.drain()
            assert await asyncio.wait_for(write, 60) == 1
            assert await asyncio.wait_for(holder.wait(), 60) == 0
        finally:
            if holder.returncode is None:
                holder.kill()
                await holder.wait()
            await s.close()

    asyncio.run(go())
