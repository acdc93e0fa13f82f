"""The instance tracer's lock forwarding (vmagent.trace.filelocks) and its records."""

from __future__ import annotations

import errno
import os
import socket

from tracer.coordinator import Allow, Complete, Defer, SyscallCall
from vmagent.exec import filelocks as L
from vmagent.exec import protocol as P
from vmagent.trace.filelocks import LockForwarder, SignalState, interrupts

ADDR = 0x7000
FLOCK = b"\x01\x00\x00\x00" + bytes(28)  # F_WRLCK, SEEK_SET, whole file


def call(name: str, args: tuple[int, ...], pid: int = 40, tid: int = 41) -> SyscallCall:
    nr = {"flock": 73, "fcntl": 72}[name]
    return SyscallCall(pid, tid, nr, name, (*args, 0, 0, 0, 0)[:6])


class Fake:
    """The agent side: the lock socket's other end, a memory and signal state to read."""

    def __init__(self, reachable: bool = True) -> None:
        self.reachable = reachable
        self.state: SignalState | None = SignalState(0, 0, 0, 0)
        self.agent: socket.socket | None = None
        self._sent: list[dict[bytes, bytes]] = []

    def hand_over(self, message: bytes, fds: tuple[int, ...]) -> bool:
        assert P.pairs(message)[b"op"] == L.OP_LOCKCHAN and len(fds) == 1
        if self.reachable:
            self.agent = socket.socket(fileno=os.dup(fds[0]))
            self.agent.setblocking(False)
        return self.reachable

    @property
    def sent(self) -> list[dict[bytes, bytes]]:
        while self.agent is not None:
            try:
                self._sent.append(P.pairs(self.agent.recv(1 << 16)))
            except BlockingIOError:
                break
        return self._sent

    def reply(self, record: bytes) -> None:
        assert self.agent is not None
        self.agent.send(record)

    def read(self, pid: int, addr: int, size: int) -> bytes:
        assert addr == ADDR
        return FLOCK[:size]

    def signals(self, tid: int) -> SignalState | None:
        return self.state


def forwarder(fake: Fake) -> LockForwarder:
    # No answer window: every call is deferred, answers are read by `drain`.
    return LockForwarder(fake.hand_over, fake.read, fake.signals, window=0.0)


def test_flock_is_sent_to_the_agent_and_deferred() -> None:
    fake = Fake()
    fw = forwarder(fake)
    assert fw.on_call(call("flock", (9, 2))) == Defer()  # LOCK_EX
    (sent,) = fake.sent
    assert sent[b"op"] == L.OP_LOCK and sent[b"fd"] == b"9" and sent[b"arg"] == b"2"
    assert fw.blocked()
    fake.reply(L.locked_record(sent[b"req"], b"0", b""))
    fw.drain()
    assert fw.take_ready() == [(41, Complete(0))]
    assert not fw.waiting


def test_an_answer_within_the_window_completes_the_call_at_once() -> None:
    fake = Fake()
    fw = LockForwarder(fake.hand_over, fake.read, fake.signals, window=0.0)
    fw.on_call(call("flock", (9, 6)))  # opens the socket; deferred
    fw.window = 5.0
    fake.reply(L.locked_record(b"2", b"-11", b""))  # the next request's answer, early
    assert fw.on_call(call("flock", (9, 6))) == Complete(-11)  # LOCK_EX|LOCK_NB: EAGAIN


def test_other_fcntl_commands_run_untouched() -> None:
    fake = Fake()
    assert forwarder(fake).on_call(call("fcntl", (3, 1))) == Allow()  # F_GETFD
    assert fake.sent == []


def test_getlk_writes_the_deputys_answer_back() -> None:
    fake = Fake()
    fw = forwarder(fake)
    assert fw.on_call(call("fcntl", (9, L.F_GETLK, ADDR))) == Defer()
    (sent,) = fake.sent
    assert sent[b"arg"] == FLOCK and not fw.blocked()  # F_GETLK never waits
    holder = b"\x01\x00" + bytes(22) + (4242).to_bytes(4, "little") + bytes(4)
    got = fw.answer({b"op": L.OP_LOCKED, b"req": sent[b"req"], b"result": b"0", b"data": holder})
    assert got == (41, Complete(0, ((ADDR, holder),)))


