"""Durable OSS state in SQLite (WAL, synchronous=FULL): the shared database layer.

The store runs operations; it knows no service.  Each service's repository
(`oss/<service>/store.py`, `instances.py`, `programs.py`) holds its queries and
runs them through `Store.write`/`Store.read`; `oss.schema` is the schema.

Threading: the only write connection runs the write operations on the event
loop and commits (fsync) on a writer thread of its own; readers use a small
thread pool, each thread with its own connection (WAL lets them read while the
writer writes).  A write operation is a few short statements: on the loop it
costs less than the GIL hand-offs a thread of its own cost it per statement
(issue 15); waits (another process's lock, fsync) never happen on the loop.

Group commit: the writer takes every queued operation and runs each in its own
SAVEPOINT inside one `BEGIN IMMEDIATE` transaction, then commits once (one
fsync) and only then resolves the callers' futures; operations queued during
the commit make the next batch.  So:

* an acknowledged write is on disk (synchronous=FULL fsyncs the WAL at commit);
* operations are serialised, each sees every earlier one: the limit check and
  the reservation in compute's `submit`/`place` are atomic (no concurrent
  overshoot), and BEGIN IMMEDIATE keeps that true even if a second process
  opened the file;
* a failing operation rolls back to its savepoint alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from oss.db import datadir
from oss.db.migrations import Version, migrate
from oss.errors import StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")
BUSY_TIMEOUT_MS = 30000  # how long a connection waits for another process's lock
SHORT_PAGE = 100  # rows up to which a page read is `short` (runs on the loop: Store.read)
Conn = sqlite3.Connection


def new_id(prefix: str) -> str:
    """A random object id."""
    return f"{prefix}_{secrets.token_hex(8)}"


def to_json(v: Any) -> str:
    """Compact, key-sorted JSON for a TEXT column."""
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


class _Writer:
    """The only write connection: group commit of queued operations.

    The operations run on the event loop that submitted them, the transaction's
    BEGIN IMMEDIATE too (it waits for no lock there: another process's lock makes
    it wait on the writer's thread instead); only COMMIT, the fsync, runs on the
    writer's thread.  Run on a thread of their own, the operations' statements each
    gave the GIL up and waited to get it back from the loop: two context switches
    per statement, which cost more than the statements on a loaded core (issue 15).
    """

    def __init__(self, path: Path, versions: Sequence[Version], durable: bool = True) -> None:
        self._path = path
        self._durable = durable
        self._versions = versions
        self._queue: list[tuple[Callable[[Conn], Any], asyncio.Future[Any]]] = []
        self._thread: ThreadPoolExecutor | None = None
        self._conn: Conn | None = None
        self._driver: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Open the connection and migrate (blocking: call it off the loop)."""
        try:
            conn = connect(self._path)
            if not self._durable:
                conn.execute("PRAGMA synchronous=NORMAL")
            migrate(conn, self._versions)
            # BEGIN IMMEDIATE runs on the loop: it must not wait there (see _begin).
            conn.execute("PRAGMA busy_timeout=0")
        except BaseException as exc:
            raise StoreError(str(exc)) from exc
        self._conn = conn
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oss-store-writer")

    async def stop(self) -> None:
        """Finish the queued operations, then close the connection."""
        self._closed = True
        if self._driver is not None and not self._driver.done():
            await asyncio.wait([self._driver])
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def submit(self, fn: Callable[[Conn], Any], fut: asyncio.Future[Any]) -> None:
        # Checked here so a write after close fails instead of waiting forever.
        if self._closed or self._conn is None:
            raise StoreError("the store is closed")
        self._queue.append((fn, fut))
        if self._driver is None or self._driver.done():
            self._driver = fut.get_loop().create_task(self._drive())

    async def _drive(self) -> None:
        """Batches until the queue is empty: each one's operations, then one COMMIT."""
        loop = asyncio.get_running_loop()
        assert self._conn is not None and self._thread is not None
        conn, thread = self._conn, self._thread
        while self._queue:
            batch, self._queue = self._queue[:512], self._queue[512:]
            try:
                await self._begin(loop, conn, thread)
                results = self._run(conn, batch)
                await _finish(loop.run_in_executor(thread, conn.execute, "COMMIT"))
            except Exception as exc:  # disk full, I/O error...: the whole batch fails, loudly
                log.exception("store commit failed")
                try:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("store rollback failed")
                err = StoreError(f"commit failed: {exc}")
                results = [(fut, None, err) for _, fut in batch]
            _resolve_all(results)

    @staticmethod
    async def _begin(
        loop: asyncio.AbstractEventLoop, conn: Conn, thread: ThreadPoolExecutor
    ) -> None:
        """BEGIN IMMEDIATE: on the loop; if another process holds the write lock, on the
        writer's thread, waiting up to BUSY_TIMEOUT_MS for it."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if conn.in_transaction or "locked" not in str(exc):
                raise

        def wait() -> None:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            try:
                conn.execute("BEGIN IMMEDIATE")
            finally:
                conn.execute("PRAGMA busy_timeout=0")

        await _finish(loop.run_in_executor(thread, wait))

    @staticmethod
    def _run(
        conn: Conn, batch: list[tuple[Callable[[Conn], Any], asyncio.Future[Any]]]
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """Each operation in its own savepoint: a failing one rolls back alone."""
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        for fn, fut in batch:
            conn.execute("SAVEPOINT op")
            try:
                r = fn(conn)
            except BaseException as exc:  # the op's own failure: roll back just it
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                results.append((fut, None, exc))
            else:
                conn.execute("RELEASE op")
                results.append((fut, r, None))
        return results


async def _finish(step: asyncio.Future[Any]) -> Any:
    """Await a step on the writer's thread to its end, even when cancelled meanwhile:
    the connection must not be used on the loop while the thread still uses it."""
    try:
        return await asyncio.shield(step)
    except asyncio.CancelledError:
        await asyncio.wait([step])
        raise


def _resolve_all(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, r, e in items:
        if fut.cancelled():
            continue
        if e is not None:
            fut.set_exception(e)
        else:
            fut.set_result(r)


def connect(path: Path) -> Conn:
    """A connection with the OSS pragmas (autocommit: transactions are explicit)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


class Store:
    """Async facade over the SQLite state."""

    def __init__(
        self,
        data_dir: Path,
        versions: Sequence[Version],
        clock: Callable[[], float] = time.time,
        durable: bool = True,
    ) -> None:
        """`versions`: the schema sequence to migrate to (oss.schema.VERSIONS).

        `durable` False: commits are not fsynced (WAL, synchronous=NORMAL: still
        consistent, the last commits may be lost with the machine) - only for a
        store that does not outlive its process (the OSS of a `dcptrace
        --instances` run, in a temporary directory removed at its end).
        """
        self.path = datadir.prepare(data_dir)
        self.clock = clock
        self._writer = _Writer(self.path, versions, durable)
        self._local = threading.local()
        self._readers: ThreadPoolExecutor | None = None
        self._reader_conns: list[Conn] = []
        self._lock = threading.Lock()
        self._loop_conn: Conn | None = None  # short reads, on the event loop
        self._closed = False

    async def open(self) -> None:
        """Start the writer (runs migrations) and the readers."""
        await asyncio.to_thread(self._writer.start)
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="oss-store-reader")

    async def close(self) -> None:
        """Finish queued writes and close every connection."""
        self._closed = True
        await self._writer.stop()
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        with self._lock:
            for c in self._reader_conns:
                c.close()
            self._reader_conns.clear()
        if self._loop_conn is not None:
            self._loop_conn.close()
            self._loop_conn = None

    async def write(self, fn: Callable[[Conn], T]) -> T:
        """Run `fn` in the writer's transaction; returns after the commit is durable."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writer.submit(fn, fut)
        return await fut

    def submit(self, fn: Callable[[Conn], T]) -> asyncio.Future[T]:
        """Queue `fn` for the writer now, in order with every other write (for a caller
        that cannot wait); the future resolves once it is committed."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writer.submit(fn, fut)
        return fut

    async def read(self, fn: Callable[[Conn], T], *, short: bool = False) -> T:
        """Run `fn` on a reader connection (sees committed state).

        `short`: `fn` reads a few rows by index (a program, a page of ten): it runs
        on the event loop's own connection, without the two thread hand-offs a
        reader thread costs (more than such a read itself: issue 15).  If it would
        wait for a lock there, it runs on a reader thread instead.
        """
        if self._readers is None or self._closed:
            raise StoreError("the store is not open")
        if short:
            conn = self._loop_conn
            if conn is None:
                conn = self._loop_conn = connect(self.path)
                conn.execute("PRAGMA busy_timeout=0")  # never wait on the loop
            conn.execute("BEGIN")
            try:
                return fn(conn)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc):
                    raise
                # Busy (a WAL reset in progress, rare): a reader thread waits instead.
            finally:
                conn.execute("COMMIT")
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._read, fn)

    def _read(self, fn: Callable[[Conn], T]) -> T:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")


class WriteBehind:
    """Changes written to a store behind their caller, who cannot wait (in order with every
    other write); a change that fails is logged as `what` not saved.  `store` None: memory
    only, nothing written."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._pending: set[asyncio.Future[Any]] = set()

    def save(self, store: Store | None, fn: Callable[[Conn], Any]) -> None:
        """Queue `fn` for `store`'s writer now."""
        if store is None:
            return
        fut = store.submit(fn)
        self._pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: asyncio.Future[Any]) -> None:
        self._pending.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("%s not saved: %s", self.what, fut.exception())

    async def flush(self) -> None:
        """Wait for the changes on their way to the store."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
