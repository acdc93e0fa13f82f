"""Issue 14 on VMs: one namespace across two TCG guests, and fsync surviving a VM's loss.

`dcptrace --oss URL --volume DIR` from the lab namespace: the run serves DIR
(SFTP) on the lab bridge, the OSS relays the mount to each guest a process is
placed on, and the guest's agent mounts dcpfs.  One booted lab for the module;
run ONLY under `flock /work/plans/vm.lock python -m pytest ...` (one VM run at a
time on the machine).  The image comes from the user's image cache (rebuilt only
when its inputs change).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmcheck import why_no_vm_lab

pytestmark = [pytest.mark.vm, pytest.mark.libvirt, pytest.mark.root, pytest.mark.slow]

_reason = why_no_vm_lab()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from vmlab import Lab, LoopThread, make_lab, remove_tree  # noqa: E402

from images.builder import default_cache_dir, source_checkout  # noqa: E402
from oss.compute.providers.libvirt import DomainState  # noqa: E402

FUSE_MAGIC = "65735546"  # statfs f_type of a FUSE file system (`stat -f -c %t`)

# Run in a guest (it lives in the volume, so every guest finds it through dcpfs).
# Its instance from the guest kernel's command line, by builtins: the program sees its
# home's hostname (issue 11), and an exec inside it may be placed on another instance.
RW = """#!/bin/sh
read c < /proc/cmdline
for w in $c; do case "$w" in dcp.instance=*) h=${w#dcp.instance=} ;; esac; done
case "$1" in
  write) seq 1 60000 > "$2/data.txt"; mkdir -p "$2/sub"; echo "$h" > "$2/sub/writer" ;;
  read) echo "sum $(md5sum < "$2/data.txt" | cut -d' ' -f1) $(cat "$2/sub/writer")" ;;
  sync) exec /usr/bin/python3 -c '
