"""Attack: a holder of a valid ticket sends a HELLO with values the agent cannot apply.

Old agent: a file offset of 2^70 raised an unhandled OverflowError and left a
session registered forever; uid -5, uid 2^40, a huge umask or a NUL in argv came
back as "exited 127" with no message.  Now each is an ERROR frame saying what is
wrong, and no session is left behind.
"""

from __future__ import annotations

import json
import secrets

import pytest
from attack import as_nobody, require_attacker
from wire import CLIENT, real_agent

from vmagent.exec import tickets

pytestmark = pytest.mark.security

SCRIPT = (
    CLIENT
    + r"""
addr, cases = sys.argv[1], json.loads(sys.argv[2])
results = {}
for name, case in cases.items():
    extra = {k.encode(): bytes.fromhex(v) for k, v in case["extra"].items()}
    argv = [bytes.fromhex(a) for a in case["argv"]]
    path = bytes.fromhex(case["path"])
    # Both protocols: the old agent took the ticket inside the HELLO.
    if case["ticket"].startswith("v1."):
        out, err = run_v1(addr, case["ticket"], path, argv, None, None)
    else:
        try:
            s = connect(addr)
            why = handshake(s, case["ticket"])
            if why is not None:
                results[name] = {"error": why, "handshake": False}
                continue
            s.sendall(frame(HELLO, hello(path, argv, extra=extra)))
            out, err, ex = outcome(read_frames(s))
            s.close()
        except OSError as exc:
            out, err = b"", "io: %s" % exc
    results[name] = {"error": err, "out": out.decode(errors="replace")}
print(json.dumps(results))
"""
)


def _rec(items: list[bytes]) -> bytes:
    return b"".join(len(i).to_bytes(4, "big") + i for i in items)


CASES: dict[str, tuple[dict[bytes, bytes], list[bytes], str]] = {
    # name: (HELLO fields to override, argv, the words the refusal must contain)
    "offset 2^70": (
        {b"fds": _rec([_rec([b"0", b"path", b"/etc/hostname", b"0", str(2**70).encode()])])},
        [b"/bin/true"],
        "descriptor offset",
    ),
    "uid -5": ({b"uid": b"-5"}, [b"/bin/true"], "uid"),
    "uid 2^40": ({b"uid": str(2**40).encode()}, [b"/bin/true"], "uid"),
    "huge umask": ({b"umask": str(2**80).encode()}, [b"/bin/true"], "umask"),
    "NUL in argv": ({}, [b"/bin/true", b"a\0b"], "NUL"),
    "NUL in env": ({b"env": _rec([b"A=1\0B=2"])}, [b"/bin/true"], "NUL"),
}


def test_bad_hello_values_get_a_clear_refusal_and_leave_no_session() -> None:
    require_attacker()
    token = secrets.token_urlsafe(24)
    with real_agent(token) as agent:
        cases = {}
        for name, (extra, argv, _) in CASES.items():
            path = b"/bin/true"
            uid = 65534  # the ticket vouches for nobody: the HELLO values are the attack
            ticket = tickets.mint(
                token, agent.name, uid=uid, gid=uid, digest=tickets.exec_digest(path, argv)
            )
            cases[name] = {
                "ticket": ticket,
                "path": path.hex(),
                "argv": [a.hex() for a in argv],
                "extra": {k.decode(): v.hex() for k, v in extra.items()},
            }
        res = as_nobody(SCRIPT, agent.address, json.dumps(cases))
        assert res.returncode == 0, res.stderr
        results = json.loads(res.stdout)
        for name, (_, _, words) in CASES.items():
            err = results[name].get("error")
            assert err and words in err, (name, results[name])
        sessions = json.loads(agent.get("/v1/sessions", token))
        assert sessions["sessions"] == [], sessions
        # ...and the agent still serves a good request afterwards.
        good = tickets.mint(
            token, agent.name, uid=65534, gid=65534,
            digest=tickets.exec_digest(b"/usr/bin/id", [b"/usr/bin/id", b"-u"]),
        )  # fmt: skip
        res = as_nobody(
            CLIENT + "\nout, err = run_v2(sys.argv[1], sys.argv[2], b'/usr/bin/id', "
            "[b'/usr/bin/id', b'-u'])\nprint(out.decode(), err)",
            agent.address,
            good,
        )
        assert res.stdout.split() == ["65534", "None"], (res.stdout, res.stderr)
