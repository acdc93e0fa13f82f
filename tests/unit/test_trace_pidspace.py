"""The program's pids on an instance (issue 11 item 7): the pure mapping and the calls."""

from __future__ import annotations

import errno

from tracer.arch import table_for
from tracer.coordinator import Allow, Complete, ProcessSpawned, Rewrite, SyscallCall
from tracer.syscalls import by_name
from vmagent.trace.host import coordinator_for
from vmagent.trace.pidspace import INSTANCE_SLOTS, PID_MAX_LIMIT, PidSpace, base_for
from vmagent.trace.placing import InstanceCoordinator

TABLE = table_for("x86_64")
NR = by_name(TABLE)


def test_bases_keep_instances_apart_and_above_every_home_pid() -> None:
    assert base_for("node0") == PID_MAX_LIMIT
    assert base_for("node2") == 3 * PID_MAX_LIMIT
    assert base_for("n1") != base_for("n0")
    for name in ("node510", "node511", "some-vm", "x" * 40):
        assert PID_MAX_LIMIT <= base_for(name) and base_for(name) + PID_MAX_LIMIT - 1 < 2**31


def test_the_root_is_its_deputy_and_forked_processes_get_the_instance_s_numbers() -> None:
    space = PidSpace()
    assert space.program(5) == 5 and space.real(12345) == 12345  # unbound: as they are
    space.bind("node1", 5, 31337, 31000)
    base = 2 * PID_MAX_LIMIT
    assert space.program(5) == 31337 and space.real(31337) == 5
    assert space.program(9) == base + 9 and space.real(base + 9) == 9
    assert space.real(31000) is None  # the deputy's parent is at home, not here
    assert space.real(PID_MAX_LIMIT + 9) is None  # node0's numbers
    assert space.parent(5, 1, ours=False) == 31000
    assert space.parent(9, 5, ours=True) == 31337
    assert space.parent(11, 9, ours=True) == base + 9
    assert space.parent(11, 1, ours=False) == 1  # an orphan


def call(name: str, *args: int, pid: int = 5, tid: int = 5) -> SyscallCall:
    regs = (*args, *(0,) * (6 - len(args)))
    return SyscallCall(pid, tid, NR[name].nr, name, regs)


def bound() -> InstanceCoordinator:
    coordinator = coordinator_for(TABLE, (), lambda _m: None)
    coordinator.bind_pids("node0", 5, 31337, 31000)
    coordinator.on_process(ProcessSpawned(9, 5, False))
    return coordinator


def test_calls_answer_and_take_the_program_s_pids() -> None:
    c = bound()
    base = PID_MAX_LIMIT
    assert c.on_syscall(call("getpid")) == Complete(31337)
    assert c.on_syscall(call("gettid", pid=9, tid=9)) == Complete(base + 9)
    # kill of the root by its program pid, of a forked child by its number
    assert c.on_syscall(call("kill", 31337, 15)) == Rewrite({0: 5})
    assert c.on_syscall(call("kill", base + 9, 15)) == Rewrite({0: 9})
    assert c.on_syscall(call("kill", -31337 & (2**64 - 1), 15)) == Rewrite({0: -5})
    assert c.on_syscall(call("kill", 0, 15)) == Allow()
    # glibc's own thread ids are real: they pass
    assert c.on_syscall(call("tgkill", 31337, 5, 10)) == Rewrite({0: 5})
    # not a process of this instance: as if gone, never a local namesake
    assert c.on_syscall(call("kill", 31000, 15)) == Complete(-errno.ESRCH)
    assert c.on_syscall(call("wait4", 31000)) == Complete(-errno.ECHILD)
    fork = call("fork")
    assert c.on_syscall(fork) == Allow(observe_result=True)
    assert c.on_result(fork, 9, None) == Complete(base + 9)
    assert c.on_result(fork, -errno.EAGAIN & (2**64 - 1), None) is None


def test_an_unbound_session_keeps_the_instance_s_pids() -> None:
    c = coordinator_for(TABLE, (), lambda _m: None)
    assert c.on_syscall(call("getpid")) == Allow()
    assert c.on_syscall(call("kill", 31000, 15)) == Allow()


def test_a_tree_moved_here_keeps_the_base_it_was_numbered_with() -> None:
    moved = PidSpace()
    moved.bind("node1", 100, 4000, 3999, base=base_for("node0"))
    assert moved.program(101) == base_for("node0") + 101
    assert moved.real(base_for("node0") + 101) == 101
    assert moved.real(base_for("node1") + 101) is None


