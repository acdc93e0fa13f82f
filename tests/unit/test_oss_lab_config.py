"""`dcp-oss lab` configuration: the TOML lab file's parsing and validation (no root)."""

import ipaddress
import tomllib
from pathlib import Path
from typing import Any

import pytest

from oss.compute.pool import InstanceType
from oss.lab import LabConfigError, check_files, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "lab.example.toml"


def base(**libvirt: Any) -> dict[str, Any]:
    return {
        "libvirtd": {"netns": "dcp-lab"},
        "libvirt": {"image_dir": "/img", "state_dir": "/state", **libvirt},
    }


def test_the_documented_example_parses() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.libvirtd is not None and cfg.libvirtd.netns == "dcp-lab"
    assert cfg.libvirt.uri == "qemu:///system"
    assert cfg.libvirt.bridge_netns == "dcp-lab"  # follows the daemon's namespace
    assert cfg.guest_netns == "dcp-lab"
    assert cfg.gateway == ipaddress.IPv4Address("10.231.5.1")
    assert cfg.libvirt.image.base == Path("/var/lib/dcp/image/base.qcow2")
    assert [p.name for p in cfg.pools] == ["warm"]
    assert cfg.pools[0].instance_type == InstanceType("tcg-small", 1, 512, 10, None)
    assert (cfg.pools[0].warm_target, cfg.pools[0].max_size) == (1, 4)


def test_defaults_without_pools_or_daemon() -> None:
    cfg = parse_config({"libvirt": {"uri": "qemu:///system", "image_dir": "/i", "state_dir": "/s"}})
    assert cfg.libvirtd is None and cfg.pools == ()
    assert cfg.libvirt.bridge_netns is None
    empty_ns = parse_config({**base(), "libvirtd": {"netns": ""}})
    assert empty_ns.libvirtd is not None and empty_ns.libvirtd.netns is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**base(), "colour": {}}, "unknown table.*colour"),
        ({"libvirtd": {}}, r"\[libvirt\] table is required"),
        ({"libvirt": {"image_dir": "/i", "state_dir": "/s"}}, "libvirt.uri is required"),
        (base(image_dir=None) | {"libvirt": {"state_dir": "/s"}}, "libvirt.image_dir"),
        (base(colour="blue"), "unknown libvirt provider settings: colour"),
        (base(subnet="10.0.0.0/33"), r"\[libvirt\]: bad value"),
        (base(domain_type="xen"), "domain_type"),
        (base(boot_timeout="soon"), "libvirt.boot_timeout: expected float, got 'soon'"),
        (base(manage_bridge="yes"), "libvirt.manage_bridge: expected bool"),
        (base(listen_port=True), "libvirt.listen_port: expected int"),
        (base(uri="qemu+ssh://kvm1/system"), "lab's own daemon is qemu:///system"),
        (base(bridge_netns="other"), "differs from libvirtd.netns"),
        (base(bridge="a-much-too-long-bridge-name"), "bad interface name"),
        ({**base(), "libvirtd": {"netns": "x", "pidfile": "/p"}}, "libvirtd.pidfile: unknown key"),
        ({**base(), "libvirtd": {"start_timeout": 0}}, "libvirtd.start_timeout"),
        ({**base(), "libvirtd": {"netns": "a/b"}}, "bad namespace name"),
        ({**base(), "pools": {"name": "p"}}, r"array of tables"),
        ({**base(), "pools": [{"name": "p"}]}, r"pools\[0\].instance_type: Field required"),
        ({**base(), "pools": [{"name": "p", "instance_type": "t", "size": 3}]}, "size: unknown"),
        ({**base(), "pools": [{"name": "p", "instance_type": "t", "cpus": "2"}]}, "pools.0..cpus"),
        ({**base(), "pools": [{"name": "p", "instance_type": "t", "cpus": 64}]}, "max_cpus"),
        ({**base(), "pools": [{"name": "bad name", "instance_type": "t"}]}, r"pools\[0\].name"),
        (
            {
                **base(),
                "pools": [{"name": "p", "instance_type": "t", "warm_target": 5, "max_size": 2}],
            },
            "warm_target 5 > max_size 2",
        ),
        (
            {**base(), "pools": [{"name": "p", "instance_type": "t"}] * 2},
            "pool 'p' is defined twice",
        ),
        (
            {
                **base(),
                "pools": [
                    {"name": "p", "instance_type": "t", "cpus": 1},
                    {"name": "q", "instance_type": "t", "cpus": 2},
                ],
            },
            "instance type 't' is defined differently",
        ),
    ],
)
def test_bad_input_is_one_clear_error(data: dict[str, Any], message: str) -> None:
    with pytest.raises(LabConfigError, match=message) as info:
        parse_config(data)
    assert info.value.message.startswith("Bad lab configuration: ")
    assert "\n" not in info.value.message


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(LabConfigError, match="nope.toml: no such file"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[libvirt\n")
    with pytest.raises(LabConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text(
        '[libvirt]\nuri = "qemu:///system"\nimage_dir = "/i"\nstate_dir = "/s"\nx = 1\n'
    )
    with pytest.raises(
        LabConfigError, match="unknown.toml: .*unknown libvirt provider settings: x"
    ):
        load_config(unknown)


def test_missing_image_files_are_found_before_anything_starts(tmp_path: Path) -> None:
    cfg = parse_config(base(image_dir=str(tmp_path)))
    with pytest.raises(LabConfigError, match="base.qcow2 does not exist"):
        check_files(cfg)
    for f in ("base.qcow2", "vmlinuz"):
        (tmp_path / f).write_bytes(b"x")
    check_files(cfg)  # all there now
    remote = parse_config(
        {"libvirt": {"uri": "qemu+ssh://kvm1/system", "image_dir": "/x", "state_dir": "/s"}}
    )
    check_files(remote)  # files on another host are not checked here


def test_example_is_valid_toml_with_only_known_tables() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    assert set(data) == {"libvirtd", "libvirt", "pools"}
