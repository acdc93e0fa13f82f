"""Output cut into log lines (pure): one splitter per session and descriptor.

A line ends at `\n` (not kept).  A line longer than `MAX_LINE` bytes is logged in
pieces of `MAX_LINE`, so one endless line cannot hold memory; what is left without
a newline when the stream ends is flushed as a last line.  Bytes are decoded as
UTF-8 with replacement (the log is text; the terminal gets the bytes unchanged).
"""

from __future__ import annotations

MAX_LINE = 16 << 10  # bytes per logged line


class LineSplitter:
    """Cuts one output stream into lines."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._partial = bytearray()
        self._cut = False  # the line so far was logged in pieces, nothing of it held

    def feed(self, data: bytes) -> list[str]:
        """The lines `data` completes (with what earlier calls left over)."""
        out: list[str] = []
        buf = self._partial
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                buf += data[start:]
                break
            buf += data[start:nl]
            if buf or not self._cut:  # a line that ended right after a cut is logged
                out.extend(self._pieces(bytes(buf), final=True))
            buf.clear()
            self._cut = False
            start = nl + 1
        if len(buf) >= self.max_line:
            whole = len(buf) - len(buf) % self.max_line
            out.extend(self._pieces(bytes(buf[:whole]), final=True))
            del buf[:whole]
            self._cut = True
        return out

    def flush(self) -> list[str]:
        """The unterminated rest, at the end of the stream."""
        if not self._partial:
            return []
        rest = bytes(self._partial)
        self._partial.clear()
        self._cut = False
        return self._pieces(rest, final=True)

    @property
    def pending(self) -> int:
        """Bytes held back waiting for a newline."""
        return len(self._partial)

    def _pieces(self, line: bytes, final: bool) -> list[str]:
        if len(line) <= self.max_line:
            return [line.decode("utf-8", "replace")]
        n = self.max_line
        return [line[i : i + n].decode("utf-8", "replace") for i in range(0, len(line), n)]
