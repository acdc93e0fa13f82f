"""The libvirt provider's pure half: what a DCP instance's libvirt domain is.

URI classification, instance names, MAC and lab-subnet addresses, the guest image's
files, the guest's kernel command line and config disk, the domain, pool and volume
XML, the provider's configuration and its errors.  Nothing here touches libvirt, the
network or the disk: the adapter `oss.compute.providers.libvirt.LibvirtProvider`
does, and these functions decide what it asks for (tests/unit/test_libvirt_pure.py).

Secrets never go on the kernel command line (it shows in the domain XML, in qemu's
argv on the host and in the guest's /proc/cmdline): `kernel_cmdline` refuses a
`dcp.token=` word, and the token travels on the config disk (`config_disk`).
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from net import bridge
from oss.errors import ProviderError as OssProviderError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=:-]{1,512}$")
CONFIG_SERIAL = "dcp-config"  # = images.guestinit.CONFIG_SERIAL


# ---- errors ------------------------------------------------------------------------


class ProviderError(OssProviderError):
    """The libvirt provider failed."""

    # Inside the OSS's error tree, so the pool manager's `except OssError` /
    # `except* ProviderError` handle provider failures; str() is the bare message.
    def __init__(self, message: str, instance: str | None = None) -> None:
        super().__init__(message, instance=instance)
        self.text = message
        self.instance = instance

    def __str__(self) -> str:
        return self.text


class BadUri(ProviderError):
    """The libvirt URI is not a qemu URI this provider can use."""


class Unreachable(ProviderError):
    """The libvirt daemon could not be reached."""


class ImageMissing(ProviderError):
    """A file of the guest image does not exist."""


class BadInstance(ProviderError):
    """The instance request is invalid (name, size, token)."""


class BootFailed(ProviderError):
    """The domain did not start, or stopped while booting."""


class NoAddress(ProviderError):
    """The lab subnet has no free address left."""


class LibvirtTimeout(ProviderError):
    """A libvirt call did not answer in time."""


# ---- pure parts --------------------------------------------------------------------


@dataclass(frozen=True)
class UriInfo:
    """What a libvirt URI says about where the VMs run."""

    uri: str
    driver: str
    transport: str | None
    host: str | None
    path: str

    @property
    def remote(self) -> bool:
        """True when the domains run on another machine (files must exist there)."""
        return self.host not in (None, "", "localhost", "127.0.0.1", "::1") or self.transport in (
            "ssh",
            "libssh",
            "libssh2",
        )


def parse_uri(uri: str) -> UriInfo:
    """Classify `qemu:///system`, `qemu+ssh://host/system`, `qemu+tcp://h:p/system`, ..."""
    parts = urlsplit(uri)
    scheme = parts.scheme
    if not scheme:
        raise BadUri(f"libvirt URI {uri!r} has no scheme (expected e.g. qemu:///system)")
    driver, _, transport = scheme.partition("+")
    if driver != "qemu":
        raise BadUri(f"libvirt URI {uri!r}: only the qemu driver is supported, not {driver!r}")
    if transport not in ("", "unix", "ssh", "libssh", "libssh2", "tcp", "tls"):
        raise BadUri(f"libvirt URI {uri!r}: unknown transport {transport!r}")
    if parts.path not in ("/system", "/session"):
        raise BadUri(f"libvirt URI {uri!r}: path must be /system or /session")
    if transport in ("ssh", "libssh", "libssh2", "tcp", "tls") and not parts.hostname:
        raise BadUri(f"libvirt URI {uri!r}: transport {transport} needs a host")
    return UriInfo(uri, driver, transport or None, parts.hostname, parts.path)


def check_name(name: str) -> None:
    """Instance names: letters, digits, '_', '.', '-'; at most 63 characters."""
    if not NAME_RE.match(name):
        raise BadInstance(f"bad instance name {name!r} (A-Z a-z 0-9 _ . -, at most 63)", name)


def mac_for(name: str, taken: Iterable[str] = ()) -> str:
    """A stable locally administered MAC (qemu's 52:54:00 prefix) distinct from `taken`."""
    used = set(taken)
    for salt in range(1000):
        digest = hashlib.sha256(f"{name}/{salt}".encode()).digest()
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])
        if mac not in used:
            return mac
    raise BadInstance(f"no free MAC address for {name}", name)


