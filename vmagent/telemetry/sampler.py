"""Live usage of a program's processes from /proc (the agent's 1 s budget samples).

Reads never ptrace: `/proc/PID/stat` (CPU ticks, session, start time), `status`
(VmHWM) and `io`.  A process that vanished between listing and reading is
skipped (it ended: its final figures come from the tracer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


BOOT_TIME = _boot_time()


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/PID/stat the sampler uses."""

    pid: int
    ppid: int
    session: int
    cpu_us: int  # utime + stime of the process itself (children excluded)
    started: float  # wall-clock start time (seconds since the epoch)


def parse_stat(raw: bytes) -> Stat:
    """Parse /proc/PID/stat (the command name may hold spaces and parentheses)."""
    pid = int(raw[: raw.index(b" ")])
    rest = raw[raw.rindex(b")") + 2 :].split()
    # rest[0] is field 3 (state): field n is rest[n - 3]
    ticks = int(rest[14 - 3]) + int(rest[15 - 3])
    return Stat(
        pid=pid,
        ppid=int(rest[4 - 3]),
        session=int(rest[6 - 3]),
        cpu_us=ticks * 1_000_000 // CLK_TCK,
        started=round(BOOT_TIME + int(rest[22 - 3]) / CLK_TCK, 2),
    )


def read_stat(pid: int) -> Stat | None:
    """A process's stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return parse_stat(f.read())
    except (OSError, ValueError, IndexError):
        return None


def parse_io(raw: bytes) -> dict[str, int]:
    """/proc/PID/io as the usage row's names (rchar, wchar, rbytes, wbytes)."""
    names = {
        b"rchar": "rchar",
        b"wchar": "wchar",
        b"read_bytes": "rbytes",
        b"write_bytes": "wbytes",
    }
    out = {}
    for line in raw.splitlines():
        key, _, value = line.partition(b":")
        if key in names:
            out[names[key]] = int(value)
    return out


def wait_us(pid: int) -> int | None:
    """Microseconds the process waited runnable for a CPU (/proc/PID/schedstat's run
    delay: the run queue, and a cgroup quota's throttling), None if unreadable.

    The thread group leader's figure: a multi-threaded process's other threads' waits
    are not in it (its CPU time from stat covers them all).  Issue 12: with CPU time it
    says whether a process is CPU-bound on a throttled instance too.
    """
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            return int(f.read().split()[1]) // 1000
    except (OSError, ValueError, IndexError):
        return None


def usage_of(pid: int) -> dict[str, int] | None:
    """Live totals of one process (cpu_us, wait_us, maxrss_kb, rchar, wchar, rbytes, wbytes)."""
    st = read_stat(pid)
    if st is None:
        return None
    out = {"cpu_us": st.cpu_us}
    wait = wait_us(pid)
    if wait is not None:
        out["wait_us"] = wait
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            out.update(parse_io(f.read()))
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    out["maxrss_kb"] = int(line.split()[1])
                    break
    except (OSError, ValueError):
        return None
    return out


def sessions_members(sessions: set[int]) -> dict[int, list[Stat]]:
    """The live processes of each of the given sessions (by session id = leader pid)."""
    out: dict[int, list[Stat]] = {}
    if not sessions:
        return out
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = read_stat(int(name))
        if st is not None and st.session in sessions:
            out.setdefault(st.session, []).append(st)
    return out


def peak_of(pid: int) -> dict[str, int]:
    """`hwm_kb`: the process's peak resident memory since its exec (VmHWM), {} if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return {"hwm_kb": int(line.split()[1])}
    except (OSError, ValueError, IndexError):
        pass
    return {}


WALK_CAP = 100_000  # directory entries one storage walk reads at most


def storage_kb(dirs: list[str], cap: int = WALK_CAP) -> int | None:
    """kB allocated (st_blocks) under the directories, each file once (hard links, a
    directory inside another); None if the walk would read more than `cap` entries."""
    seen: set[tuple[int, int]] = set()
    total = 0
    entries = 0
    stack = list(dirs)
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for e in it:
                entries += 1
                if entries > cap:
                    return None
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                total += st.st_blocks * 512
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return total // 1024
