"""Issue 14: the working directory is one namespace by default, whenever a process
can be placed (no `--volume .`): a shell pipeline under `dcptrace --instances 3
--placement spread` writes files in its cwd on one instance and reads them on
another, with the output and the files a native run leaves.  A plain run and a
run that places nothing start no storage server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR, REPO, dcptrace_argv, traced_env

pytestmark = [pytest.mark.usefixtures("has_ptrace"), pytest.mark.netns]

# Every command but the shell's builtins is exec'd, and so placed: sort, head, tee,
# cp, cat and python run on different instances and read by name what one before
# wrote (a redirection is the home shell's: it opens the real file).
PIPELINE = """
seq 1 300 > nums.txt
sort -rn -o sorted.txt nums.txt
head -5 sorted.txt | tee top.txt
mkdir -p sub && cp top.txt sub/copy.txt
cat sub/copy.txt sorted.txt | wc -l | tee count.txt
python3 -c 'import os; open("py.txt", "w").write(str(sorted(os.listdir("."))))'
cat py.txt; ls sub; rm nums.txt
"""


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("local instances with storage need root (mount namespaces, FUSE, tmpfs)")
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse: dcpfs cannot mount")
    try:
        import mfusepy  # noqa: F401
    except ImportError:
        pytest.skip("mfusepy is not installed (pip install '.[storage]')")


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _storages() -> set[str]:
    root = Path(DATA_DIR) / "storage"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def _dcptrace(cwd: Path, *options: str, script: str = PIPELINE) -> subprocess.CompletedProcess:
    argv = [*dcptrace_argv(*options), "--", "sh", "-c", script]
    return subprocess.run(argv, cwd=cwd, env=traced_env(), capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=240)  # fmt: skip


def test_cwd_is_one_namespace_by_default(tmp_path: Path) -> None:
    _require_root()
    (tmp_path / "native").mkdir()
    (tmp_path / "dcp").mkdir()
    native = subprocess.run(["sh", "-c", PIPELINE], cwd=tmp_path / "native", capture_output=True,
                            stdin=subprocess.DEVNULL, timeout=60)  # fmt: skip
    before = _storages()
    traced = _dcptrace(tmp_path / "dcp", "--instances", "3", "--placement", "spread")
    assert native.returncode == 0, native.stderr
    assert (traced.stdout, traced.returncode) == (native.stdout, native.returncode), traced.stderr
    assert _files(tmp_path / "dcp") == _files(tmp_path / "native")
    # It went through the namespace: the run's storage served the cwd as its volume,
    # and its record shows files written on one instance and read on another.
    (name,) = _storages() - before
    out = subprocess.run(
        [sys.executable, "-m", "oss", "storage", "ls", name, "--data", DATA_DIR, "--json"],
        env=traced_env(), capture_output=True, check=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    record = json.loads(out.stdout)
    volumes = json.loads((Path(DATA_DIR) / "storage" / name / "volumes.json").read_text())
    assert volumes == {"v0": str(tmp_path / "dcp")}
    files = {i: r["files"] for i, r in record["instances"].items()}
    crossed = set()
    for path in ("/v0/sorted.txt", "/v0/top.txt", "/v0/sub/copy.txt"):
        writers = {i for i, f in files.items() if f.get(path, {}).get("writes")}
        readers = {i for i, f in files.items() if f.get(path, {}).get("reads")}
        assert writers and readers, (path, files)
        crossed |= {(path, w, r) for w in writers for r in readers if w != r}
    assert crossed, files  # written on one instance, read on another


def test_a_placed_process_sees_the_namespace_and_opting_out_keeps_the_disk(
    tmp_path: Path,
) -> None:
    _require_root()
    script = "stat -f -c %T ."  # stat is placed; sh runs home
    shared = _dcptrace(tmp_path, "--instances", "2", "--placement", "spread", script=script)
    assert shared.returncode == 0, shared.stderr
    assert shared.stdout.strip() == b"fuseblk"  # dcpfs
    before = _storages()
    kept = _dcptrace(
        tmp_path, "--instances", "2", "--placement", "spread", "--no-share-cwd", script=script
    )
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.strip() != b"fuseblk"
    assert _storages() == before  # no storage server ran


def test_nothing_placed_starts_no_storage(tmp_path: Path) -> None:
    _require_root()
    before = _storages()
    # auto keeps a short `true` home: no instance, no server, no mount.
    res = _dcptrace(tmp_path, "--instances", "3", script="true")
    assert res.returncode == 0, res.stderr
    plain = _dcptrace(tmp_path, script="true")
    assert plain.returncode == 0, plain.stderr
    assert _storages() == before


SPECIALS = """
import os, socket, threading
os.mkfifo("p")
def w():
    with open("p", "w") as f:
        f.write("through the fifo")
