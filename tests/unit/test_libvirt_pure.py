"""The libvirt provider's pure parts: URIs, names, addresses, MACs, XML."""

import ipaddress
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from images.guestinit import CONFIG_BYTES, CONFIG_SERIAL, parse_config
from net.bridge import BadName, check_ifname
from oss.compute.providers.domain import (
    AddressBook,
    BadInstance,
    BadUri,
    DomainSpec,
    DomainType,
    GuestImage,
    LibvirtConfig,
    NoAddress,
    check_name,
    config_disk,
    config_from_mapping,
    config_volume_xml,
    domain_xml,
    kernel_cmdline,
    mac_for,
    overlay_xml,
    parse_uri,
    pool_xml,
)

IMG = GuestImage(Path("/s/base.qcow2"), Path("/s/vmlinuz"), Path("/s/initrd.img"))


@pytest.mark.parametrize(
    ("uri", "remote", "host", "transport"),
    [
        ("qemu:///system", False, None, None),
        ("qemu:///session", False, None, None),
        ("qemu+ssh://root@kvm1.lab/system", True, "kvm1.lab", "ssh"),
        ("qemu+ssh://kvm2.lab:2222/system?keyfile=/k", True, "kvm2.lab", "ssh"),
        ("qemu+tcp://127.0.0.1:16509/system", False, "127.0.0.1", "tcp"),
        ("qemu+tls://kvm3.lab/system", True, "kvm3.lab", "tls"),
    ],
)
def test_uris(uri: str, remote: bool, host: str | None, transport: str | None) -> None:
    info = parse_uri(uri)
    assert info.remote is remote
    assert info.host == host
    assert info.transport == transport


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "no scheme"),
        ("xen:///system", "only the qemu driver"),
        ("qemu+carrier://h/system", "unknown transport"),
        ("qemu:///nope", "/system or /session"),
        ("qemu+ssh:///system", "needs a host"),
    ],
)
def test_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(BadUri, match=message):
        parse_uri(uri)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(BadUri):
        LibvirtConfig(uri="lxc:///", image=IMG, state_dir=Path("/s"))
    with pytest.raises(BadInstance, match="domain_type"):
        LibvirtConfig(uri="qemu:///system", image=IMG, state_dir=Path("/s"), domain_type="xen")
    with pytest.raises(BadName):
        LibvirtConfig(uri="qemu:///system", image=IMG, state_dir=Path("/s"), bridge="x" * 16)


def test_config_from_mapping() -> None:
    cfg = config_from_mapping(
        {
            "uri": "qemu+ssh://h/system",
            "image_dir": "/img",
            "state_dir": "/var/lib/dcp",
            "subnet": "10.9.0.0/24",
            "manage_bridge": False,
        }
    )
    assert cfg.image.base == Path("/img/base.qcow2")
    assert cfg.subnet == ipaddress.IPv4Network("10.9.0.0/24")
    with pytest.raises(BadInstance, match="unknown libvirt provider settings: colour"):
        config_from_mapping(
            {"uri": "qemu:///system", "image_dir": "/i", "state_dir": "/s", "colour": "red"}
        )


def test_names() -> None:
    check_name("vm-1")
    check_name("warm-1a2b3c")
    for bad in ("", "-x", "x" * 64, "a b", "a/b", "a;b"):
        with pytest.raises(BadInstance):
            check_name(bad)
    check_ifname("dcpbr0")
    with pytest.raises(BadName):
        check_ifname("a/b")


def test_macs_are_stable_local_and_distinct() -> None:
    a = mac_for("vm1")
    assert a == mac_for("vm1") and a.startswith("52:54:00:")
    assert mac_for("vm1", taken=[a]) != a
    macs = {mac_for(f"vm{i}") for i in range(50)}
    assert len(macs) == 50


def test_address_book() -> None:
    book = AddressBook(ipaddress.IPv4Network("10.231.5.0/29"), first=4)
    assert str(book.gateway) == "10.231.5.1/29"
    a = book.lease("a")
    assert str(a) == "10.231.5.4/29" and book.lease("a") == a
    b, c = book.lease("b"), book.lease("c")
    assert len({a, b, c}) == 3
    with pytest.raises(NoAddress):
        book.lease("d")
    book.release("b")
    assert book.lease("d") == b


def test_kernel_cmdline_follows_contract_and_carries_no_secret() -> None:
    line = kernel_cmdline(
        "vm1",
        "http://10.231.5.1:8080",
        ipaddress.IPv4Interface("10.231.5.10/24"),
        ipaddress.IPv4Address("10.231.5.1"),
        7070,
        extra="dcp.ssh=1",
        config_disk=True,
    )
    words = line.split()
    assert {"console=ttyS0", "panic=-1", "root=/dev/vda"} <= set(words)
    i = words.index("dcp.oss=http://10.231.5.1:8080")
    assert words[i : i + 6] == [
        "dcp.oss=http://10.231.5.1:8080",
        "dcp.instance=vm1",
        "dcp.config=disk",
        "dcp.ip=10.231.5.10/24",
        "dcp.gw=10.231.5.1",
        "dcp.listen=0.0.0.0:7070",
    ]
    assert words[-1] == "dcp.ssh=1"
    assert not [w for w in words if w.startswith("dcp.token")]
    with pytest.raises(BadInstance, match="must not carry dcp.token"):
        kernel_cmdline(
            "vm1",
            None,
            ipaddress.IPv4Interface("10.0.0.2/24"),
            ipaddress.IPv4Address("10.0.0.1"),
            7070,
            extra="dcp.ssh=1 dcp.token=leak",
        )


