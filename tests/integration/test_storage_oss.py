"""`dcptrace --oss URL --volume DIR` (issue 14): the OSS relays the run's storage.

A real `dcp-oss serve`, two real loopback agents and real dcptrace: the run's
owner holds no instance token, so the OSS hands each instance a process is
placed on the mount order (heartbeat command), waits for the agent's outcome,
and orders the unmount at the end.  The VM variants are in test_storage_vm.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import dcptrace_argv, traced_env, wait_for
from tests.integration.test_dcptrace_oss import Lab, _cli, dcptrace, newest_program, start_lab

pytestmark = [pytest.mark.usefixtures("has_ptrace"), pytest.mark.root, pytest.mark.slow]

# Who runs me (my parent on an instance is its agent) and what file system DIR is on.
RW = """#!/bin/sh
read _ _ _ pp _ < /proc/self/stat
where=$(tr '\\0' ' ' < /proc/$pp/cmdline | sed -n 's/.*--instance \\([^ ]*\\).*/\\1/p')
case "$1" in
  write) seq 1 40000 > "$2/data.txt"; mkdir -p "$2/sub"
         echo "from ${where:-home}" > "$2/sub/note" ;;
  read) echo "sum $(md5sum < "$2/data.txt" | cut -d' ' -f1) $(cat "$2/sub/note")" ;;
