"""net.sockdiag against real TCP sockets on loopback: bytes per inode, kept after close."""

from __future__ import annotations

import os
import socket

from net.sockdiag import NetMeter, decode_counters, encode_counters, socket_inodes, tcp_bytes


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
            meter = NetMeter()
            meter.look([os.getpid()])
        rx, tx = meter.totals(os.getpid())
        meter.look([os.getpid()])  # the sockets are gone: their last figures stay
        assert meter.totals(os.getpid()) == (rx, tx) and rx >= 301_000
        assert meter.forget(os.getpid()) == (rx, tx) and meter.totals(os.getpid()) == (0, 0)


def test_counters_codec() -> None:
    c = {12: (5, 6), 7: (0, 1)}
    assert decode_counters(encode_counters(c)) == c
    assert decode_counters(b"1:2:3,bad,4:x:5") == {1: (2, 3)}
