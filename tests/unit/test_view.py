"""The view codec: canonical encoding, digest, bounds (vmagent.exec.view)."""

import pytest

from oss.compute import exectickets
from vmagent.errors import AuthError
from vmagent.exec import view as V


def test_round_trip_keeps_every_field() -> None:
    v = V.View("prog_1", (("/mnt/v", "/srv/d"), ("/a", "/b")), "pack", "full", "home1")
    back = V.decode(v.encode())
    assert back == v
    assert back.mapping() == {"/a": "/b", "/mnt/v": "/srv/d"}
    assert V.from_hex(v.hex()) == v


def test_equal_views_have_one_digest_whatever_the_map_order() -> None:
    a = V.View.of("p", {"/x": "/1", "/y": "/2"})
    b = V.View.of("p", {"/y": "/2", "/x": "/1"})
    assert a.encode() == b.encode()
    assert a.digest() == b.digest()
    assert len(a.digest()) == 32


@pytest.mark.parametrize(
    "other",
    [
        V.View.of("p", {"/x": "/1", "/y": "/3"}),  # one map widened
        V.View.of("p", {"/x": "/1"}),  # one map dropped
        V.View("p", (("/x", "/1"), ("/y", "/2")), "spread", "full"),
    ],
)
def test_any_change_changes_the_digest(other: V.View) -> None:
    assert V.View.of("p", {"/x": "/1", "/y": "/2"}).digest() != other.digest()


def test_checked_admits_only_the_ticket_s_view_and_program() -> None:
    mine = V.View.of("prog_1", {"/mnt/v": "/srv/d"})
    assert V.checked(mine.encode(), "prog_1", mine.digest()) == mine
    wider = V.View.of("prog_1", {"/mnt/v": "/srv/d", "/etc": "/tmp/x"})
    with pytest.raises(AuthError, match="cannot be widened"):
        V.checked(wider.encode(), "prog_1", mine.digest())
    other = V.View.of("prog_2", {"/mnt/v": "/srv/d"})
    with pytest.raises(AuthError, match="another program"):
        V.checked(other.encode(), "prog_1", mine.digest())
    # No view in the HELLO: the empty one, which only a ticket without maps vouches for.
    assert V.checked(b"", "-", exectickets.EMPTY_VIEW) == V.EMPTY
    with pytest.raises(AuthError):
        V.checked(b"", "prog_1", mine.digest())


def test_the_oss_and_the_agent_compute_one_digest() -> None:
    assert V.EMPTY.digest() == exectickets.EMPTY_VIEW
    v = V.View.of("p", {"/a": "/b"}, "pack", "home1")
    assert v.digest() == exectickets.view_digest([("/a", "/b")], "pack", "exec", "home1")


def test_unknown_fields_are_kept_and_hashed() -> None:
    v = V.View("p", extra=(("hostname", "h1"),))
    assert V.decode(v.encode()) == v
    assert v.digest() != V.View("p").digest()


@pytest.mark.parametrize(
    "data",
    [b"\x00\x00\x00\x05ab", b"x" * (V.MAX_VIEW + 1)],
)
def test_malformed_encodings_are_refused(data: bytes) -> None:
    with pytest.raises(V.BadView):
        V.decode(data)


def test_bad_values_are_refused() -> None:
    with pytest.raises(V.BadView):
        V.View("p", (("rel", "/b"),))
    with pytest.raises(V.BadView):
        V.View("p", metering="some")
    with pytest.raises(V.BadView):
        V.from_hex("zz")


def test_real_paths_of_what_a_mapped_deputy_reads() -> None:
    v = V.View.of("p", {"/mnt/v": "/srv/d"})
    assert v.real(b"/mnt/v") == b"/srv/d"
    assert v.real(b"/mnt/v/sub/a") == b"/srv/d/sub/a"
    assert v.real(b"/mnt/vv") == b"/mnt/vv"
    assert v.real(b"/etc/passwd") == b"/etc/passwd"
    assert V.EMPTY.real(b"/mnt/v") == b"/mnt/v"
