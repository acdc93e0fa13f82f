"""The OSS data directory: private to its owner (0700, files 0600), checked before use.

The directory holds the SQLite state (token hashes, instance exec keys, logs of
every tenant).  It is created 0700 and the database 0600 (SQLite gives its
-wal/-shm files the database's mode).  An existing directory or database that
group/others can read, or that another user owns, is refused: the operator
fixes it (`chmod 700 DIR`), nothing here loosens or silently repairs it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from oss.errors import UnsafeDataDir

DB_NAME = "oss.sqlite3"
DB_FILES = (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm")


def _check(path: Path, st: os.stat_result) -> None:
    if st.st_uid != os.geteuid():
        raise UnsafeDataDir(
            f"{path} is owned by uid {st.st_uid}, not by this user ({os.geteuid()})"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UnsafeDataDir(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; group/others must have no access"
            f" (chmod {'700' if stat.S_ISDIR(st.st_mode) else '600'} {path})"
        )


def prepare(data_dir: Path) -> Path:
    """Create `data_dir` 0700 (and the database 0600) or check they are private; the DB path."""
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            data_dir.mkdir(mode=0o700)
        except FileExistsError:
            pass
        st = data_dir.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeDataDir(f"{data_dir} is not a directory")
        _check(data_dir, st)
        for name in DB_FILES:
            try:
                _check(data_dir / name, (data_dir / name).lstat())
            except FileNotFoundError:
                continue
        db = data_dir / DB_NAME
        # Created here with 0600 before SQLite opens it (SQLite would use 0644 & ~umask).
        fd = os.open(db, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
    except PermissionError as exc:
        raise UnsafeDataDir(f"{data_dir}: {exc.strerror}") from exc
    return db
