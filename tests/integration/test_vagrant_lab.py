"""The Vagrant lab as vagrant/README.md documents it, command for command.

`DCP_INSTANCES=2 ./lab.sh up`, the command it prints run verbatim from another
directory, `./lab.sh up` again (harmless), `./lab.sh vagrant halt` and
`./lab.sh vagrant up` (the instances re-register and the program runs again),
`./lab.sh vagrant destroy -f`, `./lab.sh down`, and nothing of the lab is left
but the box. Measured under TCG on 2 shared cores: 3.3 min with an image
rebuild and a new box, 4.2 min under load; it runs by default (CI installs
.ci/apt-vagrant.txt); `-m "not vagrant"` leaves it out, `-m vagrant` runs it alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.vmcheck import why_no_vm_lab

pytestmark = [
    pytest.mark.vm,
    pytest.mark.vagrant,
    pytest.mark.libvirt,
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.timeout(1800),
]

LAB = REPO / "vagrant"
NETNS = "dcp-lab"
STEP_TIMEOUT = 900  # seconds any one documented command may take (the first image build)
READY_TIMEOUT = 300  # seconds the instances get to register again after `vagrant up`


def why_no_vagrant_lab() -> str | None:
    """None when the lab can come up here, else why not."""
    if shutil.which("vagrant") is None:
        return "vagrant is not installed (apt-get install vagrant vagrant-libvirt dnsmasq-base)"
    if shutil.which("dnsmasq") is None and not Path("/usr/sbin/dnsmasq").exists():
        return "dnsmasq is not installed (apt-get install dnsmasq-base)"
    gems = Path("/usr/share/rubygems-integration/all/gems")
    if not list(gems.glob("vagrant-libvirt-*")):
        return "vagrant-libvirt is not installed (apt-get install vagrant-libvirt)"
    reason = why_no_vm_lab()
    if reason is not None:
        return reason
    if Path(f"/run/netns/{NETNS}").exists() or (LAB / ".lab").exists():
        return f"a Vagrant lab is already up here (netns {NETNS} or vagrant/.lab): ./lab.sh down"
    return None


class Shell:
    """Runs documented command lines with sh, as a user would type them; logs everything."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.timings: list[tuple[str, float]] = []

    def __call__(self, line: str, cwd: Path = LAB, ok: bool = True) -> str:
        t0 = time.monotonic()
        res = subprocess.run(
            ["sh", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=STEP_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        took = time.monotonic() - t0
        self.timings.append((line, took))
        with self.log.open("a") as f:
            f.write(f"$ {line}   # {took:.1f} s, exit {res.returncode}\n{res.stdout}{res.stderr}\n")
        if ok:
            assert res.returncode == 0, f"{line}: exit {res.returncode}\n{res.stdout}{res.stderr}"
        return res.stdout + res.stderr


def _ready(sh: Shell) -> list[str]:
    out = sh("./lab.sh list", ok=False)
    return sorted(w[0] for w in (line.split() for line in out.splitlines()) if w[1:2] == ["ready"])


def _leftovers() -> list[str]:
    """What of the lab is still on this machine (the box in ~/.vagrant.d is meant to stay)."""
    found = [
        str(p)
        for pattern in (
            "/var/lib/dcp/lab",
            "/var/lib/libvirt/images/dcp_vagrant_box_image_*",
            "/var/lib/libvirt/images/dcp-lab-*",
            "/var/lib/libvirt/images/vagrant_*",
            "/var/log/libvirt/qemu/vagrant_*",
            "/etc/libvirt/qemu/vagrant_*",
            "/etc/libvirt/qemu/networks/dcp-lab.xml",
            "/var/lib/libvirt/dnsmasq/dcp-lab.*",
            "/run/dcp-lab-libvirt",
            f"/run/netns/{NETNS}",
            str(LAB / ".lab"),
            str(LAB / ".vagrant"),
        )
        for p in Path("/").glob(pattern.lstrip("/"))
    ]
    procs = subprocess.run(["pgrep", "-af", "vagrant_(coordinator|inst)"], capture_output=True)
    found += procs.stdout.decode().splitlines()
    return found


@pytest.fixture
def sh(tmp_path: Path) -> Iterator[Shell]:
    reason = why_no_vagrant_lab()
    if reason is not None:
        pytest.skip(reason)
    shell = Shell(tmp_path / "commands.log")
    try:
        yield shell
    finally:
        if (LAB / ".lab").exists() or Path(f"/run/netns/{NETNS}").exists():
            shell("./lab.sh down", ok=False)
        print(f"commands and their output: {shell.log}")
        for line, took in shell.timings:
            print(f"{took:7.1f} s  {line[:90]}")
        print(f"{sum(t for _, t in shell.timings):7.1f} s  in all")


def test_the_documented_lab_runs_a_program_before_and_after_halt(sh: Shell, tmp_path: Path) -> None:
    up = sh("DCP_INSTANCES=2 ./lab.sh up")
    # The last lines say how to run a program; the token is in a 0600 file, not on screen.
    run = next(line.strip() for line in up.splitlines() if "DCP_TOKEN=$(cat " in line)
    token_file = Path(re.search(r"\$\(cat ([^)]+)\)", run).group(1))  # type: ignore[union-attr]
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert token and token not in up
    script_run = next(line.strip() for line in up.splitlines() if "lab.sh run " in line)
    assert "Programs start in /, a directory every instance has" in up.replace("\n", " ")

    # Verbatim from the user's shell, from a directory the instances do not have.
    assert sorted(sh(run, cwd=tmp_path).split()) == ["inst1", "inst2"]
    assert sorted(sh(script_run, cwd=tmp_path).split()) == ["inst1", "inst2"]
    assert _ready(sh) == ["inst1", "inst2"]

    # `up` on a running lab is harmless: no new tokens, the instances stay ready.
    tokens = (LAB / ".lab" / "tokens").read_bytes()
    sh("./lab.sh up")
    assert (LAB / ".lab" / "tokens").read_bytes() == tokens
    assert _ready(sh) == ["inst1", "inst2"]

    sh("./lab.sh vagrant halt")
    status = sh("./lab.sh vagrant status")
    assert len(re.findall(r"^(coordinator|inst\d)\s+shutoff", status, re.M)) == 3, status

    sh("./lab.sh vagrant up")
    deadline = time.monotonic() + READY_TIMEOUT
    while _ready(sh) != ["inst1", "inst2"]:
        assert time.monotonic() < deadline, sh("./lab.sh list", ok=False)
        time.sleep(3)
    assert sorted(sh(run, cwd=tmp_path).split()) == ["inst1", "inst2"]

    sh("./lab.sh vagrant destroy -f")
    down = sh("./lab.sh down")
    assert "vagrant box remove dcp" in down
    assert _leftovers() == []
    assert "dcp " in sh("vagrant box list", cwd=tmp_path)  # the documented box stays
    assert not os.path.exists(f"/run/netns/{NETNS}")
