"""Issue 14 on local instances: --volume paths are one namespace, tiered, billed.

Each case runs a program natively in one directory and under
`dcptrace --instances 2 --placement spread --volume .` in another, and
compares its output and the files it left; the storage's own record
(`dcp-oss storage ls --json`) says which instance did what and which moves
were made, with their reasons.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR, REPO, dcptrace_argv, traced_env

pytestmark = [pytest.mark.usefixtures("has_ptrace"), pytest.mark.netns]

WRITER = """
import hashlib, os, sys, time
data = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB, the same every run
os.makedirs("out", exist_ok=True)
with open("out/data.bin", "wb") as f:
    f.write(data)
with open("out/note.txt", "w") as f:
    f.write("written on one instance\\n")
open("written", "w").close()
for _ in range(600):  # alive until it was read: the reader is placed elsewhere
    if os.path.exists("read"):
        break
    time.sleep(0.1)
"""
READER = """
import hashlib, os, time
while not os.path.exists("written"):
    time.sleep(0.1)
print(hashlib.sha256(open("out/data.bin", "rb").read()).hexdigest())
print(open("out/note.txt").read(), end="")
open("read", "w").close()
"""
TIERS = """
import hashlib, os
def digest(p): return hashlib.sha256(open(p, "rb").read()).hexdigest()[:16]
with open("small.txt", "w") as f:
    f.write("hot\\n" * 1000)
for _ in range(4):            # read repeatedly: promoted to memory
    open("small.txt").read()
with open("big.bin", "wb") as f:   # a large sequential write: the networked tier
    for i in range(6):
        f.write(bytes([i]) * (1 << 20))
for n in range(4):            # 4 x 400 KiB through a 1 MiB memory tier: it fills
    with open(f"part{n}.bin", "wb") as f:
        f.write(bytes([n]) * (400 << 10))
for p in ["small.txt", "big.bin"] + [f"part{n}.bin" for n in range(4)]:
    print(p, os.path.getsize(p), digest(p))
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


