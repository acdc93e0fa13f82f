"""`dcp-oss` commands against a real `dcp-oss serve` (issue 16): their tables, their
`--json` (validated against the API models the help names), exit codes and one-line
errors for bad input.  Programs here are submitted through the API (no instances: they
wait for capacity); the commands on a program that really ran (its processes on their
instances, its log) are in test_oss_web.py, beside the web view that shows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import TypeAdapter

from oss import models as m
from oss.cli import main
from tests.conftest import REPO
from tests.integration.test_dcptrace_oss import Lab, _cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("cliops"))
    try:
        lab.token = _cli("account", "create", "--data", str(lab.data), "acme")
        lab.admin = _cli("account", "create", "--data", str(lab.data), "--admin", "op")
        _proc, line = lab.start("oss", "serve", "--listen", "127.0.0.1:0", "--data", str(lab.data))
        assert "listening on " in line, line
        lab.url = line.split("listening on ", 1)[1].strip()
        yield lab
    finally:
        lab.stop()


def _token_file(lab: Lab, token: str, name: str) -> str:
    path = lab.data.parent / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return str(path)


def dcp(lab: Lab, *args: str, token: str | None = None, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`dcp-oss ARGS` with DCP_OSS set and the tenant's token (or `token`) in DCP_TOKEN.

    Run in this process (click's runner: the same command objects, exit codes and
    streams, without an interpreter start per command) against the real server.
    """
    e: dict[str, str | None] = {
        "DCP_OSS": lab.url, "DCP_TOKEN": token or lab.token, "DCP_OSS_URL": None,
        "DCP_TOKEN_FILE": None,
    }  # fmt: skip
    e.update({k: v or None for k, v in (env or {}).items()})
    r = CliRunner().invoke(main, list(args), env=e, prog_name="dcp-oss")
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    return res.stdout


