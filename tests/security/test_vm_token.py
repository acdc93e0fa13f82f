"""Attack: read a VM's instance token from the host or from inside the guest.

Before: the libvirt provider put `dcp.token=TOKEN` on the guest's kernel command
line, so `nobody` on the host read it from qemu's /proc/PID/cmdline (world
readable), libvirt's qemu log and status XML, and every user inside the guest
from /proc/cmdline. Now the token travels on a 0600 config disk that only root
in the guest can open.

The test boots one real guest (TCG) through the provider with the real OSS,
waits for its agent to register (so the token did arrive), then as `nobody`
scans every /proc/*/cmdline and /proc/*/environ, libvirt's files under
/run/libvirt, /etc/libvirt and /var/log/libvirt, and the provider's state
directory (serial logs, pool) for the token; and runs `cat /proc/cmdline` in the
guest through its agent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from attack import as_nobody, require_attacker

pytestmark = [
    pytest.mark.security,
    pytest.mark.vm,
    pytest.mark.libvirt,
    pytest.mark.root,
    pytest.mark.slow,
]

from vmcheck import why_no_vm_lab  # noqa: E402  (attack puts tests/integration on the path)

_reason = why_no_vm_lab()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from vmlab import Lab, LoopThread, make_lab, qemu_pid, remove_tree  # noqa: E402

NAME = "sec1"

# The attacker: finds the token by its first 8 characters (harmless to show on this
# script's own argv) and confirms each hit by the sha256 of the whole token.
SCAN = r"""
import hashlib, json, os, sys
prefix, length, digest, *roots = sys.argv[1:]
prefix, length = prefix.encode(), int(length)
found, seen = [], {"files": 0, "cmdlines": {}}

def scan(label, data):
    i = data.find(prefix)
    while i >= 0:
        if hashlib.sha256(data[i:i + length]).hexdigest() == digest:
            found.append(label)
            return
        i = data.find(prefix, i + 1)

def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None

for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    for what in ("cmdline", "environ"):
        data = read(f"/proc/{pid}/{what}")
        if data is not None:
            scan(f"/proc/{pid}/{what}", data)
            if what == "cmdline":
                seen["cmdlines"][pid] = data.replace(b"\0", b" ").decode(errors="replace")
for root in roots:
    for top, dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(top, name)
            if os.path.islink(path):
                continue
            data = read(path)
            if data is not None:
                seen["files"] += 1
                scan(path, data)
print(json.dumps({"found": found, "seen": seen}))
"""

# In the guest, as root through the agent: the kernel command line, and whether an
# unprivileged guest user can open the config disk.
IN_GUEST = (
    "cat /proc/cmdline; "
    "for d in /sys/block/vd*; do echo disk $(basename $d) $(cat $d/serial 2>/dev/null); done; "
    "setpriv --reuid=65534 --regid=65534 --clear-groups head -c 12 /dev/vdb "
    ">/dev/null 2>&1; echo nobody-read-config=$?; "
    "stat -c 'token-file %a %U' /run/dcp/instance.token"
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A lab with one guest booted and its agent registered with the OSS."""
    require_attacker()
    loop = LoopThread()
    lab = make_lab(loop, "s")
    ok = False
    try:
        lab.image = lab.build_image(tmp_path_factory.mktemp("image-cache"))
        loop.run(lab.start(), timeout=120)
        if lab.oss is None:
            pytest.skip(f"the token's arrival cannot be shown: {lab.oss_missing}")
        loop.run(lab.boot([NAME]), timeout=240)
        loop.run(_registered(lab), timeout=150)
        yield lab
        ok = True
    finally:
        if not lab.closed:
            loop.run(lab.aclose(), timeout=120)
        loop.stop()
        if ok:
            remove_tree(lab.work)
        else:
            print(f"\nVM token lab: serial logs kept in {lab.work}/state/serial", file=sys.stderr)


async def _registered(lab: Lab) -> None:
    assert lab.oss is not None
    async with asyncio.timeout(140):
        while True:
            row = await lab.oss.instance(NAME)
            if row and row.get("state") == "ready":
                return
            await asyncio.sleep(0.5)


