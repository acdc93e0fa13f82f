"""--map is a view, not a sandbox: what a mapped program could reach around it is refused.

The attack: a program run with `--map` reaches files outside its view through
calls whose paths dcptrace never sees (an io_uring's IORING_OP_OPENAT runs
in the kernel; open_by_handle_at names an inode, not a path) or through a
path-taking call newer than the tracer's table (fchmodat2).  Each is replayed
by a real program under a real `dcptrace --map`; a program missing from the
view is said so, naming both paths.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest

from tests.conftest import compile_c, dcptrace_argv, run, traced_env

pytestmark = [pytest.mark.security, pytest.mark.usefixtures("has_ptrace")]

PROBE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Each mode prints "RESULT ERRNO" (and what it read), so the test sees what
   the kernel, or dcptrace, answered. */
int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "uring")) {
        unsigned char params[120];  /* struct io_uring_params */
        memset(params, 0, sizeof params);
        long fd = syscall(425 /* io_uring_setup */, 4, params);
        printf("%ld %d\n", fd, fd < 0 ? errno : 0);
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "handle")) {  /* handle PATH: TYPE HEX of PATH */
        struct file_handle *h = malloc(sizeof *h + MAX_HANDLE_SZ);
        int mount_id;
        h->handle_bytes = MAX_HANDLE_SZ;
        if (name_to_handle_at(AT_FDCWD, argv[2], h, &mount_id, 0) != 0) {
            printf("-1 %d\n", errno);
            return 1;
        }
        printf("%d ", h->handle_type);
        for (unsigned i = 0; i < h->handle_bytes; i++) printf("%02x", h->f_handle[i]);
        printf("\n");
        return 0;
    }
    if (argc >= 5 && !strcmp(argv[1], "open-handle")) {  /* open-handle DIR TYPE HEX */
        size_t n = strlen(argv[4]) / 2;
        struct file_handle *h = malloc(sizeof *h + n);
        h->handle_bytes = n;
        h->handle_type = atoi(argv[3]);
        for (size_t i = 0; i < n; i++) sscanf(argv[4] + 2 * i, "%2hhx", &h->f_handle[i]);
        int mount_fd = open(argv[2], O_RDONLY | O_DIRECTORY);
        int fd = open_by_handle_at(mount_fd, h, O_RDONLY);
        if (fd < 0) {
            printf("-1 %d\n", errno);
            return 0;
        }
        char buf[256];
        ssize_t got = read(fd, buf, sizeof buf - 1);
        buf[got > 0 ? got : 0] = 0;
        printf("%d 0 %s\n", fd, buf);
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "fchmodat2")) {  /* fchmodat2 PATH: chmod 0600 */
        long r = syscall(452 /* fchmodat2 */, AT_FDCWD, argv[2], 0600, 0);
        printf("%ld %d\n", r, r < 0 ? errno : 0);
        return 0;
    }
    fprintf(stderr, "usage: probe uring|handle PATH|open-handle DIR TYPE HEX|fchmodat2 PATH\n");
    return 2;
}
"""


def dcptrace(*args: str) -> tuple[int, str, str]:
    res = run(dcptrace_argv(*args), env=traced_env())
    return res.returncode, res.stdout.decode(), res.stderr.decode()


def answer(stdout: str) -> tuple[int, int, str]:
    """RESULT, ERRNO and any text a probe printed."""
    result, err, *rest = stdout.split(maxsplit=2)
    return int(result), int(err), rest[0] if rest else ""


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    return compile_c(tmp_path, PROBE, "probe")


def test_a_program_missing_from_the_view_is_named_with_its_real_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = dcptrace("--map", f"/={empty}", "--", "/bin/ls", "/")
    assert code == 127  # as a shell reports a missing program
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("dcptrace: /bin/ls: No such file or directory"), line
    assert f"{empty}/bin/ls" in line and "does not exist" in line, line


def test_a_command_missing_from_the_view_is_searched_there(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = dcptrace("--map", f"/={empty}", "--", "ls", "/")
    assert code == 127
    assert err.strip() == "dcptrace: ls: command not found in the --map view"


def _io_uring_usable(probe: Path) -> None:
    knob = Path("/proc/sys/kernel/io_uring_disabled")
    if knob.exists() and knob.read_text().strip() == "2":
        pytest.skip("io_uring is disabled on this host (kernel.io_uring_disabled=2)")
    fd, err, _ = answer(run([str(probe), "uring"]).stdout.decode())
    if fd < 0:
        pytest.skip(f"io_uring_setup fails natively here: {errno.errorcode.get(err, err)}")


def test_io_uring_setup_is_refused_with_enosys_under_map(probe: Path, tmp_path: Path) -> None:
    _io_uring_usable(probe)
    code, out, err = dcptrace("--map", f"/dcp-virtual={tmp_path}", "--", str(probe), "uring")
    assert code == 0, err
    fd, e, _ = answer(out)
    assert (fd, e) == (-1, errno.ENOSYS)


def test_io_uring_is_not_refused_without_map(probe: Path) -> None:
    _io_uring_usable(probe)
    code, out, err = dcptrace("--", str(probe), "uring")
    assert code == 0, err
    fd, e, _ = answer(out)
    assert fd >= 0, errno.errorcode.get(e, e)


def test_a_file_handle_does_not_open_a_file_outside_the_view(tmp_path: Path) -> None:
    # A static program alone in its view (--map /=VIEW): nothing outside VIEW
    # has a name there, but a file handle names an inode on the filesystem.
    probe = compile_c(tmp_path, PROBE, "probe-static", "-static")
    view = tmp_path / "view"
    view.mkdir()
    shutil.copy(probe, view / "probe")
    secret = tmp_path / "secret"
    secret.write_text("outside-the-view\n")
    native = run([str(probe), "handle", str(secret)]).stdout.decode().split()
    if native[0] == "-1":
        pytest.skip(f"name_to_handle_at fails here: {errno.errorcode.get(int(native[1]))}")
    handle_type, handle = native
    # Natively the handle opens the file (so a refusal below is dcptrace's).
    fd, _, text = answer(
        run([str(probe), "open-handle", str(view), handle_type, handle]).stdout.decode()
    )
    assert fd >= 0 and "outside-the-view" in text

    code, out, err = dcptrace(
        "--map", f"/={view}", "--", "/probe", "open-handle", "/", handle_type, handle
    )
    assert code == 0, err
    assert "outside-the-view" not in out
    assert answer(out)[:2] == (-1, errno.ENOSYS)


def test_fchmodat2_is_mapped(probe: Path, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    target = real / "f"
    target.write_text("x")
    target.chmod(0o644)
    native = tmp_path / "native"
    native.write_text("x")
    r, e, _ = answer(run([str(probe), "fchmodat2", str(native)]).stdout.decode())
    if r != 0:
        pytest.skip(f"fchmodat2 fails natively here: {errno.errorcode.get(e, e)}")
    virtual = f"/dcp-virtual-{os.getpid()}"
    assert not os.path.exists(virtual)
    code, out, err = dcptrace(
        "--map", f"{virtual}={real}", "--", str(probe), "fchmodat2", f"{virtual}/f"
    )
    assert code == 0, err
    assert answer(out)[:2] == (0, 0)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