@dataclass
class AddressBook:
    """Static guest addresses on the lab subnet: .1 is the gateway, guests from `first`."""

    subnet: ipaddress.IPv4Network
    first: int = 10
    leases: dict[str, ipaddress.IPv4Address] = field(default_factory=dict)

    @property
    def gateway(self) -> ipaddress.IPv4Interface:
        """The bridge's (host side) address."""
        return ipaddress.IPv4Interface(f"{self.subnet[1]}/{self.subnet.prefixlen}")

    def lease(self, name: str) -> ipaddress.IPv4Interface:
        """The address for `name` (the same one while leased)."""
        if name not in self.leases:
            used = set(self.leases.values())
            hosts = list(self.subnet.hosts())[self.first - 1 :]
            free = next((a for a in hosts if a not in used), None)
            if free is None:
                raise NoAddress(f"no free address in {self.subnet}", name)
            self.leases[name] = free
        return ipaddress.IPv4Interface(f"{self.leases[name]}/{self.subnet.prefixlen}")

    def release(self, name: str) -> None:
        """Give the address back."""
        self.leases.pop(name, None)


@dataclass(frozen=True)
class GuestImage:
    """The files of a guest image as seen by the libvirt host."""

    base: Path
    kernel: Path
    initrd: Path | None = None

    @staticmethod
    def from_dir(directory: Path) -> GuestImage:
        """The image `dcp-image build --out DIR` wrote."""
        initrd = directory / "initrd.img"
        return GuestImage(
            directory / "base.qcow2", directory / "vmlinuz", initrd if initrd.exists() else None
        )

    def files(self) -> list[Path]:
        """Every file the domain needs."""
        return [self.base, self.kernel] + ([self.initrd] if self.initrd else [])


def kernel_cmdline(
    name: str,
    oss_url: str | None,
    address: ipaddress.IPv4Interface,
    gateway: ipaddress.IPv4Address,
    listen_port: int,
    extra: str = "",
    quiet: bool = True,
    config_disk: bool = False,
) -> str:
    """The guest's command line (CONTRACTS.md: dcp.oss, dcp.instance, ...): no secrets."""
    if oss_url is not None and (not oss_url or any(c.isspace() for c in oss_url)):
        raise BadInstance(f"bad OSS URL {oss_url!r}", name)
    if any(w.startswith("dcp.token=") for w in extra.split()):
        raise BadInstance("extra_cmdline must not carry dcp.token: it goes on the config disk")
    words = ["console=ttyS0", "panic=-1", "root=/dev/vda", "rw"]
    if quiet:
        words.append("quiet")
    if oss_url:
        words.append(f"dcp.oss={oss_url}")
    words.append(f"dcp.instance={name}")
    if config_disk:
        words.append("dcp.config=disk")
    words += [f"dcp.ip={address}", f"dcp.gw={gateway}", f"dcp.listen=0.0.0.0:{listen_port}"]
    if extra:
        words.append(extra)
    return " ".join(words)


def config_disk(name: str, token: str | None) -> bytes:
    """The config disk's content for an instance (images.guestinit reads it)."""
    from images.guestinit import ConfigError, encode_config

    if token is not None and not TOKEN_RE.match(token):
        raise BadInstance("the token has characters a config disk cannot carry", name)
    try:
        return encode_config({"token": token} if token else {})
    except ConfigError as exc:
        raise BadInstance(f"config disk: {exc}", name) from exc


class DomainType(enum.Enum):
    """How qemu runs the guest."""

    KVM = "kvm"
    QEMU = "qemu"  # TCG: slow, always works


@dataclass(frozen=True)
class DomainSpec:
    """Everything one domain's XML says."""

    name: str
    domain_type: DomainType
    cpus: int
    memory_mb: int
    image: GuestImage
    disk: Path | None
    cmdline: str
    mac: str
    bridge: str | None
    serial_log: Path
    config_disk: Path | None = None  # raw, read-only, serial CONFIG_SERIAL