esac
echo "$1 on ${where:-home} $(stat -f -c %t "$2")"
"""
TIERS = Path("/var/tmp/dcp-tiers")  # vmagent.storage.mounts.DISK_ROOT
FUSE_MAGIC = "65735546"  # statfs f_type of a FUSE file system (`stat -f -c %t`)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("agents mount FUSE and tmpfs: root")
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse on this host")
    lab = Lab(tmp_path_factory.mktemp("oss-storage"))
    try:
        start_lab(lab, "127.0.0.1", {n: ("127.0.0.1:0", "") for n in ("n0", "n1")})
        (lab.data / "rw.sh").write_text(RW)
        (lab.data / "rw.sh").chmod(0o755)
        yield lab
    finally:
        lab.stop()


def test_files_written_on_one_instance_are_read_whole_on_the_other(lab: Lab) -> None:
    vol = lab.data / "vol"
    vol.mkdir()
    rw = lab.data / "rw.sh"
    script = f"{rw} write {vol} && {rw} read {vol}"
    before = set(TIERS.glob("*"))
    res = dcptrace(lab, lab.url, "sh", "-c", script, token=lab.token, volume=str(vol))
    err = res.stderr.decode()
    assert res.returncode == 0, err
    assert "Traceback" not in err and "WARNING" not in err, err
    lines = res.stdout.decode().splitlines()
    # Each process ran on an instance, with DIR on that instance's dcpfs mount.
    (wrote,) = [line.split() for line in lines if line.startswith("write on ")]
    (read,) = [line.split() for line in lines if line.startswith("read on ")]
    assert wrote[2] != read[2] and {wrote[2], read[2]} == {"n0", "n1"}, lines
    assert wrote[3] == read[3] == FUSE_MAGIC, lines
    # The reader saw the writer's bytes; they are in the user's directory, whole.
    expected = "".join(f"{i}\n" for i in range(1, 40001)).encode()
    assert (vol / "data.txt").read_bytes() == expected
    assert (vol / "sub" / "note").read_text() == f"from {wrote[2]}\n"
    want = hashlib.md5(expected).hexdigest()
    assert f"sum {want} from {wrote[2]}" in lines, lines
    # The OSS unmounted it everywhere at the end: no dcpfs mount left on this host.
    assert "dcpfs-" not in Path("/proc/self/mountinfo").read_text()
    # ... and left nothing on the instances' disks (these instances share this one).
    assert [p for p in set(TIERS.glob("*")) - before if list(p.glob("dcpfs-n?.log"))] == []
    # The measured GiB-seconds per tier are in the OSS's ledger, charged to the program.
    prog = newest_program(lab)
    records = lab.get(f"/v1/programs/{prog['id']}/billing")["records"]
    (billed,) = [r for r in records if r["storage_gib_seconds"]]
    assert billed["storage_gib_seconds"]["net"] > 0, billed
    assert billed["amount_micros"] >= 1 and billed["storage_micros"] == billed["amount_micros"]


def test_execs_placed_from_an_instance_spread_once_the_other_has_mounted(lab: Lab) -> None:
    """A placed sh's own execs are placed by its agent through the OSS; the program has
    storage, so only where it is mounted.  The other instance, chosen for one of them
    but not mounted yet, starts mounting then (that exec runs beside the sh); once it
    has, the sh's next exec goes there and reads the writer's bytes through its dcpfs."""
    vol = lab.data / "vol3"
    vol.mkdir()
    rw, go = lab.data / "rw.sh", lab.data / "vol3-go"
    # The placed sh writes (an exec of its own), waits for the test's word, then reads.
    inner = f"{rw} write {vol}; while [ ! -e {go} ]; do sleep 0.2; done; {rw} read {vol}"
    env = traced_env({"DCP_TOKEN": lab.token})
    options = ("--no-state", "--oss", lab.url, "--placement", "spread", "--volume", str(vol))
    argv = [*dcptrace_argv(*options, "--no-share-cwd"), "--", "sh", "-c", f"/bin/sh -c '{inner}'"]
    run = subprocess.Popen(argv, cwd=lab.data, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
    try:

        def soon_mounted() -> bool:
            running = [p for p in lab.get("/v1/programs")[:1] if p["state"] == "running"]
            if not running:
                return False
            log = lab.get(f"/v1/programs/{running[0]['id']}/logs")["lines"]
            return any(ln["text"].endswith("(for execs placed from instances)") for ln in log)

        assert wait_for(soon_mounted, 60), "no instance mounted for execs placed from one"
        go.touch()
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    prog = newest_program(lab)["id"]
    log = [ln["text"] for ln in lab.get(f"/v1/programs/{prog}/logs")["lines"]]
    soon = [t.split()[3] for t in log if t.endswith("(for execs placed from instances)")]
    (wrote,) = [line.split() for line in lines if line.startswith("write on ")]
    (read,) = [line.split() for line in lines if line.startswith("read on ")]
    # The writer ran beside the placed sh, its child ("home": no agent is its parent);
    # the reader was placed from the sh's instance on the one that mounted meanwhile.
    assert wrote[2] == "home" and wrote[3] == FUSE_MAGIC, lines
    assert soon == [read[2]] and read[3] == FUSE_MAGIC, (lines, log)
    want = hashlib.md5("".join(f"{i}\n" for i in range(1, 40001)).encode()).hexdigest()
    assert f"sum {want} from home" in lines, lines
    assert "dcpfs-" not in Path("/proc/self/mountinfo").read_text()


def test_a_volume_under_oss_needs_no_root_here_but_a_directory(lab: Lab) -> None:
    res = dcptrace(lab, lab.url, "true", token=lab.token, volume=str(lab.data / "missing"))
    err = res.stderr.decode().strip()
    assert res.returncode != 0 and "is not a directory" in err, err
    assert "Traceback" not in err


def _call(lab: Lab, method: str, path: str, body: dict[str, object], token: str) -> int:
    req = urllib.request.Request(
        lab.url + path, data=json.dumps(body).encode(), method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_only_the_owner_gives_storage_and_only_where_its_program_is_placed(lab: Lab) -> None:
    """The run's key goes to instances a process of the program is placed on, by the
    program's own account: another account cannot plant a spec (its own server) on a
    program, and a program with no process on an instance gets no mount there."""
    vol = lab.data / "vol2"
    vol.mkdir()
    res = dcptrace(lab, lab.url, f"{lab.data}/rw.sh", "write", str(vol), token=lab.token,
                   volume=str(vol))  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    prog = newest_program(lab)["id"]
    spec = {"name": "planted", "server": "127.0.0.1:1", "key": "k" * 43,
            "host_key": "ssh-ed25519 AAAA", "volumes": 1}  # fmt: skip
    other = _cli("account", "create", "--data", str(lab.data), "mallory")
    path = f"/v1/programs/{prog}/storage"
    assert _call(lab, "PUT", path, spec, other) == 404
    assert _call(lab, "POST", path + "/mounts", {"instance": "n0"}, other) == 404
    assert _call(lab, "POST", path + "/usage", {"gib_seconds": {"net": 1e9}}, other) == 404
    # The owner: the program ended, so it is placed nowhere: no instance mounts for it.
    assert _call(lab, "PUT", path, spec, lab.token) == 200
    assert _call(lab, "POST", path + "/mounts", {"instance": "n0"}, lab.token) == 404
    assert "dcpfs-planted" not in Path("/proc/self/mountinfo").read_text()
    # An instance token cannot use the account's routes.
    token_n0 = _cli("instance-token", "--data", str(lab.data), "n9")
    assert _call(lab, "PUT", path, spec, token_n0) in (401, 403)


def test_a_restarted_oss_keeps_serving_the_programs_storage(tmp_path: Path) -> None:
    """Issue 14: the spec and the mounts outlive the OSS process.  The writer is placed
    (its instance mounts through the first OSS); the OSS is restarted on the same
    port and data while the program waits; then two readers at once are placed (at
    least one on the instance that has not mounted yet: the restarted OSS must
    relay that mount from its store), and the unmounts at the end reach both."""
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        pytest.skip("agents mount FUSE and tmpfs: root and /dev/fuse")
    lab = Lab(tmp_path / "lab")
    lab.data.mkdir(mode=0o700)
    try:
        start_lab(lab, "127.0.0.1", {n: ("127.0.0.1:0", "") for n in ("n0", "n1")})
        rw = lab.data / "rw.sh"
        rw.write_text(RW)
        rw.chmod(0o755)
        vol = lab.data / "vol"
        vol.mkdir()
        fifo = tmp_path / "go"
        os.mkfifo(fifo)
        # `read` is the home shell's builtin: nothing is placed while the OSS restarts.
        both = f"{{ {rw} read {vol} & {rw} read {vol}; wait; }}"
        script = f"{rw} write {vol} && read _ < {fifo} && {both}"
        env = traced_env({"DCP_TOKEN": lab.token})
        options = ("--no-state", "--oss", lab.url, "--placement", "spread", "--volume", str(vol))
        argv = [*dcptrace_argv(*options, "--no-share-cwd"), "--", "sh", "-c", script]
        run = subprocess.Popen(argv, cwd=lab.data, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
        try:
            assert wait_for(lambda: (vol / "sub" / "note").exists(), 60), "the writer never ran"
            serve = lab.procs[0]
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=20)
            port = lab.url.rpartition(":")[2]
            _proc, line = lab.start(
                "oss", "serve", "--listen", f"127.0.0.1:{port}", "--data", str(lab.data),
                "--heartbeat-interval", "0.5", "--tick", "0.5",
            )  # fmt: skip
            assert "listening on " in line, line

            def ready() -> bool:
                got = lab.get("/v1/instances", lab.admin)
                return sorted(i["name"] for i in got if i["state"] == "ready") == ["n0", "n1"]

            assert wait_for(ready, 60), "the agents did not come back"
            with open(fifo, "w") as f:
                f.write("go\n")
            out, err = run.communicate(timeout=180)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        text = err.decode()
        assert run.returncode == 0, text
        assert "Traceback" not in text and "not mounted" not in text, text
        # Before the restart the home asked only the writer's instance to mount (the
        # other one may have started mounting for the writer's own execs: `mount_soon`);
        # after it, the restarted OSS relayed the readers' mounts from the spec it read
        # back from its store.
        prog = newest_program(lab)["id"]
        log = [ln["text"] for ln in lab.get(f"/v1/programs/{prog}/logs")["lines"]]
        asked = [t for t in log if t.startswith("storage mounted on ")]
        mounted = sorted(t.split()[3] for t in asked if "for execs placed from" not in t)
        assert mounted == ["n0", "n1"], log
        # What the readers printed (processes the restarted OSS's recovery may end are
        # its business, not storage's): each read the writer's bytes, through dcpfs.
        lines = out.decode().splitlines()
        writer = [line.split()[2] for line in lines if line.startswith("write on ")]
        reads = [line.split() for line in lines if line.startswith("read on ")]
        assert all(r[3] == FUSE_MAGIC for r in reads), lines
        want = hashlib.md5("".join(f"{i}\n" for i in range(1, 40001)).encode()).hexdigest()
        sums = [line for line in lines if line.startswith("sum ")]
        assert all(line == f"sum {want} from {writer[0]}" for line in sums), lines
        # The restarted OSS ordered every unmount, the pre-restart mount included.
        assert "dcpfs-" not in Path("/proc/self/mountinfo").read_text()
    finally:
        lab.stop()
