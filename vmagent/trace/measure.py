"""What one process consumed, read at its exit stop (adapter over /proc).

`measure_exit(pid)` runs on the instance tracer's thread while the process's
last thread is stopped at PTRACE_EVENT_EXIT: /proc/PID still describes the
whole process (its counters are final, its descriptors still open).  The
dict's keys become fields of the `op=usage` record (`vmagent.trace.channel`):
add a measurement here and it reaches every consumer.  Besides /proc/PID/io:
`net_rx`/`net_tx`, the TCP bytes of the sockets still held (sock_diag), and
`hwm_kb`, the peak memory since the exec (rusage's maxrss also counts the pages
the child had of the agent before it exec'd).
"""

from __future__ import annotations

from net.sockdiag import held_counters
from vmagent.telemetry.sampler import peak_of

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
    out.update(held_counters(pid))  # TCP bytes of the sockets still held: net_rx, net_tx
    out.update(peak_of(pid))  # hwm_kb: the program's own peak (rusage counts pre-exec)
    return out
