"""Migration tickets (vmagent.checkpoint.migrate): bound to a target, a session, a time; once."""

from __future__ import annotations

import pytest

from vmagent.checkpoint.migrate import (
    KEY_EXEC,
    MigrationRefused,
    MigrationTickets,
    mint_ticket,
    moved_key,
)
from vmagent.exec import protocol as P
from vmagent.exec.link import Link


def test_a_ticket_names_its_session_and_is_burnt_once() -> None:
    check = MigrationTickets("tok", "node1", clock=lambda: 1000.0)
    ticket = mint_ticket("tok", "node1", "ab" * 16, now=1000.0)
    assert check.check(ticket, burn=False) == "ab" * 16  # the pre-freeze check
    assert check.check(ticket, burn=True) == "ab" * 16
    with pytest.raises(MigrationRefused, match="already used"):
        check.check(ticket, burn=True)


@pytest.mark.parametrize(
    ("token", "instance", "now", "message"),
    [
        ("other", "node1", 1000.0, "not valid for node1"),
        ("tok", "node2", 1000.0, "not valid for node1"),
        ("tok", "node1", 900.0, "expired"),
        ("tok", "node1", 1300.0, "lives too long"),
    ],
)
def test_a_ticket_for_another_key_instance_or_time_is_refused(
    token: str, instance: str, now: float, message: str
) -> None:
    check = MigrationTickets("tok", "node1", clock=lambda: 1000.0)
    with pytest.raises(MigrationRefused, match=message):
        check.check(mint_ticket(token, instance, "ab" * 16, now=now), burn=True)


def test_tampering_and_garbage_are_one_line() -> None:
    check = MigrationTickets("tok", "node1", clock=lambda: 1000.0)
    ticket = mint_ticket("tok", "node1", "ab" * 16, now=1000.0)
    forged = ticket.replace("ab" * 16, "cd" * 16)
    with pytest.raises(MigrationRefused, match="not valid"):
        check.check(forged, burn=True)
    for junk in ("", "m1", "x.y.z.w.v.u", "m1.i.n.notanumber.s.m"):
        with pytest.raises(MigrationRefused, match="malformed"):
            check.check(junk, burn=True)


def test_an_exec_key_ticket_needs_the_agent_to_have_that_key() -> None:
    ticket = mint_ticket("xkey", "node1", "ab" * 16, now=1000.0, key=KEY_EXEC)
    with pytest.raises(MigrationRefused, match="not valid"):
        MigrationTickets("tok", "node1", clock=lambda: 1000.0).check(ticket, burn=True)
    keyed = MigrationTickets("tok", "node1", clock=lambda: 1000.0, exec_key="xkey")
    assert keyed.check(ticket, burn=True) == "ab" * 16


def test_the_moved_key_is_the_one_the_deputy_derives() -> None:
    secret = "f" * 64
    link = Link("10.0.0.1:7070", "node0", 5.0, b"v2.public." + secret.encode())
    link.move(P.unpairs({b"addr": b"10.0.0.2:7070", b"instance": b"node1", b"salt": b"s4lt"}))
    assert link.secret == moved_key(secret, "node1", "s4lt").encode()
    assert (link.addr, link.instance) == (("10.0.0.2", 7070), "node1")
    assert moved_key(secret, "node2", "s4lt").encode() != link.secret
