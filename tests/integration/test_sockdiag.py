"""net.sockdiag against real TCP sockets on loopback: bytes per inode, kept after close."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from net.sockdiag import NetMeter, held_counters, socket_inodes, tcp_bytes


def test_tcp_bytes_of_a_process_are_kept_after_its_socket_closed() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    with srv:
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
        with c, s:
            c.sendall(b"x" * 300_000)
            got = 0
            while got < 300_000:
                got += len(s.recv(1 << 16))
            s.sendall(b"y" * 1000)
            assert c.recv(1000, socket.MSG_WAITALL) == b"y" * 1000
            ci, si = os.fstat(c.fileno()).st_ino, os.fstat(s.fileno()).st_ino
            assert {ci, si} <= socket_inodes(os.getpid())
            counters = tcp_bytes({ci, si})
            assert counters[si] == (300_000, 1000)
            assert counters[ci][0] == 1000 and counters[ci][1] in (300_000, 300_001)  # + SYN
            held = held_counters(os.getpid())
            assert held["net_rx"] >= 301_000 and held["net_tx"] >= 301_000
            meter = NetMeter()
            meter.look([os.getpid()])
        rx, tx = meter.totals(os.getpid())
        meter.look([os.getpid()])  # the sockets are gone: their last figures stay, closed
        assert meter.totals(os.getpid()) == (rx, tx) and rx >= 301_000
        # At the end the closed sockets add to what the exit stop read of the held ones.
        assert meter.final(os.getpid(), (5, 7)) == (rx + 5, tx + 7)
        assert meter.totals(os.getpid()) == (0, 0)
        meter.look([os.getpid()])  # an ended pid is not brought back by a late look
        assert meter.totals(os.getpid()) == (0, 0)


def test_storage_walk_counts_blocks_once_and_gives_up_past_its_cap(tmp_path: Path) -> None:
    from vmagent.telemetry.sampler import storage_kb

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(os.urandom(256 << 10))
    os.link(tmp_path / "d" / "a", tmp_path / "b")  # the same file twice
    got = storage_kb([str(tmp_path)])
    assert got is not None and 256 <= got <= 256 + 64  # + directory blocks
    assert storage_kb([str(tmp_path)], cap=2) is None
