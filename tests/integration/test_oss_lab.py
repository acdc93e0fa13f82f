"""`dcp-oss lab` as a real subprocess: private libvirtd, libvirt provider, a warm pool of 1.

The lab file starts its own virtlogd + libvirtd in a fresh namespace; the pool
manager boots one TCG guest whose agent registers through the bridge. The test
sees it through the HTTP API (an admin token from `dcp-oss account create
--admin`), SIGTERMs the server, and checks by PID and name that the domain,
its qemu, the overlay, the bridge, the namespace, libvirtd and virtlogd are gone.

The guest image comes from the builder's cache (~/.cache/dcp/images; rebuilt
only when the sources change), or from $DCP_LAB_IMAGE (a `dcp-image build --out` dir).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from vmcheck import LIBVIRT_SOCKET, socket_alive, why_no_vm_lab

pytestmark = [pytest.mark.vm, pytest.mark.libvirt, pytest.mark.root, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SOCKET = LIBVIRT_SOCKET


if os.geteuid() == 0 and shutil.which("ip"):
    try:
        from vmlab import reap_stale_labs

        reap_stale_labs()  # a killed earlier run (of this test or the VM lab) must not block
    except ImportError:
        pass

_reason = why_no_vm_lab()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from net import bridge  # noqa: E402
from oss.compute.providers.libvirtd import pid_alive  # noqa: E402


def _image() -> Path:
    given = os.environ.get("DCP_LAB_IMAGE")
    if given:
        return Path(given)
    from images.builder import BuildConfig, Builder, default_cache_dir, source_checkout

    cfg = BuildConfig(source_dir=source_checkout(), cache_dir=default_cache_dir())
    return Builder(cfg).build().directory


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


class Lines:
    """A subprocess's stdout, read line by line with a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes], err: Path) -> None:
        self.proc = proc
        self.err = err
        self.buf = b""

    def next(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line from dcp-oss lab in {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    status = self.proc.wait(10)
                    tail = self.err.read_text(errors="replace")[-2000:]
                    raise AssertionError(f"dcp-oss lab exited ({status}): {self.buf!r} {tail}")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()


@pytest.fixture
def work() -> Iterator[Path]:
    # Recorded like vmlab.make_lab's dirs, so reap_stale_labs can clean up after a kill.
    w = Path(tempfile.mkdtemp(prefix="dcp-vmlab-l-", dir="/var/tmp"))
    w.chmod(0o755)  # qemu runs as libvirt-qemu and must reach the overlays and logs
    (w / "owner.pid").write_text(str(os.getpid()))
    (w / "netns").write_text(f"dcp-lab{os.getpid() % 10000}")
    yield w
    shutil.rmtree(w, ignore_errors=True)


@dataclass
class RunningLab:
    """One `dcp-oss lab` subprocess and what it said about itself."""

    work: Path
    proc: subprocess.Popen[bytes]
    err: BinaryIO
    token: str
    netns: str
    bridge: str
    url: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    qemu: dict[str, int] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.work / "oss"

    def log(self) -> str:
        return (self.work / "lab.err").read_text(errors="replace")[-3000:]

    def get(self, path: str) -> Any:
        req = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def instances(self, state: str) -> list[dict[str, Any]]:
        """The warm pool's instances in `state`, as the API lists them."""
        return [r for r in self.get("/v1/instances") if r["pool"] == "warm" and r["state"] == state]

    def remember_qemu(self, name: str) -> None:
        path = Path(f"/run/libvirt/qemu/dcp-{name}.pid")
        if path.exists():
            self.qemu[name] = int(path.read_text())


def lab_file(work: Path, image: Path, netns: str, br: str) -> Path:
    path = work / "lab.toml"
    path.write_text(
        f"""
[libvirtd]
netns = "{netns}"
run_dir = "{work / "run"}"

[libvirt]
image_dir = "{image}"
state_dir = "{work / "state"}"
subnet = "10.231.8.0/24"
bridge = "{br}"
domain_type = "qemu"
boot_timeout = 120.0

[[pools]]
name = "warm"
instance_type = "tcg-small"
cpus = 1
memory_mb = 512
warm_target = 1
max_size = 1
"""
    )
    return path


@pytest.fixture
def running(work: Path) -> Iterator[RunningLab]:
    """`dcp-oss lab` started and up (its three stdout lines read); killed if a test fails."""
    image = _image()
    netns = (work / "netns").read_text()
    br = f"dcpbrl{os.getpid() % 10000}"
    config = lab_file(work, image, netns, br)
    token = subprocess.run(
        [sys.executable, "-m", "oss", "account", "create"]
        + ["--data", str(work / "oss"), "--admin", "ops"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    err = open(work / "lab.err", "wb")  # noqa: SIM115 (closed after the process ends)
    proc = subprocess.Popen(
        [sys.executable, "-m", "oss", "lab", "--config", str(config)]
        + ["--data", str(work / "oss"), "--listen", "127.0.0.1:0", "--heartbeat-timeout", "20"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=err,
        cwd="/",
    )
    lab = RunningLab(work, proc, err, token, netns, br)
    try:
        out = Lines(proc, work / "lab.err")
        lab.url = out.next(60).removeprefix("dcp-oss listening on ")
        guest = out.next(10)
        assert guest == f"dcp-oss instances use http://10.231.8.1:8470 (netns {netns})"
        words = out.next(10).split()  # dcp-oss libvirtd pid N virtlogd pid M
        lab.pids = {"libvirtd": int(words[3]), "virtlogd": int(words[6])}
        yield lab
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        err.close()
        for pid in [*lab.qemu.values(), *lab.pids.values()]:  # alive only after a failure
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if bridge.netns_exists(netns):
            bridge.remove_netns(netns)


def stop_and_check_everything_is_gone(lab: RunningLab) -> None:
    """SIGTERM: exit 0, and every VM, overlay, daemon, bridge and namespace is gone."""
    lab.proc.send_signal(signal.SIGTERM)
    assert lab.proc.wait(120) == 0, lab.log()
    for name, pid in lab.qemu.items():
        assert not pid_alive(pid), f"qemu of {name} (pid {pid}) still alive"
        assert not Path(f"/run/libvirt/qemu/dcp-{name}.pid").exists()
    assert lab.pids and not any(pid_alive(p) for p in lab.pids.values()), lab.pids
    assert not socket_alive(SOCKET)
    assert not bridge.netns_exists(lab.netns)  # and with it the bridge and the taps
    assert not bridge.link_exists(lab.bridge)
    assert not list((lab.work / "state" / "overlays").glob("*.qcow2"))
    assert not list((lab.work / "run").glob("*.pid"))
    with sqlite3.connect(lab.data / "oss.sqlite3") as db:
        states = {n: st for n, st in db.execute("SELECT name, state FROM instances")}
    assert states and set(states.values()) == {"destroyed"}, states
    assert "Traceback" not in lab.log()


def test_dcp_oss_lab_keeps_a_warm_vm_and_cleans_up_on_sigterm(running: RunningLab) -> None:
    lab = running
    assert all(pid_alive(p) for p in lab.pids.values())
    assert bridge.netns_exists(lab.netns) and bridge.link_exists(lab.bridge, lab.netns)

    # The pool manager boots one VM; its agent registers through the bridge.
    deadline = time.monotonic() + 180
    while not (ready := lab.instances("ready")):
        assert lab.proc.poll() is None, lab.log()
        assert time.monotonic() < deadline, lab.log()
        time.sleep(1)
    warm = ready[0]
    name = warm["name"]
    assert warm["hostname"] == name and warm["address"].startswith("10.231.8.")
    pools = {p["name"]: p for p in lab.get("/v1/pools")}
    assert pools["warm"]["provider"] == "libvirt" and pools["warm"]["live"] == 1
    lab.remember_qemu(name)
    assert pid_alive(lab.qemu[name])
    assert (lab.work / "state" / "overlays" / f"dcp-{name}.qcow2").is_file()

    # A second lab while this one's libvirtd owns the socket: one clear error, and the
    # first lab's namespace and daemons are untouched.
    second = subprocess.run(
        [sys.executable, "-m", "oss", "lab", "--config", str(lab.work / "lab.toml")]
        + ["--data", str(lab.work / "oss2"), "--listen", "127.0.0.1:0"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert second.returncode == 1
    assert second.stderr.startswith("Error: a libvirtd already listens on"), second.stderr
    assert bridge.netns_exists(lab.netns) and all(pid_alive(p) for p in lab.pids.values())

    stop_and_check_everything_is_gone(lab)


def test_sigterm_while_the_warm_vm_boots_undoes_the_boot(running: RunningLab) -> None:
    """The pool manager's create() is cancelled mid-boot; nothing of it is left."""
    lab = running
    deadline = time.monotonic() + 60
    while not (booting := lab.instances("pending")) or not lab.qemu:
        assert lab.proc.poll() is None, lab.log()
        assert time.monotonic() < deadline, lab.log()
        if booting:
            lab.remember_qemu(booting[0]["name"])
        time.sleep(0.2)
    # (Its agent needs ~10 s more under TCG to register: the stop lands mid-boot.)
    stop_and_check_everything_is_gone(lab)