def _scan(lab: Lab, roots: list[Path]) -> dict[str, object]:
    token = lab.tokens[NAME]
    digest = hashlib.sha256(token.encode()).hexdigest()
    res = as_nobody(SCAN, token[:8], str(len(token)), digest, *map(str, roots), timeout=120)
    assert res.returncode == 0, res.stderr
    out: dict[str, object] = json.loads(res.stdout)
    return out


def test_nobody_on_the_host_finds_no_token(lab: Lab) -> None:
    assert lab.provider is not None
    state = lab.provider.config.state_dir
    roots = [Path("/run/libvirt"), Path("/etc/libvirt"), Path("/var/log/libvirt"), state]
    result = _scan(lab, roots)
    assert result["found"] == [], f"nobody read the instance token from {result['found']}"
    # The scan did look where the token used to be: qemu's argv, readable by anyone.
    seen = result["seen"]
    assert isinstance(seen, dict)
    pid = qemu_pid(lab.provider.config.prefix + NAME)
    assert pid > 0
    qemu_argv = seen["cmdlines"].get(str(pid), "")
    assert f"dcp.instance={NAME}" in qemu_argv and "dcp.config=disk" in qemu_argv
    assert seen["files"] > 0


def test_provider_files_are_private(lab: Lab) -> None:
    assert lab.provider is not None
    inst = lab.provider.instances[NAME]
    state = lab.provider.config.state_dir
    assert stat.S_IMODE((state / "serial").stat().st_mode) == 0o700
    assert stat.S_IMODE(inst.serial_log.stat().st_mode) == 0o600
    pool = state / "overlays"
    assert stat.S_IMODE(pool.stat().st_mode) == 0o711  # qemu's user opens by path only
    config = pool / inst.config_volume
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE((pool / inst.volume).stat().st_mode) == 0o600
    token = lab.tokens[NAME].encode()
    assert token in config.read_bytes()  # the one place on the host that holds it
    assert token not in inst.serial_log.read_bytes()
    assert b"dcp-init: config disk: token" in inst.serial_log.read_bytes()


def test_domain_xml_and_qemu_argv_carry_no_token(lab: Lab) -> None:
    assert lab.provider is not None
    prov = lab.provider
    token = lab.tokens[NAME]

    async def xml() -> str:
        dom = await asyncio.to_thread(prov.conn.lookupByName, prov.config.prefix + NAME)
        return str(await asyncio.to_thread(dom.XMLDesc, 0))

    desc = lab.loop.run(xml())
    assert token not in desc and "dcp.config=disk" in desc
    qemu = Path(f"/proc/{qemu_pid(prov.config.prefix + NAME)}/cmdline").read_bytes()
    assert b"dcp.token" not in qemu and token.encode() not in qemu
    # libvirt copies nothing of it anywhere, not even where only root reads (its status
    # XML, the qemu log with qemu's command line): read as root here.
    copies = [
        str(f)
        for root in (Path("/run/libvirt"), Path("/etc/libvirt"), Path("/var/log/libvirt"))
        for f in root.rglob("*")
        if f.is_file() and not f.is_symlink() and token.encode() in f.read_bytes()
    ]
    assert copies == []


def test_guest_cmdline_has_no_token_and_only_root_reads_the_config_disk(lab: Lab) -> None:
    assert lab.provider is not None
    from vmagent.exec import remote

    drop = remote.TicketDrop()
    path, argv0 = b"/bin/sh", (b"sh", b"-c", IN_GUEST.encode())
    argv = remote.deputy_command(
        drop,
        f"{lab.provider.address(NAME)}:7070",
        NAME,
        remote.ticket_for_self(lab.tokens[NAME], NAME, path, argv0),
        path,
        argv0,
    )
    try:
        res = subprocess.run(
            ["ip", "netns", "exec", lab.netns, *argv],
            capture_output=True,
            timeout=120,
            cwd="/",
            stdin=subprocess.DEVNULL,
        )
    finally:
        drop.close()
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    cmdline = out.splitlines()[0]
    assert "dcp.token" not in cmdline and lab.tokens[NAME] not in out
    assert f"dcp.instance={NAME}" in cmdline and "dcp.config=disk" in cmdline
    assert "disk vdb dcp-config" in out
    assert "nobody-read-config=1" in out  # head: Permission denied
    assert "token-file 600 root" in out
