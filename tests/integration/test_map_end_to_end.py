"""--map: an unmodified program reads and writes elsewhere, transparently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import compile_c, run, traced

pytestmark = pytest.mark.usefixtures("has_ptrace")

SCRIPT = r"""
set -e
cat /data/in.txt
mkdir -p /data/out/deep
echo written > /data/out/deep/file
cd /data/out
pwd
cat deep/file
cat ../in.txt
echo appended >> ./deep/../deep/file
mv deep/file deep/moved
ln -s /data/in.txt link
readlink link
cat link
ln /data/in.txt hard
rm hard
touch gone && rm gone
[ -e /data/out/deep/moved ] && echo exists
ls /data/out /data/out/deep
find /data -type f | sort
stat -c %s /data/in.txt
cd / && cat data/../data/in.txt
"""


def test_map_redirects_every_path_call(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "in.txt").write_text("input\n")
    # The same script natively against a real /data-like tree for comparison.
    res = traced(["bash", "-c", SCRIPT], "--map", f"/data={real}")
    assert res.stderr == b"", res.stderr
    assert res.returncode == 0
    out = res.stdout.decode().splitlines()
    assert out[0] == "input"
    assert out[1] == "/data/out"  # pwd shows the virtual directory
    assert out[2:4] == ["written", "input"]
    assert "/data/in.txt" in out  # readlink shows the virtual target
    assert "exists" in out
    assert "/data/in.txt" in out and "/data/out/deep/moved" in out
    assert (real / "out" / "deep" / "moved").read_text() == "written\nappended\n"
    assert os.readlink(real / "out" / "link") == "/data/in.txt"  # stored as given (bind mount)
    assert not Path("/data").exists() or not (Path("/data") / "out").exists()


def test_map_relative_paths_and_dotdot_from_inside(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "a" / "b").mkdir(parents=True)
    (real / "a" / "x.txt").write_text("x\n")
    outside = tmp_path / "outside.txt"
    outside.write_text("outside\n")
    script = f"cd /data/a/b && cat ../x.txt && cat ../../a/x.txt && cat {outside} && pwd -P"
    res = traced(["sh", "-c", script], "--map", f"/data={real}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().splitlines() == ["x", "x", "outside", "/data/a/b"]


def test_map_from_config_file_and_python(tmp_path: Path) -> None:
    real = tmp_path / "store"
    real.mkdir()
    cfg = tmp_path / "dcp.toml"
    cfg.write_text(f'[map]\n"/srv/dcp-test-data" = "{real}"\n')
    code = (
        "import os, pathlib\n"
        "p = pathlib.Path('/srv/dcp-test-data/py.txt')\n"
        "p.write_text('from python\\n')\n"
        "print(p.read_text().strip(), os.path.exists(p), sorted(os.listdir(p.parent)))\n"
        "os.chdir('/srv/dcp-test-data'); print(os.getcwd())\n"
    )
    import sys

    res = traced([sys.executable, "-c", code], "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().splitlines() == [
        "from python True ['py.txt']",
        "/srv/dcp-test-data",
    ]
    assert (real / "py.txt").read_text() == "from python\n"


def test_map_matches_a_native_run_in_the_real_directory(tmp_path: Path) -> None:
    """Differential: the program in a mapped /data sees what it sees natively in the real dir."""
    real = tmp_path / "real"
    native_dir = tmp_path / "native"
    for d in (real, native_dir):
        d.mkdir()
        (d / "f").write_text("1\n2\n3\n")
    script = (
        "sort -r {d}/f > {d}/g && wc -l {d}/g && tar -cf {d}/t.tar -C {d} f g && tar -tf {d}/t.tar"
    )
    native = run(["sh", "-c", script.format(d=native_dir)])
    mapped = traced(["sh", "-c", script.format(d="/data")], "--map", f"/data={real}")
    assert mapped.returncode == native.returncode == 0
    assert mapped.stdout == native.stdout.replace(str(native_dir).encode(), b"/data")
    assert (real / "g").read_bytes() == (native_dir / "g").read_bytes()


I386_GETPID = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    long r;
    __asm__ volatile ("int $0x80" : "=a"(r) : "a"(20L) : "memory");  /* i386 getpid */
    printf("%ld %d\n", r, r == (long)getpid());
    return 0;
}
"""


def test_foreign_abi_calls_cannot_escape_the_map(tmp_path: Path) -> None:
    exe = compile_c(tmp_path, I386_GETPID, "i386")
    native = run([str(exe)])
    if native.returncode != 0 or not native.stdout.endswith(b" 1\n"):
        pytest.skip(f"this kernel has no i386 syscall emulation: {native.stdout!r}")
    plain = traced([str(exe)])
    assert plain.stdout.endswith(b" 1\n")  # nothing intercepted: the call runs
    mapped = traced([str(exe)], "--map", f"/data={tmp_path}")
    assert mapped.stdout == b"-38 0\n"  # served calls: a foreign ABI gets ENOSYS
