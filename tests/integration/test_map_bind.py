"""`--map` behaves as a bind mount (issue 14's --map gaps): differential tests.

Each case runs a script twice over a fresh copy of the same tree: once with the
real directory bind-mounted on the mountpoint (root, a private mount namespace
from `unshare -m`), once under `dcptrace --map MOUNTPOINT=REAL`.  Output, exit
status and what lands on disk (names, symlink contents) must be equal.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import dcptrace_argv, traced_env

pytestmark = [
    pytest.mark.root,
    pytest.mark.usefixtures("has_ptrace"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a bind mount in a mount namespace needs root"),
]


def tree(root: Path) -> tuple[Path, Path]:
    """A real directory with a shell and a Python script, and an empty mountpoint."""
    real, mnt = root / "real", root / "mnt" / "v"
    real.mkdir(parents=True)
    mnt.mkdir(parents=True)
    (real / "s.sh").write_text('#!/bin/sh\necho "0=$0 1=$1"\n')
    (real / "a.py").write_text(
        "#!/usr/bin/env python3\nimport sys\nprint('argv0=' + sys.argv[0], 'file=' + __file__)\n"
    )
    (real / "s.sh").chmod(0o755)
    (real / "a.py").chmod(0o755)
    return real, mnt


def on_disk(real: Path) -> list[tuple[str, str]]:
    """What the run left in the real directory: names, and each symlink's stored target."""
    out = []
    for entry in sorted(real.iterdir()):
        out.append((entry.name, os.readlink(entry) if entry.is_symlink() else ""))
    return out


def both(tmp_path: Path, script: str) -> tuple[tuple[bytes, bytes, int, list], ...]:
    """(stdout, stderr, status, disk) under a bind mount, then under --map."""
    results = []
    for mode in ("bind", "map"):
        root = tmp_path / mode
        real, mnt = tree(root)
        body = textwrap.dedent(script).replace("@MNT", str(root / "mnt")).replace("@V", str(mnt))
        if mode == "bind":
            if shutil.which("unshare") is None:
                pytest.skip("no unshare(1) to make a mount namespace")
            inner = f"mount --bind {real} {mnt} && exec sh -c '{body}'"
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", inner]
        else:
            argv = [*dcptrace_argv("--map", f"{mnt}={real}"), "--", "sh", "-c", body]
        proc = subprocess.run(argv, env=traced_env(), capture_output=True, cwd=root,
                              stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip
        out = proc.stdout.replace(str(root).encode(), b"ROOT")
        err = proc.stderr.replace(str(root).encode(), b"ROOT")
        disk = [(n, t.replace(str(root), "ROOT")) for n, t in on_disk(real)]
        results.append((out, err, proc.returncode, disk))
    assert "'" not in script  # the bind mode quotes the script in single quotes
    return tuple(results)


def test_a_mapped_scripts_name_is_the_path_its_exec_used(tmp_path: Path) -> None:
    bind, mapped = both(tmp_path, """
        @V/s.sh x
        sh @V/s.sh y
        cd @V && ./s.sh z && ./a.py && @V/a.py
    """)  # fmt: skip
    assert bind == mapped
    assert b"0=ROOT/mnt/v/s.sh 1=x\n" in bind[0] and b"0=./s.sh 1=z\n" in bind[0]
    assert b"argv0=ROOT/mnt/v/a.py file=ROOT/mnt/v/a.py\n" in bind[0]


def test_a_symlink_stores_the_path_as_given_and_is_followed_in_the_view(
    tmp_path: Path,
) -> None:
    bind, mapped = both(tmp_path, """
        ln -s @V/s.sh @V/abs && ln -s s.sh @V/rel && ln -s ../v/a.py @V/up
        readlink @V/abs @V/rel @V/up
        head -1 @V/abs @V/rel @V/up
        ls -L @V | tr "\\n" " "; echo
        cd @V && cat abs | head -1
    """)  # fmt: skip
    assert bind == mapped
    assert ("abs", "ROOT/mnt/v/s.sh") in bind[3] and ("rel", "s.sh") in bind[3]


def test_the_mountpoints_parent_lists_it_as_a_bind_mount_would(tmp_path: Path) -> None:
    # The mountpoint exists (a bind mount needs one): `ls` of its parent shows it,
    # and stat of it is the mapped directory's.
    bind, mapped = both(tmp_path, """
        ls @MNT
        ls @MNT/v
        test -x @MNT/v/s.sh && echo executable
    """)  # fmt: skip
    assert bind == mapped
    assert bind[0].startswith(b"v\na.py\ns.sh\nexecutable\n")


def test_unix_sockets_bind_and_connect_at_mapped_paths(tmp_path: Path) -> None:
    bind, mapped = both(tmp_path, """
        python3 -c "
import socket
p = \\"@V/sock\\"
s = socket.socket(socket.AF_UNIX)
s.bind(p)
s.listen(1)
print(\\"bound\\", s.getsockname())
c = socket.socket(socket.AF_UNIX)
c.connect(p)
print(\\"peer\\", c.getpeername())
a, _ = s.accept()
c.sendall(b\\"hi\\")
print(\\"got\\", a.recv(2), a.getsockname())
"
        ls @V
    """)  # fmt: skip
    assert bind == mapped
    assert b"bound ROOT/mnt/v/sock\n" in bind[0] and ("sock", "") in bind[3]