def one_line(res: subprocess.CompletedProcess[str], code: int, prefix: str) -> str:
    """The command failed with `code` and said why in one line starting with `prefix`."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), res.stderr
    return lines[0]


def _submit(lab: Lab, token: str, argv: list[str]) -> str:
    req = urllib.request.Request(
        lab.url + "/v1/programs",
        data=json.dumps({"argv": argv}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(json.loads(resp.read())["id"])


def _json(out: str, model: Any) -> Any:
    return TypeAdapter(model).validate_python(json.loads(out))


def test_programs_list_show_cancel(lab: Lab) -> None:
    a = _submit(lab, lab.token, ["/bin/echo", "first"])
    b = _submit(lab, lab.token, ["/bin/sleep", "100"])
    out = ok(dcp(lab, "programs", "list"))
    head, *rows = out.splitlines()
    assert head.split() == ["ID", "STATE", "PROCS", "LOST", "INSTANCES", "SPENT", "AGE",
                            "EXIT", "ARGV"]  # fmt: skip
    assert [r.split()[0] for r in rows][:2] == [b, a]  # newest first
    assert rows[0].split()[1] == "pending" and rows[0].endswith("/bin/sleep 100")
    got = _json(ok(dcp(lab, "programs", "list", "--json")), list[m.Program])
    assert {p.id for p in got} >= {a, b}
    shown = json.loads(ok(dcp(lab, "programs", "show", a, "--json")))
    assert m.Program.model_validate(shown["program"]).argv == ["/bin/echo", "first"]
    assert m.ProcessList.model_validate(shown["processes"]).processes == []
    text = ok(dcp(lab, "programs", "show", a))
    assert "id:" in text and a in text and "argv:" in text and "/bin/echo first" in text
    # cancel one, refuse one unknown: exit 1, one line for the unknown one
    res = dcp(lab, "programs", "cancel", b, "no-such-program")
    assert res.stdout == f"{b}: cancelled\n", res.stdout
    one_line(res, 1, "dcp-oss programs cancel: no-such-program: No such object")
    only = ok(dcp(lab, "programs", "list", "--state", "cancelled")).splitlines()[1:]
    assert [r.split()[0] for r in only] == [b]


def test_another_tenant_neither_sees_nor_cancels(lab: Lab) -> None:
    mine = _submit(lab, lab.token, ["/bin/true"])
    other = _cli("account", "create", "--data", str(lab.data), "rival")
    assert mine not in ok(dcp(lab, "programs", "list", token=other))
    one_line(dcp(lab, "programs", "show", mine, token=other), 1,
             f"dcp-oss programs show: No such object: program {mine}")  # fmt: skip
    one_line(dcp(lab, "programs", "cancel", mine, token=other), 1, "dcp-oss programs cancel:")
    state = _json(ok(dcp(lab, "programs", "show", mine, "--json")), dict[str, Any])
    assert state["program"]["state"] == "pending"


def test_instances_and_pools(lab: Lab) -> None:
    # the admin registers an instance (pending until its agent comes) and a pool
    itype = {"name": "t1", "cpus": 2, "memory_mb": 512, "price_micros_per_s": 3}
    req = urllib.request.Request(
        lab.url + "/v1/instance-types", data=json.dumps(itype).encode(), method="PUT",
        headers={"Authorization": f"Bearer {lab.admin}", "Content-Type": "application/json"},
    )  # fmt: skip
    urllib.request.urlopen(req, timeout=10).close()
    one_line(dcp(lab, "pools", "set", "small"), 1, "dcp-oss pools set: pool small does not exist")
    res = dcp(lab, "pools", "set", "small", "--type", "t1", "--max", "4", "--provider", "none")
    one_line(res, 1, "dcp-oss pools set: This token may not perform")  # a tenant: admin only
    out = ok(dcp(lab, "pools", "set", "small", "--type", "t1", "--max", "4",
                 "--provider", "none", token=lab.admin))  # fmt: skip
    assert out.startswith("pool small: type t1, warm 0, max 4, provider none"), out
    pool = _json(ok(dcp(lab, "pools", "set", "small", "--warm", "0", "--json", token=lab.admin)),
                 m.Pool)  # fmt: skip
    assert pool.max_size == 4 and pool.instance_type.name == "t1"  # unset options kept
    rows = ok(dcp(lab, "pools", "list")).splitlines()
    assert rows[1].split()[:7] == ["small", "t1", "2", "512", "0.000003", "0", "4"], rows
    assert _json(ok(dcp(lab, "pools", "list", "--json")), list[m.Pool])[0].name == "small"
    _cli("instance-token", "--data", str(lab.data), "vm-a")
    rows = ok(dcp(lab, "instances", "list", token=lab.admin)).splitlines()
    assert rows[0].split()[:3] == ["NAME", "STATE", "POOL"]
    assert any(r.split()[:2] == ["vm-a", "pending"] for r in rows[1:]), rows
    one = _json(ok(dcp(lab, "instances", "show", "vm-a", "--json", token=lab.admin)), m.Instance)
    assert one.name == "vm-a" and one.load is None
    assert "state:     pending" in ok(dcp(lab, "instances", "show", "vm-a", token=lab.admin))
    # a tenant sees only instances its programs use: none
    assert ok(dcp(lab, "instances", "list")).splitlines()[1:] == []
    one_line(dcp(lab, "instances", "show", "vm-a"), 1, "dcp-oss instances show: No such object")
    # drain (admin): a summary line with the elapsed time
    out = ok(dcp(lab, "drain", "vm-a", token=lab.admin)).splitlines()
    assert len(out) == 1 and out[0].startswith("vm-a: ") and " in " in out[0], out


def test_users_limits_and_bill(lab: Lab) -> None:
    uid = ok(dcp(lab, "users", "create", "alice")).split()[-1]
    assert uid.startswith("user_")
    users = _json(ok(dcp(lab, "users", "list", "--json")), list[m.User])
    assert "alice" in {u.name for u in users}
    bad = dcp(lab, "users", "create", "bad name!")
    assert bad.returncode == 2 and "NAME" in bad.stderr and "Traceback" not in bad.stderr
    # a token for alice works and is alice's
    tok = ok(dcp(lab, "users", "token", "alice", "--label", "t")).strip()
    assert tok.startswith("dcp_")
    tf = _token_file(lab, tok, "alice.token")
    assert ok(dcp(lab, "users", "list", "--token-file", tf, env={"DCP_TOKEN": ""}))
    # limits at the three levels; set changes only what it names
    ok(dcp(lab, "limits", "set", "--budget", "500", "--max-instances", "3"))
    ok(dcp(lab, "limits", "set", "--user", "alice", "--hard-budget", "900"))
    prog = _submit(lab, lab.token, ["/bin/true"])
    ok(dcp(lab, "limits", "set", "--program", prog, "--max-storage-mb", "10"))
    acct = _json(ok(dcp(lab, "limits", "show", "--json")), m.LimitsBody)
    assert (acct.budget_micros, acct.max_instances) == (500, 3)
    ok(dcp(lab, "limits", "set", "--clear", "max_instances"))
    acct = _json(ok(dcp(lab, "limits", "show", "--json")), m.LimitsBody)
    assert (acct.budget_micros, acct.max_instances) == (500, None)
    assert "hard budget (micros): 900" in ok(dcp(lab, "limits", "show", "--user", "alice"))
    assert _json(ok(dcp(lab, "limits", "show", "--program", prog, "--json")),
                 m.LimitsBody).max_storage_mb == 10  # fmt: skip
    one_line(dcp(lab, "limits", "show", "--user", "nobody-here"), 1,
             "dcp-oss limits show: no user nobody-here")  # fmt: skip
    assert dcp(lab, "limits", "set").returncode == 2
    assert dcp(lab, "limits", "set", "--budget", "-1").returncode == 2
    # bill: nothing metered yet; the schema and the filters
    out = ok(dcp(lab, "bill")).splitlines()
    assert out[0].split() == ["PROGRAM", "USER", "SECONDS", "RECORDS", "AMOUNT"]
    assert out[-1] == "total 0.000000 (0 records)"
    billed = _json(ok(dcp(lab, "bill", "--user", "alice", "--since", "7d", "--json")), m.Billing)
    assert billed.total_micros == 0 and billed.records == []
    assert _json(ok(dcp(lab, "bill", prog, "--json")), m.Billing).records == []
    res = dcp(lab, "bill", "--since", "yesterday-ish")
    assert res.returncode == 2 and "--since" in res.stderr and "Traceback" not in res.stderr
    assert dcp(lab, "bill", prog, "--user", "alice").returncode == 2


def test_logs_of_a_program(lab: Lab) -> None:
    prog = _submit(lab, lab.token, ["/bin/true"])
    lines = [{"ts": 1700000000.5, "stream": "stdout", "text": "hello", "instance": "vm-x",
              "pid": 7}, {"ts": 1700000001.0, "stream": "log", "text": "note"}]  # fmt: skip
    req = urllib.request.Request(
        lab.url + f"/v1/programs/{prog}/logs", data=json.dumps({"lines": lines}).encode(),
        headers={"Authorization": f"Bearer {lab.token}", "Content-Type": "application/json"},
        method="POST",
    )  # fmt: skip
    urllib.request.urlopen(req, timeout=10).close()
    out = ok(dcp(lab, "logs", prog)).splitlines()
    assert out[:2] == ["22:13:20.500 vm-x 7 stdout hello", "22:13:21.000 - - log note"] or (
        out[0].endswith(" vm-x 7 stdout hello") and out[1].endswith(" - - log note")
    ), out  # (local time)
    got = [m.LogLineOut.model_validate_json(x) for x in ok(dcp(lab, "logs", prog, "--json"))
           .splitlines()]  # fmt: skip
    assert [x.text for x in got][:2] == ["hello", "note"] and len(got) == len(out)
    assert (
        ok(dcp(lab, "logs", prog, "--instance", "vm-x", "--since", "1700000000")).count("\n") == 1
    )
    one_line(dcp(lab, "logs", "nope"), 1, "dcp-oss logs: No such object")


def test_connection_and_token_errors(lab: Lab) -> None:
    # the old spelling: --url and DCP_OSS_URL
    assert ok(dcp(lab, "programs", "list", "--url", lab.url, env={"DCP_OSS": ""}))
    assert ok(dcp(lab, "programs", "list", env={"DCP_OSS": "", "DCP_OSS_URL": lab.url}))
    one_line(dcp(lab, "programs", "list", env={"DCP_OSS": ""}), 2,
             "dcp-oss programs list: give the OSS by --oss URL")  # fmt: skip
    one_line(dcp(lab, "programs", "list", env={"DCP_TOKEN": ""}), 2,
             "dcp-oss programs list: give the account token")  # fmt: skip
    tf = _token_file(lab, lab.token, "acme.token")
    assert ok(dcp(lab, "programs", "list", "--token-file", tf, env={"DCP_TOKEN": ""}))
    os.chmod(tf, 0o640)
    line = one_line(dcp(lab, "programs", "list", "--token-file", tf), 2,
                    "dcp-oss programs list: refusing the token file")  # fmt: skip
    assert "0640" in line and lab.token not in line
    one_line(dcp(lab, "programs", "list", token="dcp_not-a-token"), 1,
             "dcp-oss programs list: Missing or invalid bearer token")  # fmt: skip
    one_line(dcp(lab, "programs", "list", "--oss", "http://127.0.0.1:9"), 3,
             "dcp-oss programs list: cannot reach the OSS")  # fmt: skip
    bad = dcp(lab, "programs", "list", "--state", "sleeping")
    assert bad.returncode == 2 and "sleeping" in bad.stderr


def test_completion_script() -> None:
    e = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "oss", "completion", "bash"],
                         capture_output=True, text=True, env=e, timeout=60)  # fmt: skip
    assert res.returncode == 0 and "_DCP_OSS_COMPLETE" in res.stdout
    e.update(_DCP_OSS_COMPLETE="bash_complete", COMP_WORDS="dcp-oss prog", COMP_CWORD="1")
    res = subprocess.run([sys.executable, "-m", "oss"], capture_output=True, text=True,
                         env=e, timeout=60)  # fmt: skip
    assert "programs" in res.stdout, res
