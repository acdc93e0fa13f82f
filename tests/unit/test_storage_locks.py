"""oss.storage.locks: the lock table the storage server keeps for every instance."""

from __future__ import annotations

import asyncio
import errno

from oss.storage.locks import EOF_END, LockTable, Owner, Range

A = Owner(1, "posix", 10)
B = Owner(2, "posix", 10)  # the same lock_owner number on another connection: another owner
F = Owner(2, "flock", 10)


def test_write_locks_conflict_read_locks_share_and_kinds_are_apart() -> None:
    table = LockTable()
    assert table.try_set("/v0/f", Range(A, "r", 0, 9, 100)) is None
    assert table.try_set("/v0/f", Range(B, "r", 5, 20, 200)) is None
    held = table.try_set("/v0/f", Range(B, "w", 0, 0, 200))
    assert held is not None and held.pid == 100
    assert table.try_set("/v0/f", Range(F, "w", 0, EOF_END, 200)) is None  # flock vs posix


def test_an_unlock_splits_the_owners_range() -> None:
    table = LockTable()
    table.try_set("/v0/f", Range(A, "w", 0, 99, 100))
    table.try_set("/v0/f", Range(A, "u", 10, 19, 100))
    assert table.conflict("/v0/f", Range(B, "w", 10, 19, 200)) is None
    assert table.conflict("/v0/f", Range(B, "w", 5, 5, 200)) is not None
    assert table.conflict("/v0/f", Range(B, "w", 50, 50, 200)) is not None


def test_a_waiter_is_granted_when_the_holders_connection_ends() -> None:
    async def main() -> tuple[int, int, int]:
        table = LockTable()
        table.try_set("/v0/f", Range(A, "w", 0, EOF_END, 100))
        nowait = await table.set("/v0/f", Range(B, "w", 0, EOF_END, 200), wait=False)
        waiter = asyncio.ensure_future(table.set("/v0/f", Range(B, "w", 0, EOF_END, 200), True))
        await asyncio.sleep(0)
        dropped = table.drop_connection(A.conn)  # the lease of A's instance ended
        return nowait, dropped, await asyncio.wait_for(waiter, 5)

    assert asyncio.run(main()) == (errno.EAGAIN, 1, 0)
