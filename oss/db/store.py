"""Durable OSS state in SQLite (WAL, synchronous=FULL): the shared database layer.

The store runs operations; it knows no service.  Each service's repository
(`oss/<service>/store.py`, `instances.py`, `programs.py`) holds its queries and
runs them through `Store.write`/`Store.read`; `oss.schema` is the schema.

Threading: one writer thread owns the only write connection; readers use a
small thread pool, each thread with its own connection (WAL lets them read
while the writer writes).  Nothing touches SQLite on the event loop.

Group commit: the writer drains its queue and runs each queued operation in
its own SAVEPOINT inside one `BEGIN IMMEDIATE` transaction, then commits once
(one fsync) and only then resolves the callers' futures.  So:

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
import queue
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
Conn = sqlite3.Connection


def new_id(prefix: str) -> str:
    """A random object id."""
    return f"{prefix}_{secrets.token_hex(8)}"


def to_json(v: Any) -> str:
    """Compact, key-sorted JSON for a TEXT column."""
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


class _Writer:
    """The writer thread: group commit of queued operations."""

    def __init__(self, path: Path, versions: Sequence[Version], durable: bool = True) -> None:
        self._path = path
        self._durable = durable
        self._versions = versions
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="oss-store-writer", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closed = False

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise StoreError(str(self._error)) from self._error

    def stop(self) -> None:
        self._closed = True
        self._q.put(None)
        self._thread.join()

    def submit(self, fn: Callable[[Conn], Any], fut: asyncio.Future[Any]) -> None:
        # Checked here so a write after close fails instead of waiting forever.
        if self._closed or not self._thread.is_alive():
            raise StoreError("the store is closed")
        self._q.put((fn, fut))

    def _run(self) -> None:
        try:
            conn = connect(self._path)
            if not self._durable:
                conn.execute("PRAGMA synchronous=NORMAL")
            migrate(conn, self._versions)
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        stop = False
        while not stop:
            item = self._q.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < 512:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(conn, batch)
        conn.close()

    @staticmethod
    def _commit(conn: Conn, batch: list[tuple[Callable[[Conn], Any], asyncio.Future[Any]]]) -> None:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
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
            conn.execute("COMMIT")
        except Exception as exc:  # disk full, I/O error...: the whole batch fails, loudly
            log.exception("store commit failed")
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("store rollback failed")
            err = StoreError(f"commit failed: {exc}")
            results = [(fut, None, err) for _, fut in batch]
        # One wake-up per loop for the whole batch, not one per operation.
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for item in results:
            by_loop.setdefault(item[0].get_loop(), []).append(item)
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_resolve_all, items)


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
    conn.execute("PRAGMA busy_timeout=30000")
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
        self._closed = False

    async def open(self) -> None:
        """Start the writer (runs migrations) and the readers."""
        await asyncio.to_thread(self._writer.start)
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="oss-store-reader")

    async def close(self) -> None:
        """Finish queued writes and close every connection."""
        self._closed = True
        await asyncio.to_thread(self._writer.stop)
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        with self._lock:
            for c in self._reader_conns:
                c.close()
            self._reader_conns.clear()

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

    async def read(self, fn: Callable[[Conn], T]) -> T:
        """Run `fn` on a reader connection (sees committed state)."""
        if self._readers is None or self._closed:
            raise StoreError("the store is not open")
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
