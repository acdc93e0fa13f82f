"""The web view (issue 16) in a real headless Chromium, on a program run by
`dcptrace --oss` across two real loopback agents; and the `dcp-oss` commands on that
same program (its processes on their instances, its log).

Screenshots are kept under the directory the test prints (DCP_ARTIFACTS, default
/tmp/dcp-artifacts, then web/).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import dcptrace_argv, traced_env, wait_for
from tests.integration.test_dcptrace_oss import Lab, start_lab
from tests.integration.test_oss_cli_ops import dcp, ok

pytestmark = [pytest.mark.usefixtures("has_ptrace"), pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 60  # s: a bound on each wait for the page, not a speed assertion

# Two placed processes, the second only once the test says so (a line in a fifo: `read`
# is the shell's own, so waiting places nothing), each on the other instance (spread);
# then the program waits for the end.
SCRIPT = "/bin/echo one; read x < go; /bin/echo two; read x < end"


def _release(lab: Lab, fifo: str, within: float = WAIT) -> bool:
    """Write a line to the fifo the program waits on (False: nobody reads it in time)."""
    fd: list[int] = []

    def opened() -> bool:
        try:
            fd.append(os.open(lab.data / fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: the program is not at its read yet
            return False
        return True

    if not wait_for(opened, within):
        return False
    try:
        os.write(fd[0], b"\n")
    finally:
        os.close(fd[0])
    return True


ARTIFACTS = Path(os.environ.get("DCP_ARTIFACTS", "/tmp/dcp-artifacts")) / "web"


@pytest.fixture(scope="module")
def artifacts(request: pytest.FixtureRequest) -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nweb view screenshots: {ARTIFACTS}")
    return ARTIFACTS


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install '.[test]')")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} is missing (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--no-first-run"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two loopback agents (n0, n1) registered with a loopback dcp-oss serve."""
    lab = Lab(tmp_path_factory.mktemp("web"))
    try:
        start_lab(lab, "127.0.0.1", {n: ("127.0.0.1:0", "") for n in ("n0", "n1")})
        yield lab
    finally:
        lab.stop()


