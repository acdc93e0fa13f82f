"""The same programs natively and under dcptrace: identical output, status and files."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from tests.conftest import compile_c, run, traced


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (and 'dir'/'link' markers) under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + str(p.readlink())
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def differential(tmp_path: Path, argv: list[str], stdin: bytes = b"", setup=None) -> None:  # type: ignore[no-untyped-def]
    native_dir, traced_dir = tmp_path / "native", tmp_path / "traced"
    for d in (native_dir, traced_dir):
        d.mkdir()
        if setup:
            setup(d)
    native = run(argv, cwd=native_dir, stdin=stdin)
    under = traced(argv, cwd=traced_dir, stdin=stdin)
    assert under.stdout == native.stdout
    assert under.stderr == native.stderr
    assert under.returncode == native.returncode
    assert tree(traced_dir) == tree(native_dir)


def _files(d: Path) -> None:
    (d / "in").mkdir()
    for i in range(20):
        (d / "in" / f"f{i:02d}.txt").write_text(f"line {i}\n" * (i + 1))
    (d / "words").write_text("pear\napple\nfig\nbanana\napple\n")


@pytest.mark.usefixtures("has_ptrace")
@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "-la", "--time-style=+", "in"],
        ["cat", "words", "in/f03.txt"],
        ["sort", "-u", "words"],
        ["find", ".", "-name", "*.txt", "-newer", "words", "-o", "-type", "f", "-print"],
        ["tar", "--sort=name", "--mtime=@0", "--owner=0", "--group=0", "-cf", "out.tar", "in"],
        ["ls", "no-such-file"],
    ],
    ids=["ls", "cat", "sort", "find", "tar", "ls-error"],
)
def test_coreutils(tmp_path: Path, argv: list[str]) -> None:
    differential(tmp_path, argv, setup=_files)


BASH = textwrap.dedent(
    """
    set -u
    cat in/*.txt | sort | uniq -c | sort -rn | head -3
    ( cd in && ls | wc -l )
    for i in 1 2 3 4; do ( sleep 0.0$i; echo "job $i" > out$i ) & done
    wait
    cat out1 out2 out3 out4
    x=$(echo sub | tr a-z A-Z); echo "$x"
    false || echo "false failed with $?"
    sh -c 'exit 5'; echo "status $?"
    echo to-stderr >&2
    for i in $(seq 1 50); do /bin/true; done; echo "execs done"
    exit 4
    """
)


@pytest.mark.usefixtures("has_ptrace")
def test_bash_pipelines_subshells_jobs(tmp_path: Path) -> None:
    differential(tmp_path, ["bash", "-c", BASH], setup=_files)


C_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <string.h>
int main(int argc, char **argv) {
    int fd = open("c-out.txt", O_CREAT | O_WRONLY | O_TRUNC, 0644);
    for (int i = 0; i < 100; i++) dprintf(fd, "%d\n", i * i);
    close(fd);
    pid_t p = fork();
    if (p == 0) { printf("child %d\n", argc); fflush(stdout); _exit(9); }
    int st; waitpid(p, &st, 0);
    printf("parent saw %d\n", WEXITSTATUS(st));
    char buf[64]; ssize_t n = read(0, buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    fprintf(stderr, "stdin: %s", buf);
    return 3;
}
"""


@pytest.mark.usefixtures("has_ptrace")
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_c_program(tmp_path: Path, static: bool) -> None:
    exe = compile_c(tmp_path, C_SOURCE, "prog", *(["-static"] if static else []))
    differential(tmp_path, [str(exe), "a", "b"], stdin=b"hello from stdin\n")


PY_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, subprocess, sys, threading
    def square(x):
        return x * x
    if __name__ == "__main__":
        results = []
        lock = threading.Lock()
        def work(i):
            with lock:
                results.append(sum(range(i * 1000)))
        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(sorted(results)[:3], len(results))
        out = subprocess.run(["sh", "-c", "echo from-sh; exit 2"], capture_output=True, text=True)
        print(out.stdout.strip(), out.returncode)
        with multiprocessing.Pool(3) as pool:
            print(pool.map(square, range(10)))
        ctx = multiprocessing.get_context("spawn")
        p = ctx.Process(target=square, args=(3,)); p.start(); p.join(); print("spawned", p.exitcode)
        open("py-out.txt", "w").write("done\\n")
        sys.exit(6)
    """
)


@pytest.mark.usefixtures("has_ptrace")
def test_python_threads_subprocess_multiprocessing(tmp_path: Path) -> None:
    import sys

    def setup(d: Path) -> None:
        (d / "script.py").write_text(PY_SCRIPT)

    differential(tmp_path, [sys.executable, "script.py"], setup=setup)


@pytest.mark.usefixtures("has_ptrace")
@pytest.mark.parametrize("sig", ["TERM", "SEGV", "KILL", "INT"])
def test_killed_by_signal(tmp_path: Path, sig: str) -> None:
    differential(tmp_path, ["sh", "-c", f"echo before; kill -{sig} $$; echo after"])


@pytest.mark.usefixtures("has_ptrace")
def test_reads_stdin(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4000
    differential(tmp_path, ["sh", "-c", "wc -c; echo done"], stdin=data)


PTHREADS = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static long total;
static void *work(void *arg) {
    long n = (long)arg;
    for (long i = 0; i < 20000; i++) {
        pthread_mutex_lock(&lock);
        total += n;
        pthread_mutex_unlock(&lock);
    }
    return NULL;
}
static void *exec_from_thread(void *arg) {
    (void)arg;
    char *argv[] = {"/bin/echo", "exec-from-a-thread", NULL};
    execv(argv[0], argv);
    return NULL;
}
int main(int argc, char **argv) {
    pthread_t t[8];
    for (long i = 0; i < 8; i++) pthread_create(&t[i], NULL, work, (void *)(i + 1));
    for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
    printf("total %ld\n", total);
    fflush(stdout);
    if (argc > 1) {
        pthread_t e, busy;
        pthread_create(&busy, NULL, work, (void *)1);
        pthread_create(&e, NULL, exec_from_thread, NULL);
        pthread_join(e, NULL);
        puts("not reached");
    }
    return 0;
}
"""


@pytest.mark.usefixtures("has_ptrace")
@pytest.mark.parametrize("exec_from_thread", [False, True], ids=["threads", "exec-from-thread"])
def test_pthreads(tmp_path: Path, exec_from_thread: bool) -> None:
    exe = compile_c(tmp_path, PTHREADS, "threads", "-pthread")
    differential(tmp_path, [str(exe), *(["x"] if exec_from_thread else [])])
