"""Migration of a running program between two local instances (vmagent.checkpoint.migrate).

Real namespaced instances (`LocalCluster`: each agent PID 1 of its own PID
namespace), real deputies, real instance tracers, real CRIU; skipped with the
reason when CRIU or root is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.integration import checkpointing
from tests.integration.checkpointing import agent_call, criu_or_skip, in_order, started
from vmagent.checkpoint.migrate import mint_ticket, scratch
from vmagent.cluster.local import Instance, LocalCluster
from vmagent.exec.remote import TicketDrop, deputy_command, ticket_for_self
from vmagent.exec.session import PID_LOW

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaced instances and CRIU need root")

DROP = TicketDrop()

COUNTER = r"""
import os, socket, sys, time
flag = sys.argv[1]
child = os.fork()  # forked on the instance: its program pid is base + its pid there
if child == 0:
    while True:
        with open(flag + ".child.tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(flag + ".child.tmp", flag + ".child")
        time.sleep(0.01)
i = 0
while i < 600:
    if i == 20:
        with open(flag + ".tmp", "w") as f:
            f.write(str(int(open('/proc/self/stat').read().split()[0])))
        os.rename(flag + ".tmp", flag)
    print(int(open('/proc/self/stat').read().split()[0]), i, socket.gethostname(),
          os.getpid(), flush=True)
    with open(flag + ".host", "w") as f:
        f.write(socket.gethostname())
    i += 1
    time.sleep(0.01)
os.kill(child, 9)
os.waitpid(child, 0)
print("child", child, open(flag + ".child").read())
status = open("/proc/self/status").read()
print("tracer", [l.split()[1] for l in status.splitlines() if l.startswith("TracerPid")][0])
sys.exit(7)
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    criu_or_skip()
    with LocalCluster(2) as c:
        yield c
    DROP.close()


def deputy(inst: Instance, *argv: str) -> list[str]:
    path = os.fsencode(argv[0])
    args = tuple(os.fsencode(a) for a in argv)
    ticket = ticket_for_self(inst.token, inst.name, path, args)
    return deputy_command(DROP, inst.address, inst.name, ticket, path, args)


def call(inst: Instance, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    return agent_call(inst.address, inst.token, method, path, body)


def session_of(inst: Instance, pid: int) -> str:
    return checkpointing.session_of(inst.address, inst.token, pid)


def migrate(source: Instance, target: Instance, sid: str) -> Any:
    ticket = mint_ticket(target.token, target.name, sid)
    body = {"to": target.address, "instance": target.name, "ticket": ticket}
    return call(source, "POST", f"/v1/sessions/{sid}/migrate", body)


def test_a_counter_moves_to_another_instance_and_back_without_gap_or_repeat(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    a, b = cluster.instances
    flag = tmp_path / "flag"
    proc = subprocess.Popen(
        deputy(a, "/usr/bin/python3", "-c", COUNTER, str(flag)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(flag.exists, 60), "the counter never started"
        pid = int(flag.read_text())
        assert pid >= PID_LOW  # drawn from a random region: rarely taken on another instance
        sid = session_of(a, pid)
        there = migrate(a, b, sid)
        assert (there["from"], there["to"], there["pid"]) == (a.name, b.name, pid)
        assert there["freeze_ms"] > 0 and there["zstd_bytes"] > 0
        host = Path(str(flag) + ".host")
        assert wait_for(lambda: host.read_text() == b.hostname, 60), "it never ran there"
        back = migrate(b, a, sid)
        assert (back["from"], back["to"]) == (b.name, a.name)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = out.decode().splitlines()
    assert proc.returncode == 7, err.decode()
    assert lines[-1].startswith("tracer ") and lines[-1] != "tracer 0"
    # The program pids stay as they were (issue 11): the deputy's for the program,
    # the one fork returned for its child, forked on the first instance.
    _word, forked, child_sees = lines[-2].split()
    assert int(forked) > 1 << 22 and child_sees == forked
    rows = [line.split() for line in lines[:-2]]
    assert [int(n) for _p, n, _h, _v in rows] == list(range(600))  # no gap, no repeat
    assert {int(p) for p, _n, _h, _v in rows} == {pid}  # the pid it has never changed
    assert {int(v) for _p, _n, _h, v in rows} == {proc.pid}  # nor the pid it sees
    hosts = [h for _p, _n, h, _v in rows]
    seen = [h for i, h in enumerate(hosts) if i == 0 or hosts[i - 1] != h]
    assert seen == [a.hostname, b.hostname, a.hostname]  # it ran there, then came back


def test_a_commit_without_a_held_migration_is_refused_and_a_forged_ticket_too(
    cluster: LocalCluster,
) -> None:
    _a, b = cluster.instances
    sid = "ab" * 16
    for ticket, message in (
        (mint_ticket(b.token, b.name, sid), "no migration of that session is waiting"),
        (mint_ticket("not-the-token", b.name, sid), "not valid for"),
    ):
        req = urllib.request.Request(
            f"http://{b.address}/v1/migrations/commit",
            data=json.dumps({"session": sid}).encode(),
            method="POST",
            headers={"Authorization": f"DCP-Migrate {ticket}"},
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=60)
        assert info.value.code == 409
        assert message in info.value.read().decode()


def post_round(inst: Instance, ticket: str, sid: str, k: int, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(
        f"http://{inst.address}/v1/migrations/round?session={sid}&round={k}",
        data=body,
        method="POST",
        headers={"Authorization": f"DCP-Migrate {ticket}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_pre_copy_rounds_come_in_order_with_the_session_s_ticket(
    cluster: LocalCluster,
) -> None:
    """The target's checks on pre-copy rounds (the images stream of one empty round)."""
    _a, b = cluster.instances
    sid, other = "cd" * 16, "ef" * 16
    empty = struct.pack(">HQ", 0, 0)  # no image files: the end of the stream
    ticket = mint_ticket(b.token, b.name, sid)
    assert post_round(b, mint_ticket("not-the-token", b.name, sid), sid, 0, empty)[0] == 409
    code, text = post_round(b, ticket, other, 0, empty)
    assert code == 409 and "another session" in text
    code, text = post_round(b, ticket, sid, 1, empty)
    assert code == 409 and "round 1 without round 0" in text
    assert post_round(b, ticket, sid, 0, empty) == (200, '{"round": 0, "bytes": 0, "pages": 0}')
    code, text = post_round(b, ticket, sid, 0, empty)  # again: the order is kept
    assert code == 409 and "out of order" in text
    assert post_round(b, ticket, sid, 1, empty)[0] == 200  # the ticket is not burnt by rounds


def offer_pages(inst: Instance, ticket: str, sid: str, into: str) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://{inst.address}/v1/migrations/pages?session={sid}&into={into}",
        data=b"",
        method="POST",
        headers={"Authorization": f"DCP-Migrate {ticket}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_page_server_takes_only_the_connection_that_brings_its_secret(
    cluster: LocalCluster,
) -> None:
    """The target's page server for a move: offered for the ticket's session only; a
    connection without the secret is closed unanswered, the one with it gets READY."""
    _a, b = cluster.instances
    sid = "ab" * 16
    ticket = mint_ticket(b.token, b.name, sid)
    code, said = offer_pages(b, mint_ticket("not-the-token", b.name, sid), sid, "final")
    assert code == 409 and "not valid" in said
    code, said = offer_pages(b, ticket, "ef" * 16, "final")
    assert code == 409 and "another session" in said
    code, said = offer_pages(b, ticket, sid, "pre3")
    assert code == 409 and "round 0 is next" in said
    code, offer = offer_pages(b, ticket, sid, "final")
    assert code == 200 and set(offer) == {"port", "secret"}, offer
    code, said = offer_pages(b, ticket, sid, "final")
    assert code == 409 and "runs already" in said
    host = b.address.rsplit(":", 1)[0]
    with socket.create_connection((host, offer["port"]), timeout=30) as wrong:
        wrong.sendall(bytes(16))
        assert wrong.recv(1) == b""  # closed: no page server for it
    with socket.create_connection((host, offer["port"]), timeout=30) as right:
        right.sendall(bytes.fromhex(offer["secret"]))
        assert right.recv(1) == b"\x01"  # its criu page-server has it now
    # The ticket was not burnt: the move itself may still come (it is refused here
    # only because the description is empty).
    req = urllib.request.Request(
        f"http://{b.address}/v1/migrations",
        data=struct.pack(">I", 2) + b"{}",
        method="POST",
        headers={"Authorization": f"DCP-Migrate {ticket}"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=60)
    assert info.value.code == 409 and "malformed" in info.value.read().decode()


HOLDER = r"""
import hashlib, os, socket, sys, time
data = bytearray(os.urandom(64 << 20))
print(hashlib.sha256(data).hexdigest(), socket.gethostname(), flush=True)
flag = sys.argv[1]
with open(flag + ".tmp", "w") as f:
    f.write(str(int(open('/proc/self/stat').read().split()[0])))
os.rename(flag + ".tmp", flag)
while not os.path.exists(flag + ".go"):
    time.sleep(0.01)
print(hashlib.sha256(data).hexdigest(), socket.gethostname(), flush=True)
"""


def test_a_python_process_with_64_mb_moves_with_its_checksum(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    a, b = cluster.instances
    flag = tmp_path / "flag"
    proc = subprocess.Popen(
        deputy(a, "/usr/bin/python3", "-c", HOLDER, str(flag)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(flag.exists, 120), "the holder never started"
        done = migrate(a, b, session_of(a, int(flag.read_text())))
        assert done["image_bytes"] > 64 << 20
        # The default path: the pages went through b's page server, not in the packed stream.
        assert done["page_server"] and done["zstd_bytes"] < 8 << 20, done
        Path(str(flag) + ".go").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    (before, host_before), (after, host_after) = (
        line.split() for line in out.decode().splitlines()
    )
    assert before == after
    assert (host_before, host_after) == (a.hostname, b.hostname)


# A TCP server and its client in one program, the connection established inside the
# instance's network namespace (on its loopback): the client sends "i" and prints
# the server's answer with the host it runs on, until the file `flag.go`; exits 5.
TCP = r"""
import os, socket, sys, threading, time
flag = sys.argv[1]
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
cli = socket.create_connection(srv.getsockname())
conn, _ = srv.accept()
def serve():
    for line in conn.makefile("rb"):
        conn.sendall(b"served " + line)
threading.Thread(target=serve, daemon=True).start()
answers = cli.makefile("rb")
i = 0
while not os.path.exists(flag + ".go"):
    if i == 20:
        with open(flag + ".tmp", "w") as f:
            f.write(str(int(open("/proc/self/stat").read().split()[0])))
        os.rename(flag + ".tmp", flag)
    cli.sendall(b"%d\n" % i)
    print(answers.readline().decode().strip(), socket.gethostname(), flush=True)
    i += 1
    time.sleep(0.01)
sys.exit(5)
"""


def test_an_established_tcp_connection_moves_with_its_program(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """CRIU's --tcp-established between instances: the connection is inside the program's
    instance (its loopback), so both ends move and the stream goes on, no reset."""
    a, b = cluster.instances
    flag = tmp_path / "flag"
    with started(deputy(a, "/usr/bin/python3", "-c", TCP, str(flag))) as proc:
        assert wait_for(flag.exists, 120), "the program never started"
        done = migrate(a, b, session_of(a, int(flag.read_text())))
        assert (done["from"], done["to"]) == (a.name, b.name)
        time.sleep(0.5)  # some more requests on the moved connection (not asserted on)
        Path(str(flag) + ".go").touch()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err.decode()
    rows = [line.split() for line in out.decode().splitlines()]
    assert {r[0] for r in rows} == {"served"} and in_order([int(r[1]) for r in rows])
    hosts = [r[2] for r in rows]
    assert hosts[0] == a.hostname and hosts[-1] == b.hostname, hosts


BALLAST = COUNTER.replace("i = 0\n", "ballast = bytearray(os.urandom(256 << 20))\ni = 0\n", 1)


def test_a_failed_migration_leaves_the_program_running_on_the_source_once(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """The target is killed while it receives the images (this test runs last: b dies)."""
    a, b = cluster.instances
    flag = tmp_path / "flag"
    proc = subprocess.Popen(
        deputy(a, "/usr/bin/python3", "-c", BALLAST, str(flag)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    where = Path(scratch() or tempfile.gettempdir())
    pattern = f"dcp-mig-{b.name}-*-restore-*"
    before = set(where.glob(pattern))
    try:
        assert wait_for(flag.exists, 120), "the counter never started"
        sid = session_of(a, int(flag.read_text()))
        outcome: list[BaseException | Any] = []

        def attempt() -> None:
            try:
                outcome.append(migrate(a, b, sid))
            except BaseException as exc:
                outcome.append(exc)

        mover = threading.Thread(target=attempt)
        mover.start()
        receiving = wait_for(lambda: bool(set(where.glob(pattern)) - before), 120)
        cluster.kill(b.name)
        mover.join(timeout=300)
        assert receiving, "the target never started receiving"
        assert len(outcome) == 1 and isinstance(outcome[0], urllib.error.HTTPError)
        assert outcome[0].code == 409 and b.address in outcome[0].msg
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for left in set(where.glob(pattern)) - before:  # the killed target's scratch
            shutil.rmtree(left, ignore_errors=True)
    lines = out.decode().splitlines()
    assert proc.returncode == 7, err.decode()
    rows = [line.split() for line in lines[:-2]]
    assert [int(n) for _p, n, _h, _v in rows] == list(range(600))  # ran once: no repeat
    assert {h for _p, _n, h, _v in rows} == {a.hostname}
