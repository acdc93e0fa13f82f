"""The seccomp filter is there exactly when something is intercepted (issue 15).

A plain run intercepts nothing: the program gets no filter at all, so its
`/proc/PID/status` reads `Seccomp: 0` as natively and its syscalls pay no BPF.
Once calls are served (`--map`), the filter is installed and a call of a
foreign ABI (i386 `int 0x80`, x32) still stops: it cannot get around the map.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import compile_c, run, traced

pytestmark = pytest.mark.usefixtures("has_ptrace")

# The program reads its own status, and so does a child it forks and execs.
STATUS = "grep -E '^(Seccomp|Seccomp_filters|NoNewPrivs):' /proc/self/status"
STATUS_SH = ["sh", "-c", f"{STATUS}; {STATUS} | cat"]


def fields(out: bytes) -> dict[str, list[str]]:
    """`Key: value` lines, every value seen for each key."""
    seen: dict[str, list[str]] = {}
    for line in out.decode().splitlines():
        key, _, value = line.partition(":")
        seen.setdefault(key, []).append(value.strip())
    return seen


def test_a_plain_run_installs_no_filter() -> None:
    native = run(STATUS_SH)
    plain = traced(STATUS_SH)
    assert plain.returncode == native.returncode == 0
    # Every process of the program (the shell, its grep, the pipeline's) has none.
    assert fields(plain.stdout)["Seccomp"] == ["0", "0"]
    assert plain.stdout == native.stdout


def test_a_run_that_serves_calls_has_its_filter(tmp_path: Path) -> None:
    mapped = traced(STATUS_SH, "--map", f"/data={tmp_path}")
    assert mapped.returncode == 0
    assert fields(mapped.stdout)["Seccomp"] == ["2", "2"]  # SECCOMP_MODE_FILTER


X32_GETPID = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    long r;
    /* getpid with the x32 bit: x32 ABI call number 39 | __X32_SYSCALL_BIT */
    __asm__ volatile ("syscall" : "=a"(r) : "a"(0x40000000L | 39L) : "rcx", "r11", "memory");
    printf("%ld %d\n", r, r == (long)getpid());
    return 0;
}
"""


def test_an_x32_call_stops_when_calls_are_served(tmp_path: Path) -> None:
    exe = compile_c(tmp_path, X32_GETPID, "x32getpid")
    native = run([str(exe)])
    assert native.returncode == 0
    mapped = traced([str(exe)], "--map", f"/data={tmp_path}")
    # Stopped by the filter and refused by the tracer, whatever the kernel would do.
    assert mapped.stdout == b"-38 0\n"
    plain = traced([str(exe)])
    assert plain.stdout.split()[1:] == native.stdout.split()[1:]  # no filter: as natively
