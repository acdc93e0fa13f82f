"""`dcp-oss` command line: flags and the --provider loader (no server started)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from oss.cli import load_provider, main

PROVIDER_MODULE = """
class Good:
    async def create(self, name, instance_type, credentials):
        pass

    async def destroy(self, name):
        pass


class Sync:
    def create(self, name, instance_type, credentials):
        pass

    def destroy(self, name):
        pass
"""


def test_load_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fake_provider_mod.py").write_text(PROVIDER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    name, prov = load_provider("local=fake_provider_mod:Good")
    assert name == "local" and type(prov).__name__ == "Good"
    with pytest.raises(click.BadParameter, match="no async create"):
        load_provider("x=fake_provider_mod:Sync")
    with pytest.raises(click.BadParameter, match="NAME=MODULE:FACTORY"):
        load_provider("fake_provider_mod:Good")
    with pytest.raises(click.BadParameter, match="ModuleNotFoundError"):
        load_provider("x=no_such_module_here:Good")


def test_bad_flags_are_usage_errors(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["serve", "--data", str(tmp_path), "--listen", "nope"])
    assert r.exit_code == 2 and "HOST:PORT" in r.output
    r = CliRunner().invoke(main, ["serve", "--data", str(tmp_path), "--heartbeat-timeout", "0.1"])
    assert r.exit_code == 2 and "heartbeat_timeout" in r.output
    r = CliRunner().invoke(main, ["serve", "--data", str(tmp_path), "--move-min-gain", "1"])
    assert r.exit_code == 2 and "min_gain must be above 1" in r.output  # issue 12


def test_account_and_instance_token_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["account", "create", "--data", str(tmp_path), "--admin", "root"])
    assert r.exit_code == 0 and r.stdout.strip().startswith("dcp_")
    again = runner.invoke(main, ["account", "create", "--data", str(tmp_path), "root"])
    assert again.exit_code == 1 and "exists" in again.output
    t = runner.invoke(main, ["instance-token", "--data", str(tmp_path), "vm1"])
    assert t.exit_code == 0 and t.stdout.strip().startswith("dcpi_")
    bad = runner.invoke(main, ["instance-token", "--data", str(tmp_path), "--pool", "nope", "vm2"])
    assert bad.exit_code == 1 and "pool nope" in bad.output
