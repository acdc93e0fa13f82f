"""The op=place / op=grant / op=home records between an instance tracer and its agent."""

from __future__ import annotations

import pytest

from vmagent.exec import protocol as P
from vmagent.trace import placer

DIGEST = "ab" * 32


def test_a_place_request_round_trips() -> None:
    raw = placer.place_record(7, 4242, 1000, 100, (100, 27), DIGEST, ["node2", "node1"])
    got = placer.place_request(P.pairs(raw))
    assert got == placer.PlaceRequest(7, 4242, 1000, 100, (100, 27), DIGEST, ("node2", "node1"))
    bare = placer.place_request(P.pairs(placer.place_record(1, 2, 0, 0, (), DIGEST)))
    assert bare.groups == () and bare.avoid == ()


@pytest.mark.parametrize(
    "field, value",
    [(b"digest", b"zz" * 32), (b"digest", b"ab"), (b"pid", b"-1"), (b"uid", b"x"), (b"req", b"")],
)
def test_malformed_place_requests_are_refused(field: bytes, value: bytes) -> None:
    record = P.pairs(placer.place_record(1, 2, 3, 4, (), DIGEST))
    record[field] = value
    with pytest.raises(ValueError):
        placer.place_request(record)


def test_answers_carry_their_request_number() -> None:
    grant = P.pairs(placer.grant_record(9, "node1", "10.0.0.2:7070", "v3.x.t"))
    assert grant == {
        b"op": b"grant", b"req": b"9", b"instance": b"node1",
        b"address": b"10.0.0.2:7070", b"ticket": b"v3.x.t",
    }  # fmt: skip
    home = P.pairs(placer.home_record(9, "no OSS"))
    assert (home[b"op"], home[b"req"], home[b"reason"]) == (b"home", b"9", b"no OSS")
