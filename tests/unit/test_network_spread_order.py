"""Why `--placement spread` once put both servers of test_network_local on one instance.

Spread places each exec on the instance with the fewest of the program's
running processes, equal ones in turn (the one used longest ago first).  The
test's program started two servers, a unix server, `hostname` and a waiting
client in a row; the servers were `&` children whose exec races the parent
shell's next execs.  On a quiet machine the servers exec first and land on
two instances; under CPU stress the second server's child could exec after
the unix server and the waiting client, when every instance already ran one
process: it then goes to the instance used longest ago, the first server's.
Spread spread (three instances, four processes: 2-1-1); it is the exec order
that differed.  test_network_local now starts each server and waits for it
before the next exec, so the order no longer depends on the scheduler of this
machine.  These cases replay both orders through the OSS's own functions.
"""

from __future__ import annotations

from oss.compute import scheduler as S

ANY = S.SelectionPolicy()
INSTANCES = ("node0", "node1", "node2")


def _place(order: list[str], ends: tuple[str, ...] = ()) -> dict[str, str]:
    """Each exec of `order` placed as the home asks the OSS; `ends`: processes that end
    (and are released) right after they were placed."""
    current: dict[str, int] = {}
    recent: list[str] = []
    where: dict[str, str] = {}
    for name in order:
        cands = [S.Candidate(n, None, 2, 0, None, 8, current.get(n, 0), None) for n in INSTANCES]
        (a,) = S.place_by_policy("p", "spread", ANY, cands, current, recent)
        where[name] = a.instance
        recent = [a.instance, *(x for x in recent if x != a.instance)]
        if name not in ends:
            current[a.instance] = current.get(a.instance, 0) + 1
    return where


def test_quiet_order_puts_the_servers_apart() -> None:
    w = _place(["server1", "server2", "unix", "hostname", "wait"], ends=("hostname",))
    assert w["server1"] != w["server2"]


def test_stressed_order_puts_the_second_server_beside_the_first() -> None:
    # server2's child execs last: unix, hostname (ended) and wait took the other two.
    w = _place(["server1", "unix", "hostname", "wait", "server2"], ends=("hostname",))
    assert w["server1"] == w["server2"]  # the flake, replayed deterministically


def test_each_server_waited_for_before_the_next_exec_is_always_apart() -> None:
    # The test's order now: server1, a client that waits for it (ends), server2, ...
    # Whatever else is running, server2 never joins server1 while another instance has
    # fewer processes, and only server1 and at most the waiting client count.
    for ended in ((), ("wait1",)):
        w = _place(["server1", "wait1", "server2"], ends=ended)
        assert w["server1"] != w["server2"], ended
