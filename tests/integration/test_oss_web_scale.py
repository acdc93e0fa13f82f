"""The web view at scale (issue 16): 1,000 instances and one program of 10,000 processes
(running, exited, failed, lost, migrated, placed from other instances) in a real OSS on
loopback, shown by a real headless Chromium.

The page must show them all (the timeline counts 10,000 bars over 1,000 instances, the
instance list 1,000 rows) while drawing only what is visible.  How long it takes is
measured and printed (and kept as scale.json beside the screenshots), never asserted.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest_oss import Account, OssServer

from oss.compute.instances import mint_instance
from oss.db.store import Conn
from tests.integration.test_oss_web import _until, artifacts, browser  # noqa: F401

pytestmark = pytest.mark.slow

INSTANCES = 1000
PROCESSES = 10_000


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OssServer, Account, str]]:
    srv = OssServer(tmp_path_factory.mktemp("scale")).start()
    try:
        op = srv.account("op", admin=True)
        prog = srv.http("POST", "/v1/programs", op.token, {"argv": ["make", "-j64"]}).body["id"]
        t0 = srv.oss.clock()
        rnd = random.Random(16)

        def seed(c: Conn) -> None:
            for i in range(INSTANCES):
                name = f"vm{i:04d}"
                mint_instance(c, name, None, f"tok{i}", t0)
                c.execute(
                    "UPDATE instances SET state='ready', cpus=4, memory_mb=8192, slots=16,"
                    " used_slots=?, address=?, hostname=?, last_heartbeat=? WHERE name=?",
                    (i % 16, f"10.0.{i // 250}.{i % 250}:7070", name, t0, name),
                )
            rows = []
            moved: tuple[int, float] | None = None  # (pid, when) of the last migrated one
            for n in range(PROCESSES):
                inst = f"vm{n % INSTANCES:04d}"
                started = t0 - 600 + rnd.random() * 580
                kind = n % 10
                ended = None if kind == 0 else started + rnd.random() * 20
                state = {0: "running", 8: "lost", 9: "migrated"}.get(kind, "exited")
                pid = 1000 + n
                if kind == 0 and moved is not None:  # the process migrated just before
                    pid, started = moved
                moved = (pid, ended) if kind == 9 and ended is not None else None
                parent = (f"vm{(n // 2) % INSTANCES:04d}", 1000 + n // 2) if n % 3 == 0 else None
                rows.append((
                    prog, inst, pid, started, parent and parent[0], parent and parent[1],
                    json.dumps(["cc", f"f{n}.c"]), ended, 1 if kind == 7 else 0, state,
                    f"vm{(n + 1) % INSTANCES:04d}" if state == "migrated" else None,
                ))  # fmt: skip
            c.executemany(
                "INSERT INTO processes(program_id, instance, pid, started, parent_instance,"
                " parent_pid, argv, ended, exit_status, state, moved_to)"
                " VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )

        srv.call(srv.oss.store.write(seed))
        yield srv, op, prog
    finally:
        srv.stop()


def test_a_thousand_instances_and_ten_thousand_processes(
    big: tuple[OssServer, Account, str],
    browser: Any,  # noqa: F811
    artifacts: Path,  # noqa: F811
) -> None:
    from selenium.webdriver.common.by import By

    srv, op, prog = big
    d = browser
    d.get(srv.url + "/ui")
    _until(d, "return !document.getElementById('login').hidden", "the token form")
    d.execute_script(
        "window.longest = 0; new PerformanceObserver(l => l.getEntries().forEach(e => "
        "window.longest = Math.max(window.longest, e.duration))).observe({type: 'longtask'});"
        "window.t0 = performance.now();"
    )
    d.find_element(By.ID, "token").send_keys(op.token)
    d.find_element(By.CSS_SELECTOR, "#login-form button").click()
    names = _until(
        d,
        f"const t = window.dcpTimeline; return t && t.total === {PROCESSES} && t.instances;",
        "10,000 processes on the timeline",
    )
    shown_ms = d.execute_script("return performance.now() - window.t0")
    assert len(names) == INSTANCES
    drawn = d.execute_script("return window.dcpTimeline.bars.length")
    assert 0 < drawn < PROCESSES  # only the visible lanes are drawn
    arrows = d.execute_script("return window.dcpTimeline.arrows")
    assert arrows["placement"] > 0 and arrows["migration"] > 0, arrows
    draw_ms = d.execute_script(
        "const t = performance.now(); for (let i = 0; i < 10; i++) drawTimeline();"
        "return (performance.now() - t) / 10;"
    )
    # scrolled to the end: the last instance's lanes are drawn
    d.execute_script(
        "const s = document.getElementById('timeline-scroll'); s.scrollTop = s.scrollHeight;"
        "drawTimeline();"
    )
    last = d.execute_script("return window.dcpTimeline.bars.map(b => b.instance)")
    assert f"vm{INSTANCES - 1:04d}" in last
    summary = d.find_element(By.ID, "tl-summary").text
    assert summary.startswith(f"{PROCESSES} processes on {INSTANCES} instances: "), summary
    d.save_screenshot(str(artifacts / "scale-timeline.png"))
    d.find_element(By.CSS_SELECTOR, "button[data-tab=instances]").click()
    _until(
        d,
        f"return document.getElementById('instances-count').textContent === '({INSTANCES})'",
        "1,000 instances",
    )
    rows = d.execute_script("return document.querySelectorAll('#instances-rows .row').length")
    assert 0 < rows < INSTANCES  # virtual rows: only what fits
    d.execute_script(
        "const s = document.getElementById('instances-scroll'); s.scrollTop = s.scrollHeight;"
        "drawInstances();"
    )
    tail = d.execute_script(
        "const r = document.querySelectorAll('#instances-rows .row');"
        "return r[r.length - 1].textContent.split(' ')[0]"
    )
    assert tail == f"vm{INSTANCES - 1:04d}"
    d.save_screenshot(str(artifacts / "scale-instances.png"))
    errors = [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
    longest = d.execute_script("return window.longest")
    figures = {
        "instances": INSTANCES,
        "processes": PROCESSES,
        "login_to_full_timeline_ms": round(shown_ms),
        "timeline_redraw_ms": round(draw_ms, 1),
        "longest_main_thread_task_ms": round(longest),
    }
    (artifacts / "scale.json").write_text(json.dumps(figures, indent=2))
    print(f"web view at scale: {figures}")
