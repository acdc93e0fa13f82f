"""The files a run was asked to produce (--trace -o, --summary, --record), written safely.

A regular file is written to a temporary file beside it and renamed over the
requested path only once complete: a run that cannot finish its output never
leaves a truncated record that looks complete (a file already at that path is
left as it was).  Other targets (a terminal, /dev/full, a pipe) are written
in place and a failure is only reported.

The first error is kept and later writes are dropped: a full disk must not
stop the traced program, and the temporary file is removed at once so the
program gets its space back.  `finish` raises the error as an `OutputError`.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import TextIO

from tracer.errors import OutputError, UsageError

_BUFFER = 1 << 16


class Output:
    """One requested output and the first error met writing it."""

    def __init__(
        self,
        what: str,
        shown: str,
        stream: TextIO,
        temp: str | None = None,
        final: str | None = None,
        owned: bool = True,
    ) -> None:
        self.what = what  # "trace", "summary", "record"
        self.shown = shown  # the path as the user gave it, or "stderr"
        self._stream: TextIO | None = stream
        self._temp = temp  # written here, renamed to `final` by finish()
        self._final = final
        self._owned = owned  # closed by finish() (not so for sys.stderr)
        self.error: str | None = None

    @property
    def line_buffered(self) -> bool:
        """Each line is written at once (dcptrace's stderr), not in 64 KiB blocks (a file)."""
        return not self._owned

    def write(self, text: str) -> None:
        """Write `text`, or drop it once writing has failed."""
        if self._stream is None:
            return
        try:
            self._stream.write(text)
        except OSError as exc:
            self._fail(exc)

    def finish(self) -> None:
        """Flush, close and put the file in place; raise OutputError if any of it failed."""
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.flush()
                if self._owned:
                    stream.close()
                if self._temp is not None and self._final is not None:
                    os.replace(self._temp, self._final)
                    self._temp = None
            except OSError as exc:
                self._stream = stream
                self._fail(exc)
        if self.error is not None:
            raise OutputError(self.what, self.shown, self.error)

    def discard(self) -> None:
        """Give up: close and remove a temporary file (the requested path is untouched)."""
        stream, self._stream = self._stream, None
        if stream is not None and self._owned:
            with contextlib.suppress(OSError):
                stream.close()  # a failing flush here leaves nothing behind but the temp
        if self._temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._temp)
            self._temp = None

    def _fail(self, exc: OSError) -> None:
        self.error = self.error or exc.strerror or str(exc)
        if self._temp is None and self._owned and self._stream is not None:
            # Written in place (a device, a pipe, a file in a directory we may
            # not write): keep nothing that looks complete in a regular file.
            with contextlib.suppress(OSError):
                fd = self._stream.fileno()
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.ftruncate(fd, 0)
        self.discard()


def stderr_output(what: str, stream: TextIO) -> Output:
    """An output to dcptrace's own stderr (never closed)."""
    return Output(what, "stderr", stream, owned=False)


def open_output(path: str, what: str, flag: str) -> Output:
    """Prepare output `what` at `path` before the program runs; UsageError if it cannot be."""
    try:
        return _open(path, what)
    except OSError as exc:
        raise UsageError(f"cannot write the {flag} file {path}: {exc.strerror}") from exc


def _open(path: str, what: str) -> Output:
    real = os.path.realpath(path)
    try:
        st: os.stat_result | None = os.stat(real)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        return Output(what, path, open(real, "w", buffering=_BUFFER))
    directory, name = os.path.split(real)
    try:
        import tempfile  # only for -o/--record: not on every start-up

        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".dcptrace-part")
    except PermissionError:
        if st is None:
            raise
        # A writable file in a directory we may not write: write it in place
        # (emptied again if the write fails, see Output._fail).
        return Output(what, path, open(real, "w", buffering=_BUFFER))
    try:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask())
        stream = open(fd, "w", buffering=_BUFFER)
    except OSError:
        os.close(fd)
        os.unlink(temp)
        raise
    return Output(what, path, stream, temp=temp, final=real)


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