t = threading.Thread(target=w)
t.start()
print(open("p").read())
t.join()
s = socket.socket(socket.AF_UNIX)
s.bind("s.sock")
s.listen(1)
c = socket.socket(socket.AF_UNIX)
c.connect("s.sock")
a, _ = s.accept()
c.send(b"over the socket")
print(a.recv(100).decode())
print(sorted(os.listdir(".")))
os.rename("p", "q")
os.unlink("q")
os.unlink("s.sock")
print(sorted(os.listdir(".")))
"""


def test_fifos_and_sockets_in_the_cwd_work_on_an_instance(tmp_path: Path) -> None:
    """mkfifo and an AF_UNIX bind in the shared cwd (the namespace keeps them on the
    instance that made them: SFTP cannot make them, the kernel serves them by inode)."""
    _require_root()
    (tmp_path / "native").mkdir()
    (tmp_path / "dcp").mkdir()
    script = 'python3 -c "$0"'  # python is placed
    native = subprocess.run(["sh", "-c", script, SPECIALS], cwd=tmp_path / "native",
                            capture_output=True, timeout=60)  # fmt: skip
    argv = [*dcptrace_argv("--instances", "2", "--placement", "spread"), "--",
            "sh", "-c", script, SPECIALS]  # fmt: skip
    traced = subprocess.run(argv, cwd=tmp_path / "dcp", env=traced_env(), capture_output=True,
                            stdin=subprocess.DEVNULL, timeout=240)  # fmt: skip
    assert native.returncode == 0, native.stderr
    assert (traced.stdout, traced.returncode) == (native.stdout, 0), traced.stderr


SERVER = """
import socket
s = socket.socket(socket.AF_UNIX)
s.bind("sock")
s.listen(1)
open("up", "w").close()
a, _ = s.accept()
print("server got", a.recv(100).decode())
"""
CLIENT = """
import os, socket, time
while not os.path.exists("up"):
    time.sleep(0.05)
c = socket.socket(socket.AF_UNIX)
c.connect("sock")
c.send(b"hello across instances")
"""


def test_an_af_unix_socket_in_the_cwd_is_reached_from_another_instance(tmp_path: Path) -> None:
    """Local instances share one kernel: a socket bound in the shared cwd is the home
    directory's (the kernel finds it by inode; each dcpfs mount numbers its own)."""
    _require_root()
    script = 'python3 -c "$0" & python3 -c "$1"; wait'
    (tmp_path / "native").mkdir()
    (tmp_path / "dcp").mkdir()
    native = subprocess.run(["sh", "-c", script, SERVER, CLIENT], cwd=tmp_path / "native",
                            capture_output=True, timeout=60)  # fmt: skip
    argv = [*dcptrace_argv("--instances", "2", "--placement", "spread"), "--",
            "sh", "-c", script, SERVER, CLIENT]  # fmt: skip
    traced = subprocess.run(argv, cwd=tmp_path / "dcp", env=traced_env(), capture_output=True,
                            stdin=subprocess.DEVNULL, timeout=240)  # fmt: skip
    assert native.returncode == 0, native.stderr
    assert (traced.stdout, traced.returncode) == (native.stdout, 0), traced.stderr
    assert sorted(p.name for p in (tmp_path / "dcp").iterdir()) == ["sock", "up"]
