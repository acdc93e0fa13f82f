"""What one process consumed, read at its exit stop (adapter over /proc).

`measure_exit(pid)` runs on the instance tracer's thread while the process's
last thread is stopped at PTRACE_EVENT_EXIT: /proc/PID still describes the
whole process (its counters are final, its descriptors still open).  The
dict's keys become fields of the `op=usage` record (`vmagent.trace.channel`):
add a measurement here and it reaches every consumer.
"""

from __future__ import annotations

# /proc/PID/io name -> usage field
_IO_FIELDS = {
    b"rchar": "rchar",
    b"wchar": "wchar",
    b"read_bytes": "rbytes",
    b"write_bytes": "wbytes",
}


def measure_exit(pid: int) -> dict[str, int]:
    """Counters of process `pid` (rchar, wchar, rbytes, wbytes); {} if /proc has none."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            text = f.read()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(b":")
        name = _IO_FIELDS.get(key)
        if name is not None and value.strip().isdigit():
            out[name] = int(value)
    return out