def _js(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


def _until(driver: Any, script: str, what: str) -> Any:
    """Wait (bounded) until `script` returns something true in the page; return it."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(
            lambda d: d.execute_script(script), message=what
        )
    except TimeoutException:
        driver.save_screenshot(str(ARTIFACTS / "failed.png"))
        console = "\n".join(str(x) for x in driver.get_log("browser"))
        raise AssertionError(f"{what}: not seen (page console: {console or 'empty'})") from None


def _fetch_status(driver: Any, path: str) -> int:
    """The status the page gets for `path` with no token (fetch from the page itself)."""
    return int(
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            f"fetch({path!r}).then(r => done(r.status), () => done(-1));"
        )
    )


def _processes(lab: Lab) -> list[dict[str, Any]]:
    progs = lab.get("/v1/programs")
    if not progs:
        return []
    return lab.get(f"/v1/programs/{progs[0]['id']}/processes")["processes"]  # type: ignore


def test_the_web_view_shows_a_program_live_and_refuses_without_a_token(
    lab: Lab, browser: Any, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    for fifo in ("go", "end"):
        os.mkfifo(lab.data / fifo, 0o600)
    env = dict(traced_env(), DCP_TOKEN=lab.token)
    env.pop("DCP_OSS_FALLBACK", None)
    run = subprocess.Popen(
        [*dcptrace_argv("--no-state", "--oss", lab.url, "--placement", "spread"),
         "--", "sh", "-c", SCRIPT],
        cwd=lab.data, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    released: list[str] = []
    try:
        assert wait_for(lambda: len(_processes(lab)) == 1, WAIT), _processes(lab)
        d = browser
        # No token: the form, no data; the API refuses the page's token-less requests.
        d.get(lab.url + "/ui")
        _until(d, "return !document.getElementById('login').hidden", "the token form")
        assert _js(d, "return document.getElementById('app').hidden") is True
        assert _fetch_status(d, "/v1/programs") == 401
        assert _fetch_status(d, "/v1/events") == 401
        d.save_screenshot(str(artifacts / "1-no-token.png"))
        # A wrong token: refused, back at the form with the reason.
        d.find_element(By.ID, "token").send_keys("dcp_wrong")
        d.find_element(By.CSS_SELECTOR, "#login-form button").click()
        refused = _until(
            d, "return document.getElementById('login-error').textContent", "a refusal"
        )
        assert refused.startswith("refused:"), refused
        assert _js(d, "return sessionStorage.getItem('dcp-token')") is None
        d.save_screenshot(str(artifacts / "2-refused.png"))
        # The real token: the program, its one process as a bar on its instance.
        d.find_element(By.ID, "token").send_keys(lab.token)
        d.find_element(By.CSS_SELECTOR, "#login-form button").click()
        assert lab.token not in d.current_url
        first = _until(
            d,
            "const t = window.dcpTimeline; return t && t.total === 1 && t.bars[0];",
            "one process on the timeline",
        )
        (row,) = _processes(lab)  # as the agents reported it
        assert (first["instance"], first["pid"]) == (row["instance"], row["pid"])
        assert first["instance"] in ("n0", "n1") and first["state"] == "exited"
        _until(d, "return document.getElementById('live').textContent === 'live'", "live")
        d.save_screenshot(str(artifacts / "3-one-process.png"))
        # A new process is placed: the page shows it without being reloaded.
        _js(d, "window.notReloaded = true")
        assert _release(lab, "go")
        released.append("go")
        both = _until(
            d,
            "const t = window.dcpTimeline; return t && t.total === 2 && t.instances;",
            "the second process on the timeline",
        )
        assert sorted(both) == ["n0", "n1"]  # spread: one on each instance
        bars = _js(d, "return window.dcpTimeline.bars.map(b => [b.instance, b.pid])")
        rows = [(r["instance"], r["pid"]) for r in _processes(lab)]
        assert sorted(map(tuple, bars)) == sorted(rows)
        assert _js(d, "return window.notReloaded") is True
        summary = d.find_element(By.ID, "tl-summary").text
        assert summary.startswith("2 processes on 2 instances"), summary
        d.save_screenshot(str(artifacts / "4-two-processes.png"))
        # Spend; the log with a filter.
        d.find_element(By.CSS_SELECTOR, "button[data-tab=spend]").click()
        spent = _until(d, "return document.getElementById('spend-summary').textContent", "spend")
        assert spent.startswith("account acme: spent "), spent
        d.save_screenshot(str(artifacts / "6-spend.png"))
        d.find_element(By.CSS_SELECTOR, "button[data-tab=log]").click()
        d.find_element(By.ID, "f-stream").send_keys("stdout")
        lines = _until(
            d,
            "const r = [...document.querySelectorAll('#log-rows .row')].map(x => x.textContent);"
            "return r.length >= 2 && r;",
            "the program's output in the log",
        )
        assert all(" stdout " in ln for ln in lines), lines
        assert sorted(ln.rsplit(" ", 1)[1] for ln in lines) == ["one", "two"], lines
        d.save_screenshot(str(artifacts / "7-log.png"))
        # Signing out forgets the token.
        d.find_element(By.ID, "signout").click()
        assert _js(d, "return sessionStorage.getItem('dcp-token')") is None
        # The operator (admin token) sees every instance with its load and heartbeat (a
        # tenant sees those its programs run on now).
        d.find_element(By.ID, "token").send_keys(lab.admin)
        d.find_element(By.CSS_SELECTOR, "#login-form button").click()
        d.find_element(By.CSS_SELECTOR, "button[data-tab=instances]").click()
        rows = _until(
            d,
            "const r = [...document.querySelectorAll('#instances-rows .row')];"
            "return r.length === 2 && r.map(x => x.textContent.split(/ +/));",
            "two instance rows",
        )
        assert [r[:2] for r in rows] == [["n0", "ready"], ["n1", "ready"]], rows
        assert all(r[7].endswith("s") and r[4] != "-" for r in rows), rows  # age, cpu%
        # each row's CPU sparkline gathers a sample per heartbeat while the tab is open
        _until(
            d,
            "return [...document.querySelectorAll('#instances-rows canvas.spark')]"
            ".every(c => Number(c.dataset.samples) >= 3)",
            "three load samples per instance",
        )
        d.save_screenshot(str(artifacts / "8-instances.png"))
        # No script error on the way (the refused requests are the only complaints).
        errors = [
            e["message"] for e in d.get_log("browser")
            if e["level"] == "SEVERE" and "status of 401" not in e["message"]
        ]  # fmt: skip
        assert errors == [], errors
    finally:
        for fifo in ("go", "end"):
            if fifo not in released and not _release(lab, fifo, 10):
                run.kill()  # it did not get that far
                break
        try:
            out, err = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert run.returncode == 0, err.decode()
    assert out.decode() == "one\ntwo\n"


def test_the_commands_on_a_program_that_ran(lab: Lab) -> None:
    """`programs show`, `logs`, `instances list` on the run of the test above."""
    prog = lab.get("/v1/programs")[0]["id"]
    assert wait_for(lambda: len(_processes(lab)) == 2 and all(
        p["state"] == "exited" for p in _processes(lab)), WAIT)  # fmt: skip
    text = ok(dcp(lab, "programs", "show", prog))
    table = text.split("\n\n", 1)[1].splitlines()
    assert table[0].split()[:4] == ["INSTANCE", "PID", "PARENT", "STATE"]
    assert sorted(r.split()[0] for r in table[1:]) == ["n0", "n1"]
    assert all(r.split()[3] == "exited" for r in table[1:]), table
    out = ok(dcp(lab, "logs", prog, "--stream", "stdout")).splitlines()
    assert [ln.split()[4] for ln in out] == ["one", "two"], out  # in time order
    assert sorted(ln.split()[1] for ln in out) == ["n0", "n1"], out
    only = ok(dcp(lab, "logs", prog, "--stream", "stdout", "--instance", "n1")).splitlines()
    assert [ln.split()[1] for ln in only] == ["n1"]
    rows = ok(dcp(lab, "instances", "list", token=lab.admin)).splitlines()
    assert [r.split()[:2] for r in rows[1:]] == [["n0", "ready"], ["n1", "ready"]]
    assert rows[0].split()[6:9] == ["CPU%", "RUNQ", "HEARTBEAT"]
    assert all(r.split()[8].endswith("s") and r.split()[6] != "-" for r in rows[1:]), rows
