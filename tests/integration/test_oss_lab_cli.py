"""`dcp-oss lab` bad input: one clear error line, a non-zero exit, in bounded time.

Real subprocesses of the CLI; none of these cases needs root or starts a daemon
(the unreachable URI is loopback port 1, where nothing listens).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def lab(tmp_path: Path, toml: str | None) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "lab.toml"
    if toml is not None:
        cfg.write_text(toml)
    return subprocess.run(
        [sys.executable, "-m", "oss", "lab", "--config", str(cfg), "--data", str(tmp_path / "d")],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,  # every case must fail well before this
        cwd=tmp_path,
    )


def image(tmp_path: Path) -> Path:
    d = tmp_path / "image"
    d.mkdir()
    for f in ("base.qcow2", "vmlinuz"):
        (d / f).write_bytes(b"x")
    return d


def one_error_line(res: subprocess.CompletedProcess[str], text: str) -> None:
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert text in lines[0], lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_missing_file(tmp_path: Path) -> None:
    one_error_line(lab(tmp_path, None), "lab.toml: no such file")


def test_unknown_key(tmp_path: Path) -> None:
    res = lab(
        tmp_path,
        f'[libvirt]\nuri = "qemu:///system"\nimage_dir = "{image(tmp_path)}"\n'
        f'state_dir = "{tmp_path}/s"\nbrige = "dcpbr0"\n',
    )
    one_error_line(res, "unknown libvirt provider settings: brige")


def test_missing_image_dir(tmp_path: Path) -> None:
    res = lab(
        tmp_path,
        f'[libvirtd]\nnetns = "dcp-never"\n[libvirt]\nimage_dir = "{tmp_path}/none"\n'
        f'state_dir = "{tmp_path}/s"\n',
    )
    one_error_line(res, f"guest image file {tmp_path}/none/base.qcow2 does not exist")
    assert not Path("/run/netns/dcp-never").exists()  # nothing was started


def test_unreachable_uri(tmp_path: Path) -> None:
    pytest.importorskip("libvirt", reason="libvirt-python is not installed (pip install '.[vm]')")
    res = lab(
        tmp_path,
        f'[libvirt]\nuri = "qemu+tcp://127.0.0.1:1/system"\nimage_dir = "{image(tmp_path)}"\n'
        f'state_dir = "{tmp_path}/s"\nbridge = "dcpbrnever"\ncall_timeout = 20.0\n',
    )
    one_error_line(res, "cannot reach libvirt at qemu+tcp://127.0.0.1:1/system")
    assert not (tmp_path / "s").exists()  # failed before staging anything


def test_retire_marks_only_the_lab_pools_live_instances_destroyed(tmp_path: Path) -> None:
    """What start-up (leftovers of a killed lab) and shutdown do to the store."""
    import asyncio

    from oss.compute.instances import Instances
    from oss.compute.pool import InstanceType
    from oss.db.store import Store
    from oss.lab import retire_instances
    from oss.schema import VERSIONS

    async def go() -> dict[str, str]:
        s = Store(tmp_path, VERSIONS)
        await s.open()
        try:
            inst = Instances(s)
            await inst.put_instance_type(InstanceType("t", 1, 512, 0))
            await inst.put_pool("warm", "t", 2, 2, "libvirt")
            await inst.put_pool("other", "t", 1, 1, "local")
            booting, _ = await inst.new_pool_instance("warm")
            ready, _ = await inst.new_pool_instance("warm")
            await inst.register_instance(ready, "10.0.0.2:7070", ready, 1, 512, 4)
            elsewhere, _ = await inst.new_pool_instance("other")
            retired = await retire_instances(inst, "lab restarted")
            assert sorted(retired) == sorted([booting, ready])
            assert await retire_instances(inst, "again") == []  # idempotent
            rows = await inst.instances(None)
            return {r["name"]: r["state"] for r in rows} | {"_other": elsewhere}
        finally:
            await s.close()

    states = asyncio.run(go())
    other = states.pop("_other")
    assert states.pop(other) == "pending"  # another provider's pool is not the lab's
    assert set(states.values()) == {"destroyed"}
