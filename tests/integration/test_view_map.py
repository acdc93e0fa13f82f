"""`--map` holds for placed processes: their instance's tracer applies the program's view.

The view travels with each placed process (deputy `--view`, HELLO `view`) and is
trusted only through its exec ticket, which binds its digest: a forged view and
a ticket of the old format are refused.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import traced
from vmagent.cluster.local import LocalCluster
from vmagent.exec import tickets
from vmagent.exec.remote import TicketDrop, deputy_command
from vmagent.exec.view import View

pytestmark = pytest.mark.usefixtures("has_ptrace")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "a").write_text("alpha\n")
    return d


def test_a_placed_cat_reads_through_the_map(data: Path) -> None:
    script = "/bin/cat /mnt/v/a"
    local = traced(["sh", "-c", script], "--no-state", "--map", f"/mnt/v={data}")
    placed = traced(
        ["sh", "-c", script], "--no-state", "--instances", "2", "--placement", "spread",
        "--map", f"/mnt/v={data}",
        timeout=120,
    )  # fmt: skip
    assert local.returncode == 0, local.stderr
    assert placed.returncode == 0, placed.stderr
    assert placed.stdout == local.stdout == b"alpha\n"


def test_a_placed_shell_cds_into_the_map(data: Path) -> None:
    # The inner sh is placed; cd, pwd and the relative cat all go through the view.
    script = "/bin/sh -c 'cd /mnt/v && pwd && cat a && /bin/pwd'"
    local = traced(["sh", "-c", script], "--no-state", "--map", f"/mnt/v={data}")
    placed = traced(
        ["sh", "-c", script], "--no-state", "--instances", "2", "--placement", "spread",
        "--map", f"/mnt/v={data}",
        timeout=120,
    )  # fmt: skip
    assert local.returncode == 0, local.stderr
    assert placed.returncode == 0, placed.stderr
    assert placed.stdout == local.stdout == b"/mnt/v\nalpha\n/mnt/v\n"


@pytest.fixture
def instance() -> Iterator[tuple[LocalCluster, TicketDrop]]:
    drop = TicketDrop()
    with LocalCluster(1, isolate=False) as c:
        yield c, drop
        c.remove_logs()
    drop.close()


def test_a_forged_view_and_an_old_ticket_are_refused(
    data: Path, instance: tuple[LocalCluster, TicketDrop]
) -> None:
    cluster, drop = instance
    inst = cluster.instances[0]
    argv = (b"/bin/cat", b"/mnt/v/a")
    view = View.of("", {"/mnt/v": str(data)})
    forged = View.of("", {"/mnt/v": "/etc"})
    uid, gid = os.getuid(), os.getgid()
    groups = tuple(os.getgroups())

    def ticket() -> str:
        return tickets.mint(
            inst.token, inst.name, uid=uid, gid=gid, groups=groups,
            digest=tickets.exec_digest(argv[0], argv), view=view.digest(),
        )  # fmt: skip

    def deputy(ticket: str, view_hex: str) -> subprocess.CompletedProcess[bytes]:
        cmd = deputy_command(drop, inst.address, inst.name, ticket, argv[0], argv, view=view_hex)
        return subprocess.run(cmd, capture_output=True, timeout=60)

    # As vouched: the instance's tracer maps /mnt/v for the placed cat.
    ok = deputy(ticket(), view.hex())
    assert (ok.returncode, ok.stdout) == (0, b"alpha\n"), ok.stderr
    bad = deputy(ticket(), forged.hex())
    assert bad.returncode != 0 and bad.stdout == b"", bad
    assert b"cannot be widened" in bad.stderr, bad.stderr
    # The old format (v2: no program, no view) is refused whatever view it comes with.
    public = tickets.split(ticket())[0].split(".")
    old_public = ".".join(["v2", *public[1:9]])
    old = f"{old_public}.{tickets.secret_of(inst.token, old_public, inst.name)}"
    refused = deputy(old, view.hex())
    assert refused.returncode != 0 and refused.stdout == b"", refused
    assert b"old format" in refused.stderr, refused.stderr
