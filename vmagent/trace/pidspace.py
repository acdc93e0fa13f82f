"""One PID space per program: the pids a placed process sees, in its home's numbers (pure).

A placed program runs on an instance whose kernel numbers it afresh (a
namespaced instance starts at 1), yet its deputy at home keeps the pid the
program had there (issue 11, item 7).  The instance tracer answers the calls
that return or take pids in the program's numbers, from this mapping:

- the session's root process (the one its deputy stands in for) is the
  deputy's pid, and its parent the deputy's parent: what HELLO carries
  (`pid`, `ppid`, the deputy's own getpid/getppid, themselves answered this way
  when the deputy runs on an instance);
- a process forked on the instance has no home pid: it is numbered
  `base + real pid`, where `base` is a multiple of 2^22 (PID_MAX_LIMIT: no
  home pid reaches it) chosen per instance, so numbers from two instances
  never meet and a number tells which instance holds it.

A program pid that maps to no process of this instance (a sibling placed
elsewhere, a process at home) has no real pid here: the calls that take one
fail with ESRCH as for a process that is gone, instead of reaching whatever
local process happens to carry that number.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

PID_MAX_LIMIT = 1 << 22  # the kernel's ceiling for pid_max on 64-bit: home pids are below
INSTANCE_SLOTS = 511  # bases 1..511 * 2^22: the largest number stays below 2^31


def base_for(instance: str) -> int:
    """The first program pid of processes forked on `instance`.

    Local instances (`node0`, `node1`, ...) and OSS pools name instances with a
    number: that number picks the slot; other names hash to one (two such
    instances may then share a slot: their forked pids could meet).
    """
    found = re.search(r"(\d+)$", instance)
    index = int(found.group(1)) if found else zlib.crc32(instance.encode())
    return (index % INSTANCE_SLOTS + 1) * PID_MAX_LIMIT


def valid_base(base: int) -> bool:
    """`base` is one `base_for` can give."""
    return base % PID_MAX_LIMIT == 0 and PID_MAX_LIMIT <= base <= INSTANCE_SLOTS * PID_MAX_LIMIT


@dataclass(slots=True)
class PidSpace:
    """Real pids of one instance session <-> the program's pids.

    Unbound (`root` 0: a HELLO without `pid`, such as a bare deputy's) it
    maps every pid to itself.
    """

    base: int = 0  # set with the root by `bind`
    root: int = 0  # the real pid of the session's first process
    root_pid: int = 0  # its program pid (its deputy's)
    root_ppid: int = 0  # its parent's program pid (the deputy's parent's)

    @property
    def bound(self) -> bool:
        """Whether pids are translated at all."""
        return self.root > 0

    def bind(self, instance: str, root: int, root_pid: int, root_ppid: int, base: int = 0) -> None:
        """On `instance`, the session's process `root` is program pid `root_pid`, child of
        `root_ppid` (left unbound unless all are pids).

        `base`: the one a tree moved here (a migration) was numbered with where
        it started, so its processes keep their pids (0: `instance`'s own).
        """
        if root > 0 and root_pid > 0 and root_ppid >= 0:
            self.base = base if valid_base(base) else base_for(instance)
            self.root, self.root_pid, self.root_ppid = root, root_pid, root_ppid

    def program(self, real: int) -> int:
        """The program's number of the real pid (or tid) `real`."""
        if not self.bound or real <= 0:
            return real
        if real == self.root:
            return self.root_pid
        return self.base + real

    def real(self, pid: int) -> int | None:
        """The real pid of the program's `pid` on this instance; None: none here."""
        if not self.bound or pid <= 0:
            return pid
        if pid == self.root_pid:
            return self.root
        if self.base < pid < self.base + PID_MAX_LIMIT:
            return pid - self.base
        return None

    def parent(self, real: int, real_ppid: int, ours: bool) -> int:
        """The program's number of the parent of `real`, whose real parent is `real_ppid`.

        `ours`: that parent is a process of this session.  The root's parent
        is its deputy's; an orphan, reparented to the agent, sees 1, as under
        an init that reaps orphans.
        """
        if not self.bound:
            return real_ppid
        if real == self.root:
            return self.root_ppid
        return self.program(real_ppid) if ours else 1
