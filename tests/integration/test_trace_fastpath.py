"""--trace through the C loop (tracer._fastpath) and through pure Python: the same lines.

A differential test of the two paths on a corpus of programs.  Each runs twice,
once per path, in a fresh PID namespace with address randomisation off, so
pids and addresses repeat; the lines of each thread must then be identical
(threads interleave as they will, so lines are compared thread by thread).
Program output, stderr and exit status must be identical too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import compile_c, dcptrace_argv, needs_fastpath, traced_env

pytestmark = pytest.mark.usefixtures("has_ptrace")

needs_fastpath()

# Every argument format the C loop renders, errors, a string running into an
# unreadable page, a signal handled mid-run.
FORMATS_C = r"""
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
static void on(int s) { (void)s; }
int main(int argc, char **argv) {
    static char path[4200];
    char buf[64];
    if (argc < 2 || chdir(argv[1])) return 9;
    int fd = open("f.bin", O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0640);
    static const char bin[] = "a\"b\\c\nd\te\0001\0019\377x";
    write(fd, bin, sizeof bin);
    write(fd, "0123456789012345678901234567890123456789", 40);
    close(fd);
    fd = openat(AT_FDCWD, "f.bin", O_RDONLY | O_NOFOLLOW);
    read(fd, buf, sizeof buf);
    read(fd, buf, sizeof buf);
    pread(fd, buf, 5, 2);
    close(fd);
    close(fd);
    memset(path, 'p', sizeof path - 1);
    open(path, O_RDONLY);
    symlink("f.bin", "k");
    readlink("k", buf, sizeof buf);
    unlink("k");
    mkdir("d", 0755);
    rmdir("d");
    char *p = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(p + 4096 - 40, 'q', 40);
    munmap(p + 4096, 4096);
    open(p + 4096 - 40, O_RDONLY);
    mprotect(p, 4096, PROT_NONE);
    munmap(p, 4096);
    signal(SIGUSR1, on);
    kill(getpid(), SIGUSR1);
    kill(getpid(), 0);
    syscall(SYS_openat, AT_FDCWD, (char *)1, O_RDONLY);
    access("missing", F_OK);
    unlink("f.bin");
    return 3;
}
"""

# Threads, then an exec from a non-leader thread while the leader is in a call.
THREADS_C = r"""
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
static void *work(void *arg) {  /* calls whose results do not depend on the others */
    char name[32];
    snprintf(name, sizeof name, "/nonexistent-%ld", (long)arg);
    for (int i = 0; i < 50; i++) {
        access(name, F_OK);
        write(-1, name, 3);
        kill(getpid(), 0);
    }
    return NULL;
}
static void *exec_from_thread(void *arg) {
    (void)arg;
    char *argv[] = {"/bin/echo", "exec-from-a-thread", NULL};
    execv(argv[0], argv);
    return NULL;
}
int main(void) {
    pthread_t t[4], e;
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, work, (void *)(i + 1));
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    pthread_create(&e, NULL, exec_from_thread, NULL);
    pthread_join(e, NULL);
    return 1;
}
"""

# Lines whose presence depends on timing: lock waits (a thread not yet gone),
# and where a SIGCHLD lands (its handler's return, the call it interrupted).
TIMING = re.compile(r"^\d+ (futex\(|rt_sigreturn\(|.*= \? ERESTART)", re.M)


def _tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("the differential runs in a PID namespace: needs root (unshare --pid)")
    for tool in ("unshare", "setarch"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (util-linux)")


def both(
    argv: list[str], tmp_path: Path, *options: str
) -> tuple[subprocess.CompletedProcess[bytes], str, subprocess.CompletedProcess[bytes], str]:
    """The program under dcptrace through the C loop, then through Python alone."""
    out: list[tuple[subprocess.CompletedProcess[bytes], str]] = []
    for fast in ("1", "0"):  # same length: the environment moves no address
        log = tmp_path / f"trace-{fast}.txt"
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", "setarch", "-R",
               *dcptrace_argv("--no-state", *options, "-o", str(log)), "--", *argv]  # fmt: skip
        res = subprocess.run(
            cmd, capture_output=True, timeout=180,
            env=traced_env({"DCP_TRACE_FASTPATH": fast}),
        )  # fmt: skip
        out.append((res, log.read_text()))
    (fast_run, fast_text), (slow_run, slow_text) = out
    return fast_run, fast_text, slow_run, slow_text


def by_thread(text: str, ordered: bool) -> dict[str, list[str]]:
    """Each thread's lines, but those that depend on timing (in order, or sorted)."""
    lines: dict[str, list[str]] = defaultdict(list)
    for line in TIMING.sub("# ", text).splitlines():
        if not line.startswith("# "):
            lines[line.split(" ", 1)[0]].append(line)
    return {tid: calls if ordered else sorted(calls) for tid, calls in lines.items()}


