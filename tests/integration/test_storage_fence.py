"""Fencing at the storage server (issue 12: never twice).

An instance declared lost may still run a copy of the program (frozen, or cut
off from the OSS) while another copy is restored elsewhere from a checkpoint.
The run's storage server is told (`fence INSTANCE` on its order pipe, or
`StorageServer.fence`): the instance's open connections are closed at once and
its logins refused from then on, so the old copy writes nothing more into the
program's files; other instances are untouched.  A real server (asyncssh) and
real SFTP clients.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

from oss.storage.server import StorageConfig, StorageServer
from tests.conftest import wait_for

KEY = "f" * 43


Session = tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]


async def _session(address: str, user: str) -> Session:
    host, _, port = address.rpartition(":")
    conn = await asyncssh.connect(
        host, int(port), username=user, password=KEY, known_hosts=None, client_keys=None,
        agent_path=None, config=None, preferred_auth="password",
    )  # fmt: skip
    return conn, await conn.start_sftp_client()


async def _write(sftp: asyncssh.SFTPClient, name: str, data: bytes) -> None:
    async with sftp.open(f"/v0/{name}", "wb") as f:
        await f.write(data)


def test_a_fenced_instance_is_cut_off_and_refused_the_others_write_on(tmp_path: Path) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    server = StorageServer(StorageConfig("fence", (str(volume),), tmp_path / "state", KEY))
    address = server.start("127.0.0.1:0")

    async def go() -> None:
        lost, lost_sftp = await _session(address, "dcp@node0")
        other, other_sftp = await _session(address, "dcp@node1")
        await _write(lost_sftp, "at", b"1")
        server.fence("node0")
        with pytest.raises((asyncssh.Error, OSError, EOFError)):
            async with asyncio.timeout(10):
                await _write(lost_sftp, "at", b"22")  # the old copy's next write
        with pytest.raises(asyncssh.PermissionDenied):
            await _session(address, "dcp@node0")
        await _write(other_sftp, "at", b"333")  # the restored copy's
        for c in (lost, other):
            c.close()

    try:
        asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        server.stop()
    assert (volume / "at").read_bytes() == b"333"


def test_the_order_pipe_fences_and_a_bad_order_is_ignored(tmp_path: Path) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    config = {"name": "fence", "volumes": [str(volume)], "state_dir": str(tmp_path / "state"),
              "key": KEY, "address": "127.0.0.1:0"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "oss.storage.server"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.flush()
        address = json.loads(proc.stdout.readline())["address"]
        proc.stdin.write(b"fence ../etc\nnonsense\nfence node0\n")
        proc.stdin.flush()

        async def refused(user: str) -> bool:
            try:
                conn, _ = await _session(address, user)
            except asyncssh.PermissionDenied:
                return True
            conn.close()
            return False

        assert wait_for(lambda: asyncio.run(refused("dcp@node0")), 10)
        assert not asyncio.run(refused("dcp@node1"))
        assert not asyncio.run(refused("dcp"))  # a client that names no instance
    finally:
        proc.stdin.close()
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else b""