def test_config_disk_carries_the_token_for_the_guest_init() -> None:
    data = config_disk("vm1", "dcpi_abc=+/")
    assert len(data) == CONFIG_BYTES and len(data) % 512 == 0
    assert parse_config(data) == {"token": "dcpi_abc=+/"}
    assert parse_config(config_disk("vm1", None)) == {}
    with pytest.raises(BadInstance, match="token"):
        config_disk("vm1", "two words")
    with pytest.raises(BadInstance, match="token"):
        config_disk("vm1", "x" * 513)


def _spec(dtype: DomainType) -> DomainSpec:
    return DomainSpec(
        name="dcp-vm1",
        domain_type=dtype,
        cpus=1,
        memory_mb=512,
        image=IMG,
        disk=Path("/s/overlays/dcp-vm1.qcow2"),
        cmdline="console=ttyS0 dcp.instance=vm1",
        mac="52:54:00:01:02:03",
        bridge="dcpbr0",
        serial_log=Path("/s/serial/vm1.log"),
    )


def test_domain_xml_tcg() -> None:
    root = ET.fromstring(domain_xml(_spec(DomainType.QEMU)))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "dcp-vm1"
    assert root.findtext("os/kernel") == "/s/vmlinuz"
    assert root.findtext("os/initrd") == "/s/initrd.img"
    assert root.findtext("os/cmdline") == "console=ttyS0 dcp.instance=vm1"
    assert root.find("features/acpi") is not None
    assert root.find("devices/graphics") is None
    assert root.find("cpu/model").text == "qemu64"  # type: ignore[union-attr]
    assert root.find("devices/disk/source").get("file") == "/s/overlays/dcp-vm1.qcow2"  # type: ignore[union-attr]
    assert root.find("devices/interface/source").get("bridge") == "dcpbr0"  # type: ignore[union-attr]
    assert root.find("devices/interface/mac").get("address") == "52:54:00:01:02:03"  # type: ignore[union-attr]
    assert root.find("devices/serial").get("type") == "file"  # type: ignore[union-attr]
    assert root.find("devices/video/model").get("type") == "none"  # type: ignore[union-attr]
    assert root.findtext("on_crash") == "destroy"
    assert len(root.findall("devices/disk")) == 1  # no config disk asked for


def test_domain_xml_config_disk_is_a_readonly_raw_virtio_disk() -> None:
    spec = DomainSpec(**{**_spec(DomainType.QEMU).__dict__, "config_disk": Path("/s/o/c")})
    root = ET.fromstring(domain_xml(spec))
    root_disk, config = root.findall("devices/disk")
    assert root_disk.find("target").get("dev") == "vda"  # type: ignore[union-attr]
    assert config.find("source").get("file") == "/s/o/c"  # type: ignore[union-attr]
    assert config.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    assert config.find("target").get("bus") == "virtio"  # type: ignore[union-attr]
    assert config.findtext("serial") == CONFIG_SERIAL
    assert config.find("readonly") is not None


def test_domain_xml_kvm_and_escaping() -> None:
    spec = _spec(DomainType.KVM)
    root = ET.fromstring(domain_xml(spec))
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    weird = DomainSpec(**{**spec.__dict__, "cmdline": "a=<b>&c"})
    assert ET.fromstring(domain_xml(weird)).findtext("os/cmdline") == "a=<b>&c"


def test_volume_and_pool_xml() -> None:
    vol = ET.fromstring(overlay_xml("dcp-vm1.qcow2", Path("/s/base.qcow2"), 2**30))
    assert vol.findtext("capacity") == str(2**30)
    assert vol.find("target/format").get("type") == "qcow2"  # type: ignore[union-attr]
    assert vol.findtext("backingStore/path") == "/s/base.qcow2"
    pool = ET.fromstring(pool_xml("p", Path("/s/overlays")))
    assert pool.get("type") == "dir" and pool.findtext("target/path") == "/s/overlays"
    assert pool.findtext("target/permissions/mode") == "0711"
    cfg = ET.fromstring(config_volume_xml("dcp-vm1.config", 4096))
    assert cfg.findtext("capacity") == "4096"
    assert cfg.find("target/format").get("type") == "raw"  # type: ignore[union-attr]
    assert cfg.findtext("target/permissions/mode") == "0600"


def test_bridge_mac_is_fixed_and_local() -> None:
    from net.bridge import BridgeSpec

    spec = BridgeSpec("dcpbr0", ipaddress.IPv4Interface("10.231.5.1/24"))
    assert spec.mac == BridgeSpec("dcpbr0", spec.address).mac
    assert spec.mac.startswith("02:") and len(spec.mac.split(":")) == 6
    assert spec.mac != BridgeSpec("dcpbr1", spec.address).mac