def assert_same(argv: list[str], tmp_path: Path, *options: str, ordered: bool = True) -> str:
    """Both paths give the same lines; `ordered=False` where processes race (a shell's
    SIGCHLD and wait4 land where they will): the same lines, in any order."""
    fast_run, fast_text, slow_run, slow_text = both(argv, tmp_path, *options)
    assert fast_run.returncode == slow_run.returncode, (fast_run.stderr, slow_run.stderr)
    assert fast_run.stdout == slow_run.stdout
    assert fast_run.stderr == slow_run.stderr
    assert by_thread(fast_text, ordered) == by_thread(slow_text, ordered)
    return fast_text


@pytest.fixture
def files(tmp_path: Path) -> Path:
    d = tmp_path / "d"
    d.mkdir()
    (d / "f.txt").write_text("one\ntwo\nthree\n")
    (d / "l").symlink_to("f.txt")
    return d


def test_shell_pipelines_and_coreutils(tmp_path: Path, files: Path) -> None:
    _tools()
    script = (
        f"printf 'b\\na\\nb\\n' | sort | uniq -c; ls -la {files} >/dev/null; cat {files}/f.txt; "
        f"wc -c < {files}/f.txt; readlink {files}/l; stat -c %s {files}/f.txt; "
        f"mkdir {files}/n; mv {files}/n {files}/m; rmdir {files}/m; ls /nonexistent; exit 3"
    )
    text = assert_same(["sh", "-c", script], tmp_path, "--trace", ordered=False)
    assert re.search(r'^\d+ openat\(AT_FDCWD, ".*/f\.txt", O_RDONLY\) = 3$', text, re.M), text
    assert "= -1 ENOENT (No such file or directory)" in text


def test_every_format_and_error(tmp_path: Path, files: Path) -> None:
    _tools()
    exe = compile_c(tmp_path, FORMATS_C, "formats")
    text = assert_same([str(exe), str(files)], tmp_path, "--trace")
    assert r'write(3, "a\"b\\c\nd\te\0001\0019\377x\0", 16) = 16' in text, text
    assert "O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0640) = 3" in text
    assert "kill(" in text and ", SIGUSR1) = 0" in text
    assert "rt_sigreturn() = 0" in text


def test_byte_at_a_time_copy(tmp_path: Path) -> None:
    _tools()
    dd = ["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=300", "status=none"]
    assert_same(dd, tmp_path, "--trace")


def test_threads_and_exec_from_a_thread(tmp_path: Path) -> None:
    _tools()
    exe = compile_c(tmp_path, THREADS_C, "threads", "-pthread")
    text = assert_same([str(exe)], tmp_path, "--trace")
    assert "exec-from-a-thread" in text


def test_intercepted_calls_mixed_with_fast_ones(tmp_path: Path, files: Path) -> None:
    # Under --map the path calls stop in Python (the coordinator), the rest in C.
    _tools()
    text = assert_same(
        ["sh", "-c", "cat /mnt/dcp-fast/f.txt; ls /mnt/dcp-fast"],
        tmp_path, "--map", f"/mnt/dcp-fast={files}", "--trace", ordered=False,
    )  # fmt: skip
    assert '"/mnt/dcp-fast/f.txt"' in text


def test_summary_counts(tmp_path: Path, files: Path) -> None:
    _tools()
    _, fast_text, _, slow_text = both(
        ["sh", "-c", f"cat {files}/f.txt; ls /nonexistent; true"], tmp_path, "--summary"
    )

    def counts(text: str) -> list[tuple[str, ...]]:
        # calls, errors, syscall: the time columns are the only ones that may differ
        rows = [line.split() for line in text.splitlines()]
        return sorted(tuple(r[3:]) for r in rows if len(r) >= 5 and r[0][0].isdigit())

    assert counts(fast_text) == counts(slow_text)
    assert any(row[-1] == "openat" for row in counts(fast_text))

    def groups(text: str) -> list[list[str]]:
        # "  storage  12 calls  1 errors  0.000123 s": all but the seconds
        return [line.split()[:5] for line in text.split("by category:")[1].splitlines()]

    assert groups(fast_text) == groups(slow_text)


def test_without_the_extension_one_line_says_so(tmp_path: Path) -> None:
    log = tmp_path / "trace.txt"
    run_without = (
        "import sys; sys.modules['tracer._fastpath'] = None; "
        "from tracer.cli import main; sys.argv[0] = 'dcptrace'; main()"
    )
    res = subprocess.run(
        [*dcptrace_argv()[:1], "-c", run_without, "--no-state", "--trace", "-o", str(log),
         "--", "sh", "-c", "echo hi"],
        capture_output=True, timeout=120, env=traced_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"hi\n"
    lines = res.stderr.decode().splitlines()
    assert len(lines) == 1 and "tracer/_fastpath" in lines[0] and "pure Python" in lines[0]
    assert re.search(r'^\d+ write\(1, "hi\\n", 3\) = 3$', log.read_text(), re.M)
