"""Calls trapped for /proc alone: the C loop lets the others go unseen (issue 11).

An instance tracer traps the path calls and getdents64 so that /proc/N of a sibling
held elsewhere can be served (`vmagent.trace.procview`); without maps in the view
nothing else wants them, and `tracer.runner.PathSkip` has the C loop resume every
call that cannot name a path under /proc at its seccomp stop.  A real traced C
program makes each kind of call; a recording coordinator says which reached Python.
The same run without the skip (every trapped call reaches it) shows the test can
fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, compile_c, needs_fastpath

pytestmark = pytest.mark.usefixtures("has_ptrace")

needs_fastpath()

CALLS_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
/* Raw calls, so each is the call named (glibc's open is an openat). */
static void list(long fd) { char b[4096]; while (syscall(SYS_getdents64, fd, b, sizeof b) > 0) {} }
int main(int argc, char **argv) {
    struct stat st;
    char buf[256];
    puts("start");
    fflush(stdout);
    close(syscall(SYS_open, "/etc/hostname", O_RDONLY));      /* elsewhere: let go */
    syscall(SYS_stat, "/usr", &st);                           /* elsewhere */
    syscall(SYS_access, "/procfs-is-not-proc", F_OK);         /* elsewhere: not under /proc */
    close(syscall(SYS_open, "/proc/self/status", O_RDONLY));  /* /proc: seen */
    long p = syscall(SYS_open, "/proc", O_RDONLY | O_DIRECTORY);  /* /proc itself: seen */
    list(p);                                                  /* a listing of /proc: seen */
    long e = syscall(SYS_open, "/etc", O_RDONLY | O_DIRECTORY);   /* elsewhere */
    list(e);                                                  /* a listing of /etc: let go */
    close(syscall(SYS_openat, e, "hostname", O_RDONLY));      /* from /etc's descriptor */
    close(syscall(SYS_openat, p, "self/stat", O_RDONLY));     /* from /proc's: seen */
    if (syscall(SYS_chdir, argv[1])) return 2;                /* elsewhere */
    close(syscall(SYS_openat, AT_FDCWD, "rel", O_RDONLY | O_CREAT, 0600));  /* let go */
    if (syscall(SYS_chdir, "/proc")) return 3;                /* /proc: seen */
    close(syscall(SYS_open, "self/stat", O_RDONLY));          /* relative from /proc: seen */
    syscall(SYS_readlink, "self", buf, sizeof buf);           /* relative from /proc: seen */
    syscall(SYS_open, (char *)1, O_RDONLY);                   /* a bad address: seen */
    puts("done");
    return 0;
}
"""

# Several prefixes, as a view with maps gives them (its virtual and real directories):
# judged lexically, whole components, `..` always seen.
PREFIXES_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct stat st;
    (void)argc;
    puts("start");
    fflush(stdout);
    syscall(SYS_stat, "/srv/virt/a", &st);             /* under a prefix: seen */
    syscall(SYS_stat, "/srv/virt", &st);               /* the prefix itself: seen */
    syscall(SYS_stat, "/srv/virtual", &st);            /* not a component of it */
    syscall(SYS_stat, "/srv", &st);                    /* its parent: let go */
    syscall(SYS_stat, "/etc/../srv/virt", &st);        /* climbs: seen */
    syscall(SYS_lstat, "/real/dir/b", &st);            /* the real side: seen */
    syscall(SYS_unlink, "/tmp/nothing-here");          /* another call, elsewhere */
    syscall(SYS_unlink, "/srv/virt/nothing-here");     /* the same, under a prefix: seen */
    if (syscall(SYS_chdir, argv[1])) return 2;         /* the cwd is under a prefix: seen */
    syscall(SYS_access, "c", F_OK);                    /* relative from there: seen */
    syscall(SYS_open, "/dev/stdin", O_RDONLY);         /* a magic link: seen */
    puts("done");
    return 0;
}
"""

# Runs the program under a Runner whose coordinator traps the procview calls and
# records what it is shown; prints them as JSON.
DRIVER = r"""
import json, os, sys
from tracer.arch import table_for
from tracer.coordinator import Allow
from tracer.runner import PathSkip, Runner, single_path_calls
from vmagent.trace import procview