import os, sys, time
fd = os.open(sys.argv[1] + "/durable.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, bytes(range(256)) * 4096)
os.fsync(fd)
where = [w for w in open("/proc/cmdline").read().split() if w.startswith("dcp.instance=")]
print("synced on", where[0].split("=", 1)[1], flush=True)
time.sleep(600)  # the file stays open: only the fsync published it
' "$2" ;;
esac
echo "$1 on $h $(stat -f -c %t "$2")"
"""


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """vm1 and vm2 booted, registered with the lab's OSS (the image from the cache)."""
    loop = LoopThread()
    failed_before = request.session.testsfailed
    lab = make_lab(loop, "sv")
    try:
        lab.image = lab.build_image(default_cache_dir())
        loop.run(lab.start(), timeout=120)
        if lab.oss is None:
            pytest.skip(f"no OSS/agent in this checkout: {lab.oss_missing}")
        loop.run(lab.boot(["vm1", "vm2"]), timeout=240)
        for n in ("vm1", "vm2"):
            loop.run(lab.registered(n), timeout=150)
        yield lab
    finally:
        if not lab.closed:
            loop.run(lab.aclose(), timeout=120)
        if request.session.testsfailed > failed_before:
            print(
                f"\nstorage VM lab failed: serial logs in {lab.work}/state/serial", file=sys.stderr
            )
        else:
            remove_tree(lab.work)
        loop.stop()


ACCOUNT: dict[str, str] = {}


@pytest.fixture(scope="module")
def token(lab: Lab) -> str:
    """An account token (the tests run dcptrace as root: the account may run as root)."""
    assert lab.oss is not None
    acct, _user, tok = lab.loop.run(
        lab.oss.oss.accounts.create_account("storage", False, "sum", "u", allow_root=True)
    )
    ACCOUNT["id"] = str(acct["id"])
    return str(tok)


def mount_lines(lab: Lab) -> list[str]:
    """The newest program's log lines about the storage mounts its home asked for (the
    OSS's, timed); not those of an instance that mounted for execs placed from another
    (`StorageRelay.mount_soon`, which the home's own request for it may follow)."""
    from oss.telemetry.logs import LogQuery

    oss = lab.oss.oss  # type: ignore[union-attr]

    async def read() -> list[str]:
        for _ in range(60):  # the log is flushed every tick
            (prog,) = await oss.programs.programs(ACCOUNT["id"], None, 1)
            lines, _cursor, _n = await oss.logs.read_logs(None, prog["id"], LogQuery())
            found = [
                ln.text
                for _i, ln in lines
                if ln.text.startswith("storage ") and "for execs placed from" not in ln.text
            ]
            if found:
                return found
            await asyncio.sleep(0.5)
        return []

    return lab.loop.run(read())


@pytest.fixture
def volume(lab: Lab) -> Path:
    """The user's directory declared with --volume, holding the guests' script."""
    vol = Path(lab.work) / f"vol-{time.monotonic_ns()}"
    vol.mkdir()
    (vol / "rw.sh").write_text(RW)
    (vol / "rw.sh").chmod(0o755)
    return vol


def dcptrace(
    lab: Lab, token: str, vol: Path, script: str, *, in_cwd: bool = False
) -> subprocess.Popen[bytes]:
    """`dcptrace --oss URL --volume VOL -- sh -c SCRIPT` in the lab namespace (from `/`);
    `in_cwd`: from VOL, declaring only `--share-cwd` (off by default under --oss)."""
    env = dict(os.environ, PYTHONPATH=str(source_checkout()), DCP_TOKEN=token)
    env.pop("DCP_STORAGE_HOST", None)
    declared = ["--share-cwd"] if in_cwd else ["--volume", str(vol)]
    return subprocess.Popen(
        ["ip", "netns", "exec", lab.netns, sys.executable, "-m", "tracer.cli", "--no-state",
         "--oss", lab.oss_url, "--placement", "spread", *declared,
         "--", "/bin/sh", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        cwd=vol if in_cwd else "/", env=env, start_new_session=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen[bytes], timeout: float = 240) -> tuple[int, str, str]:
    """Wait for a dcptrace (killing its group past `timeout`): status, stdout, stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def test_files_written_on_one_vm_are_read_byte_identical_on_the_other(
    lab: Lab, token: str, volume: Path
) -> None:
    rw = volume / "rw.sh"
    status, out, err = finish(
        dcptrace(lab, token, volume, f"{rw} write {volume}; {rw} read {volume}")
    )
    assert status == 0, err[-3000:]
    lines = out.splitlines()
    (wrote,) = [line.split() for line in lines if line.startswith("write on ")]
    (read,) = [line.split() for line in lines if line.startswith("read on ")]
    # Two guests, each with the volume on its own dcpfs mount.
    assert {wrote[2], read[2]} == {"vm1", "vm2"}, lines
    assert wrote[3] == read[3] == FUSE_MAGIC, lines
    expected = "".join(f"{i}\n" for i in range(1, 60001)).encode()
    assert f"sum {hashlib.md5(expected).hexdigest()} {wrote[2]}" in lines, lines
    # The OSS relayed the mount to each guest before its process started there.
    mounted = mount_lines(lab)
    print("\n".join(mounted))
    assert sorted(m.split()[3] for m in mounted) == ["vm1", "vm2"], mounted
    # What the program wrote is in the user's directory, as if it had run here.
    assert (volume / "data.txt").read_bytes() == expected
    assert (volume / "sub" / "writer").read_text() == f"{wrote[2]}\n"


def test_the_working_directory_is_one_namespace_on_both_vms_with_share_cwd(
    lab: Lab, token: str, volume: Path
) -> None:
    status, out, err = finish(
        dcptrace(lab, token, volume, "./rw.sh write .; ./rw.sh read .", in_cwd=True)
    )
    assert status == 0, err[-3000:]
    assert "not shared" not in err, err[-3000:]
    lines = out.splitlines()
    (wrote,) = [line.split() for line in lines if line.startswith("write on ")]
    (read,) = [line.split() for line in lines if line.startswith("read on ")]
    # Each guest saw "." on its own dcpfs mount, the reader what the writer wrote.
    assert {wrote[2], read[2]} == {"vm1", "vm2"}, lines
    assert wrote[3] == read[3] == FUSE_MAGIC, lines
    expected = "".join(f"{i}\n" for i in range(1, 60001)).encode()
    assert f"sum {hashlib.md5(expected).hexdigest()} {wrote[2]}" in lines, lines
    assert (volume / "data.txt").read_bytes() == expected


def test_fsynced_data_survives_the_destruction_of_the_writers_vm(
    lab: Lab, token: str, volume: Path
) -> None:
    assert lab.provider is not None and lab.oss is not None
    writer = dcptrace(lab, token, volume, f"{volume}/rw.sh sync {volume}")
    assert writer.stdout is not None
    ready, _, _ = select.select([writer.stdout], [], [], 180)
    line = writer.stdout.readline().decode() if ready else ""
    if not line.startswith("synced on "):
        status, out, err = finish(writer, 5)
        pytest.fail(f"the writer did not fsync: {line}{out} / {err[-3000:]}")
    victim = line.split()[2]
    survivor = ({"vm1", "vm2"} - {victim}).pop()
    prov = lab.provider

    async def destroy() -> None:  # virsh destroy: the guest is gone at once, no shutdown
        dom = await asyncio.to_thread(prov.conn.lookupByName, prov.config.prefix + victim)
        await asyncio.to_thread(dom.destroy)
        await prov.wait_state(victim, DomainState.GONE, 30)

    lab.loop.run(destroy())
    expected = bytes(range(256)) * 4096
    # The networked tier had it (fsynced) before the VM went.
    assert (volume / "durable.bin").read_bytes() == expected
    # Its process is lost with the VM; the run (dcptrace, its deputies and its storage
    # server: one process group) goes too: only the volume and what it holds are left.
    os.killpg(writer.pid, signal.SIGKILL)
    finish(writer, 30)

    async def failed() -> None:  # the OSS notices: the next run places on the survivor
        async with asyncio.timeout(lab.heartbeat_timeout + 60):
            while ((await lab.oss.instance(victim)) or {}).get("state") != "failed":  # type: ignore[union-attr]
                await asyncio.sleep(0.5)

    lab.loop.run(failed())
    reader = (
        f"for w in $(cat /proc/cmdline); do case $w in dcp.instance=*) echo ${{w#*=}};; esac; "
        f"done; md5sum < {volume}/durable.bin; stat -f -c %t {volume}"
    )
    status, out, err = finish(dcptrace(lab, token, volume, f"/bin/sh -c '{reader}'"))
    assert status == 0, err[-3000:]
    assert out.split() == [survivor, hashlib.md5(expected).hexdigest(), "-", FUSE_MAGIC], out