def domain_xml(spec: DomainSpec) -> str:
    """Transient domain XML: direct kernel boot, virtio disk and NIC, serial to a file.

    No <graphics> (type='none' is rejected) and <acpi/> (without it poweroff only halts).
    """
    dom = ET.Element("domain", type=spec.domain_type.value)
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(dom, "vcpu").text = str(spec.cpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_el, "kernel").text = str(spec.image.kernel)
    if spec.image.initrd is not None:
        ET.SubElement(os_el, "initrd").text = str(spec.image.initrd)
    ET.SubElement(os_el, "cmdline").text = spec.cmdline
    feats = ET.SubElement(dom, "features")
    ET.SubElement(feats, "acpi")
    if spec.domain_type is DomainType.KVM:
        ET.SubElement(dom, "cpu", mode="host-passthrough")
    else:
        cpu = ET.SubElement(dom, "cpu", mode="custom", match="exact")
        ET.SubElement(cpu, "model", fallback="allow").text = "qemu64"
    ET.SubElement(dom, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        # A guest that powers off, panics (panic=-1 reboots) or crashes goes away.
        ET.SubElement(dom, event).text = "destroy"
    dev = ET.SubElement(dom, "devices")
    if spec.disk is not None:
        disk = ET.SubElement(dev, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2")
        ET.SubElement(disk, "source", file=str(spec.disk))
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
    if spec.config_disk is not None:
        disk = ET.SubElement(dev, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="raw")
        ET.SubElement(disk, "source", file=str(spec.config_disk))
        ET.SubElement(disk, "target", dev="vdb", bus="virtio")
        ET.SubElement(disk, "serial").text = CONFIG_SERIAL
        ET.SubElement(disk, "readonly")
    if spec.bridge is not None:
        nic = ET.SubElement(dev, "interface", type="bridge")
        ET.SubElement(nic, "source", bridge=spec.bridge)
        ET.SubElement(nic, "mac", address=spec.mac)
        ET.SubElement(nic, "model", type="virtio")
    serial = ET.SubElement(dev, "serial", type="file")
    ET.SubElement(serial, "source", path=str(spec.serial_log))
    ET.SubElement(serial, "target", port="0")
    video = ET.SubElement(dev, "video")
    ET.SubElement(video, "model", type="none")
    ET.SubElement(dev, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def pool_xml(name: str, path: Path) -> str:
    """A transient directory storage pool for the overlays and config disks (0711)."""
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    target = ET.SubElement(pool, "target")
    ET.SubElement(target, "path").text = str(path)
    perms = ET.SubElement(target, "permissions")
    ET.SubElement(perms, "mode").text = "0711"
    return ET.tostring(pool, encoding="unicode")


def config_volume_xml(name: str, size: int) -> str:
    """A raw volume for a config disk, 0600 (libvirt hands it to qemu's user while it runs)."""
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", unit="bytes").text = str(size)
    ET.SubElement(vol, "allocation", unit="bytes").text = str(size)
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", type="raw")
    perms = ET.SubElement(target, "permissions")
    ET.SubElement(perms, "mode").text = "0600"
    return ET.tostring(vol, encoding="unicode")


def overlay_xml(name: str, base: Path, capacity_bytes: int) -> str:
    """A qcow2 volume backed by the (read-only) base image."""
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", unit="bytes").text = str(capacity_bytes)
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", type="qcow2")
    backing = ET.SubElement(vol, "backingStore")
    ET.SubElement(backing, "path").text = str(base)
    ET.SubElement(backing, "format", type="qcow2")
    return ET.tostring(vol, encoding="unicode")


# ---- configuration -----------------------------------------------------------------


@dataclass(frozen=True)
class LibvirtConfig:
    """Configuration of one libvirt provider (one libvirt host)."""

    uri: str
    image: GuestImage
    state_dir: Path  # on the libvirt host: staged image, overlays, serial logs
    subnet: ipaddress.IPv4Network = ipaddress.IPv4Network("10.231.5.0/24")
    bridge: str | None = "dcpbr0"
    manage_bridge: bool = True  # create (and later delete) the bridge; local hosts only
    bridge_netns: str | None = None  # the namespace the libvirt daemon (and bridge) lives in
    prefix: str = "dcp-"
    domain_type: str = "auto"  # auto | kvm | qemu
    probe_timeout: float = 10.0
    call_timeout: float = 30.0
    boot_marker: str = "dcp-initramfs:"  # first console line of a booting DCP guest
    boot_timeout: float = 60.0  # no boot_marker on the console by then: BootFailed
    listen_port: int = 7070
    extra_cmdline: str = ""
    max_memory_mb: int = 4096
    remote_disk_bytes: int = 8 * 2**30  # overlay size when a remote base is in no pool
    max_cpus: int = 2

    def __post_init__(self) -> None:
        parse_uri(self.uri)
        if self.domain_type not in ("auto", "kvm", "qemu"):
            raise BadInstance(f"domain_type must be auto, kvm or qemu, not {self.domain_type!r}")
        if self.bridge is not None:
            bridge.check_ifname(self.bridge)


def config_from_mapping(data: Mapping[str, Any]) -> LibvirtConfig:
    """A config from plain data (a TOML/JSON table), unknown keys rejected."""
    known = set(LibvirtConfig.__dataclass_fields__)
    unknown = set(data) - known - {"image_dir"}
    if unknown:
        raise BadInstance(f"unknown libvirt provider settings: {', '.join(sorted(unknown))}")
    values = {k: v for k, v in data.items() if k != "image_dir"}
    if "image_dir" in data:
        values["image"] = GuestImage.from_dir(Path(data["image_dir"]))
    for key in ("state_dir",):
        if key in values:
            values[key] = Path(values[key])
    if "subnet" in values:
        values["subnet"] = ipaddress.IPv4Network(values["subnet"])
    return LibvirtConfig(**values)
