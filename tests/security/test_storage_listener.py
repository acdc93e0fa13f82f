"""Attack: an unauthenticated peer at the storage server (the networked tier's listener).

The server (oss.storage.server) is reached on a unix socket by local instances
and over TCP by VMs.  The attacker (`nobody`) cannot connect to the socket at
all (0600, the run's owner); at the TCP port it cannot make the server buffer
(a flood before authentication is cut off: SSH reads a bounded version line
first) or hold a connection open (the login timeout closes it).  Someone with
an SSH client but not the run's key gets nothing, and an authenticated client
cannot leave the program's volumes.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from attack import as_nobody, require_attacker

from oss.storage.server import StorageConfig, StorageServer

pytestmark = pytest.mark.security

KEY = "k" * 43

CONNECT_UNIX = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print("connected")
except PermissionError:
    print("refused")
"""

FLOOD = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
sent = 0
try:
    while sent < 64 << 20:
        sent += s.send(b"SSH-2.0-" + b"A" * 65536)
    print("accepted", sent)
except OSError:
    print("closed", sent)
"""

IDLE = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
start = time.monotonic()
try:
    while s.recv(4096):
        pass
    print("closed")
except OSError:
    print("closed")
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[StorageServer]:
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "f").write_text("data\n")
    srv = StorageServer(
        StorageConfig("sec", (str(volume),), tmp_path / "state", KEY, login_timeout=2.0)
    )
    yield srv
    srv.stop()


def test_nobody_cannot_reach_the_unix_socket(server: StorageServer) -> None:
    require_attacker()
    # A directory anyone may enter: the socket's own mode must refuse.
    where = Path(tempfile.mkdtemp(prefix="dcp-storage-sec-", dir="/tmp"))
    try:
        where.chmod(0o755)
        address = server.start(f"unix:{where}/storage.sock")
        res = as_nobody(CONNECT_UNIX, address[5:])
        assert res.stdout.strip() == "refused", res.stderr
    finally:
        server.stop()
        shutil.rmtree(where, ignore_errors=True)


def test_a_flood_before_authentication_is_cut_off(server: StorageServer) -> None:
    require_attacker()
    host, port = server.start("127.0.0.1:0").rsplit(":", 1)
    res = as_nobody(FLOOD, host, port)
    verdict, sent = res.stdout.split()
    assert verdict == "closed", res.stderr  # never 64 MiB buffered for a stranger
    assert int(sent) < 16 << 20
    assert _list(host, int(port), KEY) == ["f"]  # and the server still serves its clients


def test_an_idle_stranger_is_disconnected(server: StorageServer) -> None:
    require_attacker()
    host, port = server.start("127.0.0.1:0").rsplit(":", 1)
    assert as_nobody(IDLE, host, port, timeout=30).stdout.strip() == "closed"


def test_without_the_key_nothing_and_with_it_nothing_outside(server: StorageServer) -> None:
    host, port = server.start("127.0.0.1:0").rsplit(":", 1)
    with pytest.raises(asyncssh.PermissionDenied):
        _list(host, int(port), "wrong" * 8)
    for outside in ("/v0/../../../etc", "/etc", "/v1", "/.dcp/../../etc"):
        with pytest.raises(asyncssh.SFTPError):
            _list(host, int(port), KEY, outside)


def _list(host: str, port: int, key: str, path: str = "/v0") -> list[str]:
    async def go() -> list[str]:
        async with asyncssh.connect(
            host, port, username="dcp", password=key, known_hosts=None, client_keys=None,
            agent_path=None, config=None, preferred_auth="password",
        ) as conn:  # fmt: skip
            async with conn.start_sftp_client() as sftp:
                return sorted(n for n in await sftp.listdir(path) if n not in (".", ".."))

    return asyncio.run(asyncio.wait_for(go(), 30))