def _run(
    argv: list[str], cwd: Path, config: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    extra = ["--config", str(config)] if config else []
    full = [*dcptrace_argv("--instances", "2", "--placement", "spread", "--volume", ".", *extra),
            "--", *argv]  # fmt: skip
    return subprocess.run(full, cwd=cwd, env=traced_env(), capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=240)  # fmt: skip


def _native(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)


def _latest_storage() -> dict[str, object]:
    root = Path(DATA_DIR) / "storage"
    latest = max(root.iterdir(), key=lambda p: p.stat().st_mtime)
    out = subprocess.run(
        [sys.executable, "-m", "oss", "storage", "ls", latest.name, "--data", DATA_DIR, "--json"],
        env=traced_env(), capture_output=True, check=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    return dict(json.loads(out.stdout))


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_written_on_one_instance_read_whole_on_another(tmp_path: Path) -> None:
    _require_root()
    argv = ["sh", "-c", 'python3 -c "$0" & python3 -c "$1"; wait', WRITER, READER]
    (tmp_path / "native").mkdir()
    (tmp_path / "dcp").mkdir()
    native = _native(argv, tmp_path / "native")
    traced = _run(argv, tmp_path / "dcp")
    assert traced.returncode == native.returncode == 0, traced.stderr
    assert traced.stdout == native.stdout
    # Results land in the user's directory, byte-identical to a native run's.
    assert _files(tmp_path / "dcp") == _files(tmp_path / "native")
    record = _latest_storage()["instances"]
    assert isinstance(record, dict)
    writers = {i for i, r in record.items() if r["files"].get("/v0/out/data.bin", {}).get("writes")}
    readers = {i for i, r in record.items() if r["files"].get("/v0/out/data.bin", {}).get("reads")}
    assert writers and readers and writers.isdisjoint(readers), record


def test_tiers_promote_stream_and_demote(tmp_path: Path) -> None:
    _require_root()
    config = tmp_path / "dcp.toml"
    config.write_text("[storage]\nmemory_mb = 1\nstream_mb = 2\npromote_after_reads = 3\n")
    argv = ["sh", "-c", 'python3 -c "$0"', TIERS]  # the python process is placed
    (tmp_path / "native").mkdir()
    (tmp_path / "dcp").mkdir()
    native = _native(argv, tmp_path / "native")
    traced = _run(argv, tmp_path / "dcp", config)
    assert traced.returncode == native.returncode == 0, traced.stderr
    assert traced.stdout == native.stdout  # the program's output is a native run's
    assert _files(tmp_path / "dcp") == _files(tmp_path / "native")
    record = _latest_storage()["instances"]
    assert isinstance(record, dict)
    moves = [
        (m["path"], m["from"], m["to"], m["reason"]) for r in record.values() for m in r["moves"]
    ]
    assert any(p == "/v0/small.txt" and t == "memory" and "promoted" in why
               for p, _f, t, why in moves), moves  # fmt: skip
    assert any(p == "/v0/big.bin" and t == "net" and "sequential" in why
               for p, _f, t, why in moves), moves  # fmt: skip
    assert any(f == "memory" and "demoted" in why for _p, f, _t, why in moves), moves


SYNCED = """
import os, time
fd = os.open("synced.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, b"fsynced before the instance was lost\\n")
os.fsync(fd)
open("ready", "w").close()
time.sleep(600)  # the test kills this instance now
"""
WAITER = """
import os, time
while not os.path.exists("go"):
    time.sleep(0.1)
print(open("synced.txt").read(), end="")
"""


def _agent_serving(name: str, instance: str) -> int:
    """The host pid of the agent whose dcpfs serves storage `name` as `instance`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"vmagent.storage.dcpfs" not in argv:
                continue
            if f"/run/dcp/fs/{name} " not in Path(f"/proc/{pid}/mountinfo").read_text():
                continue
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            agent = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if instance.encode() in agent:
            return parent
    raise AssertionError(f"no agent of {instance} serves storage {name}")


def test_fsynced_data_survives_the_loss_of_its_instance(tmp_path: Path) -> None:
    _require_root()
    import signal
    import time

    argv = ["sh", "-c", 'python3 -c "$0" & python3 -c "$1"; wait', SYNCED, WAITER]
    full = [*dcptrace_argv("--instances", "3", "--placement", "spread", "--volume", "."),
            "--", *argv]  # fmt: skip
    proc = subprocess.Popen(full, cwd=tmp_path, env=traced_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.1)
        root = Path(DATA_DIR) / "storage"
        state = max(root.iterdir(), key=lambda p: p.stat().st_mtime)
        writer = ""
        while not writer:  # the instances' reports (1 s apart) say where it was written
            assert time.monotonic() < deadline
            time.sleep(0.2)
            for report in state.glob("report-*.json"):
                with contextlib.suppress(ValueError):
                    files = json.loads(report.read_text()).get("files", {})
                    if files.get("/v0/synced.txt", {}).get("writes"):
                        writer = report.name[7:-5]
        os.kill(_agent_serving(state.name, writer), signal.SIGKILL)  # the instance is lost
        (tmp_path / "go").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "synced.txt").read_bytes() == b"fsynced before the instance was lost\n"
    assert out == b"fsynced before the instance was lost\n", err


FILLER = """
import errno, os
fd = os.open("fill.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
total = 0
try:
    while True:
        total += os.write(fd, bytes([total % 251]) * 65536)
except OSError as e:
    print(errno.errorcode[e.errno], total)
os.close(fd)
"""


def test_a_write_past_the_storage_limit_fails_with_edquot(tmp_path: Path) -> None:
    _require_root()
    config = tmp_path / "dcp.toml"
    config.write_text("[storage]\nlimit_mb = 3\n")
    (tmp_path / "dcp").mkdir()
    traced = _run(["sh", "-c", 'python3 -c "$0"', FILLER], tmp_path / "dcp", config)
    assert traced.returncode == 0, traced.stderr
    name, written = traced.stdout.split()
    assert name == b"EDQUOT"  # a real errno in the program
    data = (tmp_path / "dcp" / "fill.bin").read_bytes()
    assert len(data) == int(written) <= 3 << 20  # nothing written before it is lost
    assert all(data[i] == (i // 65536 * 65536) % 251 for i in range(0, len(data), 4096))
    billing = _latest_storage()["billing"]
    assert isinstance(billing, dict)
    assert billing["held"]["net"] == len(data)  # measured bytes, not declared
    assert billing["gib_seconds"]["net"] > 0
    assert billing["micros"]["net"] == pytest.approx(
        billing["gib_seconds"]["net"] * billing["prices"]["net"]
    )


def test_volume_without_instances_is_one_usage_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [*dcptrace_argv("--volume", "."), "--", "true"], cwd=tmp_path, env=traced_env(),
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    want = b"dcptrace: --volume needs --instances N or --oss URL (instances to share it)\n"
    assert res.stderr == want


UNCLOSED = """
import glob, os, time
fd = os.open("open.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, b"written, not closed\\n")
os.stat(glob.glob("/run/dcp/fs/*/.dcp-sync")[0])  # what a checkpoint does first
open("ready", "w").close()
while not os.path.exists("go"):
    time.sleep(0.1)
os.close(fd)
"""


def test_a_sync_publishes_files_still_open_for_writing(tmp_path: Path) -> None:
    _require_root()
    import time

    full = [*dcptrace_argv("--instances", "1", "--placement", "spread", "--volume", "."), "--",
            "sh", "-c", 'python3 -c "$0"', UNCLOSED]  # fmt: skip
    proc = subprocess.Popen(full, cwd=tmp_path, env=traced_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.1)
        # The writer still holds it open on its instance; its bytes are on the volume.
        assert (tmp_path / "open.txt").read_bytes() == b"written, not closed\n"
        (tmp_path / "go").touch()
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        ("/", "--volume /: not a directory of the program's own"),
        ("/proc/self", "--volume /proc/self: not a directory of the program's own"),
        ("/nonexistent-dcp", "--volume /nonexistent-dcp: /nonexistent-dcp is not a directory"),
    ],
)
def test_a_volume_that_cannot_be_one_is_refused_before_the_run(
    tmp_path: Path, volume: str, message: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("--volume checks its paths after it checks for root")
    res = subprocess.run(
        [*dcptrace_argv("--instances", "1", "--volume", volume), "--", "true"], cwd=tmp_path,
        env=traced_env(), capture_output=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.decode() == f"dcptrace: {message}\n"
