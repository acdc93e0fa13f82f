"""Pure parts of vmagent: tickets, load parsing, exec-request validation, config, subnets."""

from __future__ import annotations

import ipaddress
import os

import pytest

from net.netns import choose_subnet
from vmagent.config import AgentConfig, ConfigError, parse_hostport
from vmagent.errors import AuthError, BadRequest
from vmagent.exec import protocol as P
from vmagent.exec.remote import DEPUTY_SCRIPT, deputy_argv, original_argv
from vmagent.exec.spawn import parse_hello
from vmagent.exec.tickets import TicketCheck, mint
from vmagent.load import cpu_percent, parse_cpu_times, parse_loadavg, parse_meminfo

# -- tickets -------------------------------------------------------------------


IDS = {"uid": 1000, "gid": 1000, "digest": "cd" * 32}


def test_ticket_is_accepted_once() -> None:
    check = TicketCheck("tok", "n0", clock=lambda: 1000.0)
    ticket = mint("tok", "n0", now=1000.0, **IDS)
    check.verify(ticket)
    with pytest.raises(AuthError, match="already used"):
        check.verify(ticket)


@pytest.mark.parametrize(
    ("token", "instance", "now", "ttl", "message"),
    [
        ("other", "n0", 1000.0, 20, "not valid"),
        ("tok", "n1", 1000.0, 20, "not valid"),
        ("tok", "n0", 1000.0 - 400, 20, "expired"),
        ("tok", "n0", 1000.0, 3600, "longer than 30 s"),  # whatever the minter wrote
        ("tok", "n0", 999.0, 20, "issued before this agent started"),
    ],
)
def test_ticket_refusals(token: str, instance: str, now: float, ttl: float, message: str) -> None:
    check = TicketCheck("tok", "n0", clock=lambda: 1000.0, started=1000.0 if now == 999.0 else 0.0)
    with pytest.raises(AuthError, match=message):
        check.verify(mint(token, instance, now=now, ttl=ttl, **IDS))


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
    req = parse_hello(hello())
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
        ({b"path": b""}, "empty path"),
    ],
)
def test_parse_hello_rejects_bad_requests(over: dict[bytes, bytes], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_hello(hello(over))


def test_parse_hello_requires_fields() -> None:
    with pytest.raises(BadRequest, match="lacks cwd"):
        parse_hello(P.unpairs({b"path": b"/x", b"argv": P.record([b"x"])}))


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
    argv = deputy_argv("10.0.0.2:7070", "n1", "/t/f", b"/bin/echo", (b"echo", b"hi"), 3.0)
    assert argv[:4] == (b"python3", b"-I", b"-S", DEPUTY_SCRIPT.encode())
    assert argv[argv.index(b"--") :] == (b"--", b"/bin/echo", b"echo", b"hi")
    assert original_argv(tuple(a.decode() for a in argv)) == ("echo", "hi")
    assert original_argv(("make", "-j6")) is None


# -- reader probe ------------------------------------------------------------------------


def test_reader_probe_parsing() -> None:
    from vmagent.exec.readers import ReaderProbe, UnknownMachine, parse_syscall, session_of

    assert parse_syscall("0 0x3 0x7ffd 0x1000 0x0 0x0 0x0 0x7ffc 0x7f00\n") == (
        0,
        [3, 0x7FFD, 0x1000, 0, 0, 0],
    )
    assert parse_syscall("running\n") is None
    assert parse_syscall("-1 0x7ffc 0x7f00\n") is None
    assert session_of("42 (we ird) comm) S 1 42 77 0 -1") == 77
    with pytest.raises(UnknownMachine):
        ReaderProbe("pdp11")


def test_terminal_is_reopened_only_if_it_is_the_same_device() -> None:

    from vmagent.exec.session import _same_terminal

    master, slave = os.openpty()
    try:
        path = os.ttyname(slave).encode()
        rdev = os.fstat(slave).st_rdev
        fd = _same_terminal(path, os.O_RDWR, rdev)
        assert fd is not None and os.isatty(fd)
        os.close(fd)
        assert _same_terminal(path, os.O_RDWR, rdev + 1) is None  # another host's tty
        assert _same_terminal(b"/dev/nonexistent-tty", os.O_RDWR, rdev) is None
    finally:
        os.close(master)
        os.close(slave)


def test_parse_hello_reads_a_terminals_device_number() -> None:
    tty = P.record([b"1", P.FD_OUT, b"/dev/pts/3", b"1", b"0", b"34819"])
    req = parse_hello(hello({b"fds": P.record([tty])}))
    assert req.fds[0].rdev == 34819 and req.fds[0].path == b"/dev/pts/3"
    bad = P.record([b"1", P.FD_OUT, b"pts/3", b"1", b"0", b"34819"])
    with pytest.raises(BadRequest, match="absolute"):
        parse_hello(hello({b"fds": P.record([bad])}))


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            {b"fds": P.record([P.record([b"0", P.FD_PATH, b"/x", b"0", str(2**70).encode()])])},
            "descriptor offset is out of range",
        ),
        ({b"uid": b"-5"}, "field uid is out of range"),
        ({b"uid": str(2**40).encode()}, "field uid is out of range"),
        ({b"umask": str(2**80).encode()}, "field umask is out of range"),
        ({b"argv": P.record([b"a\0b"])}, r"NUL byte in argv\[0\]"),
        ({b"cwd": b"/tmp\0x"}, "NUL byte in cwd"),
        ({b"rlimits": P.record([P.record([b"99", b"1", b"1"])])}, "rlimit is out of range"),
    ],
)
def test_parse_hello_refuses_values_it_cannot_apply(over: dict[bytes, bytes], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_hello(hello(over))


def test_bind_runs_the_tickets_exec_as_the_tickets_ids() -> None:
    from vmagent.exec.spawn import bind
    from vmagent.exec.tickets import exec_digest, parse, split

    req = parse_hello(hello())
    ticket = mint("tok", "n0", uid=1000, gid=100, groups=(100, 27),
                  digest=exec_digest(b"/bin/true", (b"true",)))  # fmt: skip
    grant = parse(split(ticket)[0])
    bound = bind(req, grant)
    assert (bound.uid, bound.gid, bound.groups) == (1000, 100, (100, 27))
    with pytest.raises(AuthError, match="another program"):
        bind(parse_hello(hello({b"argv": P.record([b"false"])})), grant)
    with pytest.raises(AuthError, match="vouches for uid 1000"):
        bind(parse_hello(hello({b"uid": b"0"})), grant)


# -- the deputy's first frame ---------------------------------------------------------------


def test_deputy_says_hello_then_hello_again_then_resume() -> None:
    """HELLO until a WELCOME names the session; AGAIN once a HELLO may have arrived."""
    from vmagent.exec.link import Link

    link = Link("127.0.0.1:9", "n0", 1.0, b"public.secret")
    link.hello = b"request"
    kind, fd, length, seq = P.HEADER.unpack(link.first_frame()[: P.HEADER_SIZE])
    assert (kind, fd, seq) == (P.HELLO, 0, 0)
    link.dialed = True  # a handshake got as far as sending PROOF + HELLO
    link.inbox.accept(1, 0)
    frame = link.first_frame()
    assert P.HEADER.unpack(frame[: P.HEADER_SIZE]) == (P.HELLO, P.AGAIN, len(b"request"), 1)
    assert frame[P.HEADER_SIZE :] == b"request"
    link.session = b"sid"
    kind, fd, length, seq = P.HEADER.unpack(link.first_frame()[: P.HEADER_SIZE])
    assert (kind, seq) == (P.RESUME, 1)


# -- the deputy's rule ------------------------------------------------------------------------


def _imported(*args: str) -> list[str]:
    """Modules the deputy's interpreter imports for `args` (from -X importtime)."""
    import subprocess

    from vmagent.exec.remote import interpreter

    cmd = [os.fsdecode(interpreter()), "-I", "-S", "-X", "importtime", *args]
    err = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stderr
    return [line.split("|")[2].strip() for line in err.splitlines() if line.count("|") == 2][1:]


def test_deputy_imports_only_c_modules_of_the_standard_library() -> None:
    """deputy.py and every module it imports: builtin/extension stdlib modules, vmagent.exec.

    The deputy is on the path of every remote exec: a pure-Python module of the standard
    library costs a file read and an unmarshal each time (json ~6 ms).
    """
    import importlib.util
    import sys

    baseline = set(_imported("-c", "pass"))  # what the interpreter loads anyway
    extra = [m for m in _imported(DEPUTY_SCRIPT, "--help") if m not in baseline]
    ours = {m for m in extra if m == "vmagent" or m.startswith("vmagent.")}
    assert {"vmagent.exec.protocol", "vmagent.exec.link", "vmagent.exec.hello"} <= ours, extra
    assert all(m in ("vmagent", "vmagent.exec") or m.startswith("vmagent.exec.") for m in ours)
    pure = []
    for name in set(extra) - ours:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        # Frozen modules (os and what it needs) live in the interpreter binary: no file read.
        if name in sys.builtin_module_names or origin == "frozen" or (origin or "").endswith(".so"):
            continue
        pure.append(f"{name} ({origin})")
    assert not pure, f"the deputy loads pure-Python modules: {pure}"
