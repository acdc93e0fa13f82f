"""Attack: sloppy types at the API boundary, and a URL the parser chokes on.

Before: "5" and true were taken as integers, and a 100 KB URL made aiohttp log
a traceback at ERROR.  After: request bodies are validated strictly (422), and
an over-long request line gets a plain 400 with one log line, no traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from attack import as_nobody, require_attacker
from ossproc import OssProcess

pytestmark = pytest.mark.security

PROBE = r"""
import json, sys, urllib.request, urllib.error
url, token = sys.argv[1:3]
def call(method, path, body=None, auth=True):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    if auth:
        req.add_header("Authorization", "Bearer " + token)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
out = {
    "string_int": call("POST", "/v1/programs", {"argv": ["true"], "processes": "5"}),
    "bool_int": call("POST", "/v1/programs", {"argv": ["true"], "processes": True}),
    "float_int": call("POST", "/v1/programs", {"argv": ["true"], "processes": 5.0}),
    "int_string": call("POST", "/v1/programs", {"argv": [5]}),
    "string_bool": call("PUT", "/v1/policies", {"scaling_policy": {"min_instances": "1"}}),
    "proper": call("POST", "/v1/programs", {"argv": ["true"], "processes": 1}),
    "long_url": call("GET", "/v1/programs?x=" + "a" * 100_000, auth=False),
    "after": call("GET", "/healthz", auth=False),
}
print(json.dumps(out))
"""


@pytest.fixture
def oss() -> Iterator[OssProcess]:
    require_attacker()
    srv = OssProcess(log_level="DEBUG")
    try:
        yield srv
    finally:
        srv.cleanup()


def test_strict_types_and_a_long_url(oss: OssProcess) -> None:
    token = oss.account("tenant")
    got = as_nobody(PROBE, oss.url, token)
    assert got.returncode == 0, got.stderr
    res = json.loads(got.stdout)
    for case in ("string_int", "bool_int", "float_int", "int_string", "string_bool"):
        assert res[case] == 422, (case, res)
    assert res["proper"] == 200
    assert res["long_url"] in (400, 414), res
    assert res["after"] == 200
    log = oss.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert "LineTooLong" in log  # one line saying what was refused