def test_a_base_no_instance_could_have_is_ignored_for_the_instance_s_own() -> None:
    for wrong in (5, PID_MAX_LIMIT + 1, (INSTANCE_SLOTS + 1) * PID_MAX_LIMIT):
        space = PidSpace()
        space.bind("node2", 100, 4000, 3999, base=wrong)
        assert space.base == base_for("node2")


class FakeHome:
    """A home that records the signals sent there and answers with `errno`."""

    def __init__(self, err: int = 0) -> None:
        self.sent: list[tuple[int, int]] = []
        self.threads: list[int] = []  # the sent ids that name a thread
        self.err = err

    def __call__(self, pid: int, sig: int, thread: bool = False, sender: int = 0) -> int:
        self.sent.append((pid, sig))
        if thread:
            self.threads.append(pid)
        return self.err


def test_a_signal_for_a_pid_elsewhere_is_sent_at_home() -> None:
    home = FakeHome()
    c = coordinator_for(TABLE, (), lambda _m: None, home=home)
    c.bind_pids("node0", 5, 31337, 31000)
    assert c.on_syscall(call("kill", 31000, 15)) == Complete(0)
    assert c.on_syscall(call("kill", -31000 & (2**64 - 1), 2)) == Complete(0)  # its group
    assert c.on_syscall(call("tkill", 3 * PID_MAX_LIMIT + 7, 10)) == Complete(0)
    assert c.on_syscall(call("tgkill", 31000, 31000, 12)) == Complete(0)
    assert home.sent == [(31000, 15), (-31000, 2), (3 * PID_MAX_LIMIT + 7, 10), (31000, 12)]
    assert home.threads == [3 * PID_MAX_LIMIT + 7]  # tkill names a thread
    # a thread of a process elsewhere: that thread alone (issue 11)
    assert c.on_syscall(call("tgkill", 31000, 31001, 12)) == Complete(0)
    assert home.sent[-1] == (31001, 12) and home.threads[-1] == 31001
    # ...but a thread the process held here lacks is no thread of it
    assert c.on_syscall(call("tgkill", 31337, 31001, 12)) == Complete(-errno.ESRCH)
    # a wait, a pidfd: not sent
    assert c.on_syscall(call("wait4", 31000)) == Complete(-errno.ECHILD)
    assert c.on_syscall(call("pidfd_open", 31000)) == Complete(-errno.ENOSYS)
    assert c.on_syscall(call("kill", 31000, 99)) == Complete(-errno.EINVAL)
    assert len(home.sent) == 5
    # kill's outcome at home is the program's
    c.home = FakeHome(errno.EPERM)
    assert c.on_syscall(call("kill", 1, 15)) == Complete(-errno.EPERM)


def test_t_asks_its_agent_and_takes_the_answer_to_its_own_request() -> None:
    import socket
    import threading

    from vmagent.trace import channel
    from vmagent.trace.placing import ChannelKill

    ours, agent = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reqs = iter(range(7, 100))
    kept: list[bytes] = []
    kill = ChannelKill(lambda: ours, lambda: next(reqs), kept.append)
    asked: list[channel.Record] = []

    def answer() -> None:
        record = channel.decode(channel.receive(agent)[0])
        asked.append(record)
        agent.send(channel.encode(channel.OP_KILLED, req=b"6", errno=0))  # a late one
        agent.send(channel.encode(channel.OP_DETACH))  # a checkpoint meanwhile: kept
        agent.send(channel.encode(channel.OP_KILLED, req=record[b"req"], errno=errno.EPERM))

    helper = threading.Thread(target=answer)
    helper.start()
    try:
        assert kill(-31000, 15) == errno.EPERM
    finally:
        helper.join()
    assert (asked[0][b"op"], asked[0][b"pid"], asked[0][b"sig"]) == (b"kill", b"-31000", b"15")
    assert [channel.decode(k)[b"op"] for k in kept] == [channel.OP_DETACH]
    kill.timeout = 0.05
    assert kill(31000, 15) == errno.ESRCH  # no answer: as for a pid that is gone
    agent.close()
    assert kill(31000, 15) == errno.ESRCH  # the agent is gone
    ours.close()