class Recording:
    def __init__(self):
        self.seen = []
    def interception(self):
        return procview.CALLS
    def on_syscall(self, call):
        if call.name in procview.LISTING_CALLS:
            what = os.readlink(f"/proc/{call.pid}/fd/{call.args[0]}")
        else:
            what = next(iter(call.paths.values()), b"").decode()
        self.seen.append([call.name, what])
        return Allow()
    def on_result(self, call, result, output):
        return None
    def on_process(self, event):
        pass
    def instance_of(self, pid):
        return "here"

table = table_for("x86_64")
coordinator = Recording()
skip = PathSkip((b"/proc",), procview.PATH_CALLS, procview.LISTING_CALLS)
if len(sys.argv) > 4:
    skip = PathSkip(tuple(p.encode() for p in sys.argv[4:]), single_path_calls(table))
    coordinator.interception = lambda: single_path_calls(table)
runner = Runner([sys.argv[1], sys.argv[2]], dict(os.environ), sys.argv[1], table,
                coordinator, trace_all=False, skip=skip if sys.argv[3] == "skip" else None)
outcome = runner.run()
print(json.dumps({"status": outcome.exit_status, "seen": coordinator.seen}))
"""


def _run(
    program: Path, where: Path, mode: str, *prefixes: str
) -> tuple[int, list[tuple[str, str]]]:
    res = subprocess.run(
        [sys.executable, "-c", DRIVER, str(program), str(where), mode, *prefixes],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:2] == ["start", "done"], res.stdout
    got = json.loads(lines[-1])
    return got["status"], [(name, what) for name, what in got["seen"]]


def test_only_calls_that_can_name_proc_reach_the_coordinator(tmp_path: Path) -> None:
    program = compile_c(tmp_path, CALLS_C, "calls")
    where = tmp_path / "cwd"
    where.mkdir()
    status, seen = _run(program, where, "skip")
    assert status == 0
    for call in [("open", "/etc/hostname"), ("stat", "/usr"), ("access", "/procfs-is-not-proc"),
                 ("getdents64", "/etc"), ("openat", "rel"), ("chdir", str(where)),
                 ("open", "/etc"), ("openat", "hostname")]:  # fmt: skip
        assert call not in seen, (call, seen)
    for call in [("open", "/proc/self/status"), ("open", "/proc"), ("getdents64", "/proc"),
                 ("openat", "self/stat"), ("chdir", "/proc"), ("open", "self/stat"),
                 ("readlink", "self"), ("open", "")]:  # fmt: skip
        assert call in seen, (call, seen)
    # Nothing outside /proc got through but the bad address, which Python must
    # judge (the loader's opens and glibc's fstat, by descriptor, included).
    outside = [c for c in seen if not c[1].startswith(("/proc", "self"))]
    assert outside == [("open", "")], outside


def test_without_the_skip_every_trapped_call_reaches_the_coordinator(tmp_path: Path) -> None:
    program = compile_c(tmp_path, CALLS_C, "calls")
    where = tmp_path / "cwd"
    where.mkdir()
    status, seen = _run(program, where, "all")
    assert status == 0
    for call in [("open", "/etc/hostname"), ("stat", "/usr"), ("getdents64", "/etc"),
                 ("openat", "rel"), ("open", "/proc/self/status")]:  # fmt: skip
        assert call in seen, (call, seen)


def test_several_prefixes_are_judged_by_whole_components(tmp_path: Path) -> None:
    program = compile_c(tmp_path, PREFIXES_C, "prefixes")
    where = tmp_path / "mapped"
    where.mkdir()
    prefixes = ("/proc", "/dev/stdin", "/srv/virt/", "/real/dir", str(where))
    status, seen = _run(program, where, "skip", *prefixes)
    assert status == 0
    assert seen == [
        ("stat", "/srv/virt/a"), ("stat", "/srv/virt"), ("stat", "/etc/../srv/virt"),
        ("lstat", "/real/dir/b"), ("unlink", "/srv/virt/nothing-here"), ("chdir", str(where)),
        ("access", "c"), ("open", "/dev/stdin"),
    ], seen  # fmt: skip
