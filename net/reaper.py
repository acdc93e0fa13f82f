"""The lab's reaper: removes a lab when the process that owns it is gone, even by SIGKILL.

`python -m net.reaper --lifeline FD [--tag TAG] [--remove DIR]`

The owner (`vmagent.cluster.local.LocalCluster`) starts it before it creates
anything and keeps the write end of the lifeline pipe (close-on-exec, so no
program inherits it).  The owner writes `agent PID STARTTIME` for each agent it
starts and `cgroup PATH` for each cgroup it makes.  When the pipe reaches EOF
without a `release` line, the owner died without tearing down: the reaper
kills the agents it was told of (`net PREFIX`: the host's program
redirects into that prefix go too), (each is PID 1 of its instance, so the
instance's processes go with it), waits for them, and
removes the cgroups, the lab's links and namespaces (by tag), its marker and
the log directory.  An orderly `close()` writes `release` first: then the
reaper leaves everything to the owner and exits.

The reaper runs in a session of its own, so a signal to dcptrace's process
group does not reach it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import sys


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _kill_and_wait(agents: list[tuple[int, int]]) -> None:
    """SIGKILL each agent still alive (same pid and start time) and wait for it."""
    for pid, start in agents:
        if _start_time(pid) != start:
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if _start_time(pid) == start:  # not reused between the check and the open
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                select.select([pidfd], [], [])  # readable once the process is gone
        except OSError:
            pass
        finally:
            os.close(pidfd)


def main(argv: list[str] | None = None) -> int:
    """Wait for the owner to go; tear its lab down unless it released it."""
    parser = argparse.ArgumentParser(prog="dcp-lab-reaper")
    parser.add_argument("--lifeline", type=int, required=True)
    parser.add_argument("--tag", default=None)
    parser.add_argument("--remove", default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    agents: list[tuple[int, int]] = []
    cgroups: list[str] = []
    nets: list[str] = []  # program address prefixes whose host rules and routes go
    buffer = b""
    while chunk := os.read(args.lifeline, 4096):
        buffer += chunk
    for line in buffer.decode(errors="replace").splitlines():
        words = line.split()
        if words == ["release"]:
            return 0
        if len(words) == 2 and words[0] == "cgroup":
            cgroups.append(words[1])
        elif len(words) == 2 and words[0] == "net":
            nets.append(words[1])
        elif len(words) == 3 and words[0] == "agent":
            with contextlib.suppress(ValueError):
                agents.append((int(words[1]), int(words[2])))
    _kill_and_wait(agents)
    for group in reversed(cgroups):
        with contextlib.suppress(OSError):
            os.rmdir(group)
    if nets:
        from net.redirector import sweep_prefix  # pyroute2 only here

        for prefix in nets:
            with contextlib.suppress(Exception):
                sweep_prefix(None, prefix)
    if args.tag is not None:
        from net.netns import destroy_by_tag  # pyroute2 only here

        destroy_by_tag(args.tag)
    if args.remove:
        shutil.rmtree(args.remove, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