def test_a_descriptor_of_the_instance_runs_natively() -> None:
    fake = Fake()
    fw = forwarder(fake)
    fw.on_call(call("fcntl", (5, L.F_SETLKW, ADDR)))
    req = fake.sent[0][b"req"]
    assert fw.answer({b"op": L.OP_NATIVE, b"req": req}) == (41, Allow())


def test_no_agent_means_the_kernel_decides() -> None:
    fake = Fake(reachable=False)
    fw = forwarder(fake)
    assert fw.on_call(call("flock", (9, 2))) == Allow() and not fw.waiting


def test_a_caught_signal_interrupts_a_blocked_wait_and_cancels_it() -> None:
    fake = Fake()
    fw = forwarder(fake)
    fw.on_call(call("flock", (9, 2)))
    req = fake.sent[0][b"req"]
    assert fw.interrupting() == []  # nothing pending
    usr1 = 1 << (10 - 1)
    fake.state = SignalState(usr1, 0, 0, usr1)
    assert fw.interrupting() == [(41, Complete(-errno.EINTR))]
    assert fake.sent[-1] == {b"op": L.OP_LOCK, b"req": req, b"call": L.CANCEL}
    # The deputy's late answer finds nobody waiting.
    assert fw.answer({b"op": L.OP_LOCKED, b"req": req, b"result": b"0"}) is None


def test_which_signals_interrupt() -> None:
    chld, usr1, term, stop = (1 << (n - 1) for n in (17, 10, 15, 19))
    assert not interrupts(SignalState(chld, 0, 0, 0))  # default-ignored, not caught
    assert interrupts(SignalState(chld, 0, 0, chld))  # caught
    assert interrupts(SignalState(term, 0, 0, 0))  # kills: the wait ends
    assert not interrupts(SignalState(usr1, usr1, 0, usr1))  # blocked
    assert not interrupts(SignalState(usr1, 0, usr1, 0))  # ignored
    assert not interrupts(SignalState(stop, 0, 0, 0))  # stops, then the wait resumes


def test_a_process_that_ends_gives_its_requests_up() -> None:
    fake = Fake()
    fw = forwarder(fake)
    fw.on_call(call("flock", (9, 2), pid=40, tid=41))
    fw.on_call(call("flock", (9, 2), pid=50, tid=50))
    fw.gone(40)
    assert [w.call.pid for w in fw.waiting.values()] == [50]
    assert fake.sent[-1][b"call"] == L.CANCEL


def test_blocking_calls() -> None:
    assert L.blocking("flock", 0, 2) and not L.blocking("flock", 0, 2 | L.LOCK_NB)
    assert L.blocking("fcntl", L.F_SETLKW, 0) and L.blocking("fcntl", L.F_OFD_SETLKW, 0)
    assert not L.blocking("fcntl", L.F_SETLK, 0) and not L.blocking("fcntl", L.F_GETLK, 0)


def test_the_deputy_gets_only_what_it_needs() -> None:
    record = P.pairs(L.lock_record(3, 40, 9, "fcntl", L.F_SETLK, FLOCK))
    assert P.pairs(L.deputy_request(record)) == {
        b"req": b"3",
        b"call": b"fcntl",
        b"cmd": b"6",
        b"arg": FLOCK,
    }


def test_a_native_getlk_names_the_holder_in_the_programs_pids() -> None:
    fake = Fake()
    fw = forwarder(fake)
    c = call("fcntl", (5, L.F_GETLK, ADDR))
    fw.on_call(c)
    req = fake.sent[0][b"req"]
    fake.reply(L.native_record(req))
    fw.drain()
    assert fw.take_ready() == [(41, Allow(observe_result=True))]
    held = b"\x01\x00" + bytes(22) + (77).to_bytes(4, "little") + bytes(4)
    fw._read = lambda pid, addr, size: held  # type: ignore[method-assign]
    got = fw.getlk_result(c, 0, lambda real: real + 1000)
    assert got == Complete(0, ((ADDR, held[:24] + (1077).to_bytes(4, "little") + bytes(4)),))
    assert fw.getlk_result(c, 0, lambda real: real) is None  # not one of ours: as it is
