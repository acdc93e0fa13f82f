"""Pure parts of vmagent: tickets, load parsing, exec-request validation, config, subnets."""

from __future__ import annotations

import ipaddress

import pytest

from net.netns import choose_subnet
from vmagent import protocol as P
from vmagent.config import AgentConfig, ConfigError, parse_hostport
from vmagent.errors import AuthError, BadRequest
from vmagent.load import cpu_percent, parse_cpu_times, parse_loadavg, parse_meminfo
from vmagent.remote import DEPUTY_SCRIPT, deputy_argv, original_argv
from vmagent.spawn import parse_hello
from vmagent.tickets import TicketCheck, mint

# -- tickets -------------------------------------------------------------------


def test_ticket_is_accepted_once() -> None:
    check = TicketCheck("tok", "n0", clock=lambda: 1000.0)
    ticket = mint("tok", "n0", now=1000.0)
    check.verify(ticket)
    with pytest.raises(AuthError, match="already used"):
        check.verify(ticket)


@pytest.mark.parametrize(
    ("token", "instance", "now", "message"),
    [
        ("other", "n0", 1000.0, "not valid"),
        ("tok", "n1", 1000.0, "not valid"),
        ("tok", "n0", 1000.0 - 400, "expired"),
    ],
)
def test_ticket_refusals(token: str, instance: str, now: float, message: str) -> None:
    check = TicketCheck("tok", "n0", clock=lambda: 1000.0)
    with pytest.raises(AuthError, match=message):
        check.verify(mint(token, instance, now=now))


def test_malformed_ticket() -> None:
    with pytest.raises(AuthError, match="malformed"):
        TicketCheck("tok", "n0").verify("garbage")


# -- load -------------------------------------------------------------------------

STAT = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n"
MEMINFO = "MemTotal:       2048000 kB\nMemFree:  100 kB\nMemAvailable:   1024000 kB\n"


def test_load_parsing() -> None:
    assert parse_cpu_times(STAT) == (150, 1000)
    assert cpu_percent((150, 1000), (250, 1200)) == 50.0
    assert cpu_percent((1, 1), (1, 1)) == 0.0
    assert parse_meminfo(MEMINFO) == (2000, 1000)
    assert parse_loadavg("0.50 0.40 0.30 3/215 9999\n") == (0.5, 215)
    with pytest.raises(ValueError):
        parse_cpu_times("intr 1 2 3\n")


# -- exec requests -------------------------------------------------------------------


def hello(over: dict[bytes, bytes] | None = None) -> bytes:
    fields = {
        b"ticket": b"t",
        b"path": b"/bin/true",
        b"argv": P.record([b"true"]),
        b"env": P.record([b"A=1", b"B=x=y"]),
        b"cwd": b"/",
        b"umask": b"18",
        b"rlimits": P.record([P.record([b"7", b"1024", b"4096"])]),
        b"fds": P.record([P.record([b"1", P.FD_OUT, b"", b"1", b"0"])]),
    }
    fields.update(over or {})
    return P.unpairs(fields)


def test_parse_hello_round_trip() -> None:
    ticket, req = parse_hello(hello())
    assert ticket == "t"
    assert req.argv == (b"true",) and req.env == (b"A=1", b"B=x=y")
    assert req.umask == 0o22 and req.rlimits == ((7, 1024, 4096),)
    assert [(f.fd, f.kind) for f in req.fds] == [(1, P.FD_OUT)]


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({b"argv": P.record([])}, "empty argv"),
        ({b"umask": b"022x"}, "not an integer"),
        ({b"fds": P.record([P.record([b"1", b"weird", b"", b"0", b"0"])])}, "descriptor kind"),
        ({b"fds": P.record([P.record([b"1", P.FD_PATH, b"rel", b"0", b"0"])])}, "absolute"),
        ({b"fds": b"\x00\x00\x00\x09abc"}, "malformed"),
        ({b"path": b""}, "bad path"),
    ],
)
def test_parse_hello_rejects_bad_requests(over: dict[bytes, bytes], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_hello(hello(over))


def test_parse_hello_requires_fields() -> None:
    with pytest.raises(BadRequest, match="lacks cwd"):
        parse_hello(P.unpairs({b"ticket": b"t", b"path": b"/x", b"argv": P.record([b"x"])}))


# -- config ---------------------------------------------------------------------------


def test_config_validation() -> None:
    assert parse_hostport("0.0.0.0:7070") == ("0.0.0.0", 7070)
    assert parse_hostport("[::1]:80") == ("::1", 80)
    for bad in ("7070", "host:", "h:99999", ":1"):
        with pytest.raises(ConfigError):
            parse_hostport(bad)
    with pytest.raises(ConfigError, match="token"):
        AgentConfig(instance="n", token="", listen_host="h", listen_port=1)
    with pytest.raises(ConfigError, match="http"):
        AgentConfig(instance="n", token="t", listen_host="h", listen_port=1, oss_url="ftp://x")


# -- lab subnets -------------------------------------------------------------------------


def test_choose_subnet_avoids_used_networks() -> None:
    used = [ipaddress.ip_network("10.213.5.0/24"), ipaddress.ip_network("10.213.6.0/23")]
    assert str(choose_subnet(used, 5)) == "10.213.8.0/24"
    everything = [ipaddress.ip_network("10.0.0.0/8")]
    with pytest.raises(Exception, match="no free"):
        choose_subnet(everything, 0)


# -- deputy command line -------------------------------------------------------------------


def test_deputy_argv_shape_and_inverse() -> None:
    argv = deputy_argv("10.0.0.2:7070", "n1", "tick", b"/bin/echo", (b"echo", b"hi"), 3.0)
    assert argv[:4] == (b"python3", b"-I", b"-S", DEPUTY_SCRIPT.encode())
    assert argv[argv.index(b"--") :] == (b"--", b"/bin/echo", b"echo", b"hi")
    assert original_argv(tuple(a.decode() for a in argv)) == ("echo", "hi")
    assert original_argv(("make", "-j6")) is None
