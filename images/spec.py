"""What goes into a guest image, and how its inputs are hashed (pure)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import PurePath

# Debian packages every guest has (the Python deps are added by images.pydeps).
BASE_PACKAGES: tuple[str, ...] = (
    "python3",
    "criu",
    "iproute2",
    "nftables",  # libnftables1: the agent applies programs' NAT in process (issue 13)
    "procps",
    "kmod",
    "busybox-static",  # the initramfs's only binary, copied out of the rootfs
    "dropbear-bin",  # SSH for the Vagrant lab, started only with dcp.ssh=1
    "sudo",
    "ca-certificates",
    # Issue 14: dcpfs (the program's namespace): fusermount, and libfuse for mfusepy.
    "fuse3",
    "libfuse2",
)

# Loaded by the initramfs so the root file system can be mounted.
INITRAMFS_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "ext4")

# Loaded by dcp-init in this order: virtio_pci first, or 9p finds no channels.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
    "ext4",
    "9p",
    "9pnet_virtio",
    "tun",
    "veth",
    "af_packet",
    "unix_diag",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "netlink_diag",
    "af_packet_diag",
    "nfnetlink",
    "nf_tables",
    "nf_nat",  # issue 13: a program's loopback redirect (nft nat chains, dnat/snat)
    "nft_chain_nat",
    "nft_nat",
    "sch_tbf",  # issue 13: a program's bandwidth cap
    "button",  # the ACPI power button (libvirt shutdown, `vagrant halt -f`) as an input device
    "evdev",  # /dev/input/eventN, where dcp-init reads that button
    "fuse",  # issue 14: dcpfs mounts the program's namespace (--volume)
)

# DCP's own packages copied into the guest's site-packages.
DCP_PACKAGES: tuple[str, ...] = ("tracer", "vmagent", "oss", "net")

# busybox udhcpc calls this with the lease in the environment (`dcp.ip=dhcp`).
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) /sbin/ip addr flush dev "$interface" ;;
  bound|renew)
    /sbin/ip addr flush dev "$interface"
    /sbin/ip addr add "$ip/$mask" dev "$interface"
    if [ -n "$router" ]; then /sbin/ip route replace default via "${router%% *}"; fi
    echo "dcp-init: dhcp $interface $ip/$mask router ${router:-none}" >/dev/console
    ;;
esac
exit 0
"""

# /sbin/shutdown, poweroff, halt and reboot in the guest (`vagrant halt` runs
# `shutdown -h now`): they signal dcp-init (PID 1), which stops every process,
# syncs, remounts / read-only and powers off (USR2) or reboots (INT), as busybox
# init takes the same signals.
POWER_COMMANDS: tuple[str, ...] = ("shutdown", "poweroff", "halt", "reboot")
POWER_SCRIPT = """#!/bin/sh
# dcp-init is PID 1: USR2 asks it to power off, INT to reboot.
sig=USR2
case "${0##*/}" in
  reboot) sig=INT ;;
  shutdown) for a in "$@"; do case "$a" in -r|--reboot) sig=INT ;; esac; done ;;
esac
exec kill -s "$sig" 1
"""

# Trimmed from the rootfs: docs, manuals, locales and apt's lists and caches.
DPKG_EXCLUDES: tuple[str, ...] = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
)


@dataclass(frozen=True)
class ImageSpec:
    """Every input that decides the image's contents (the cache key is its hash)."""

    suite: str
    mirrors: tuple[str, ...]
    packages: tuple[str, ...]
    wheels: tuple[str, ...]
    kernel_version: str
    kernel_sha256: str
    initramfs_modules: tuple[str, ...] = INITRAMFS_MODULES
    guest_modules: tuple[str, ...] = GUEST_MODULES
    source_sha256: str = ""
    vagrant_key: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    def key(self) -> str:
        """Hex sha256 of the spec's canonical JSON."""
        blob = json.dumps(asdict(self), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()


def hash_files(files: Iterable[tuple[PurePath, bytes]]) -> str:
    """sha256 over (relative path, content) pairs, order-independent."""
    h = hashlib.sha256()
    for rel, data in sorted(files, key=lambda item: str(item[0])):
        h.update(str(rel).encode() + b"\0")
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def parse_show_depends(text: str) -> list[str]:
    """Module file paths from `modprobe --show-depends` output, in load order."""
    out: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "insmod" and words[1] not in out:
            out.append(words[1])
    return out


def kernel_version(name: str, available: Iterable[str]) -> str | None:
    """The module version for a kernel file name (`vmlinuz-6.1.0-56-amd64`).

    A file named otherwise takes the only version installed, if there is exactly one.
    """
    versions = sorted(available)
    if name.startswith("vmlinuz-") and name[len("vmlinuz-") :] in versions:
        return name[len("vmlinuz-") :]
    return versions[0] if len(versions) == 1 else None


def disk_size_mb(used_bytes: int, headroom_mb: int = 384) -> int:
    """Size of the ext4 file system for a tree of `used_bytes` (room for overlays' writes)."""
    return int(used_bytes * 1.25 / 2**20) + headroom_mb


def box_metadata(virtual_size_bytes: int) -> dict[str, object]:
    """vagrant-libvirt's metadata.json for a qcow2 box (size in whole GiB, rounded up)."""
    gib = max(1, -(-virtual_size_bytes // 2**30))
    return {"provider": "libvirt", "format": "qcow2", "virtual_size": gib}


def initramfs_init(modules: Iterable[str], init: str = "/sbin/dcp-init") -> str:
    """The initramfs's /init: load the root's modules, mount /dev/vda, switch_root."""
    names = " ".join(modules)
    return f"""#!/bin/busybox sh
# DCP initramfs: load the modules the root file system needs and switch to it.
echo "dcp-initramfs: started"
/bin/busybox mkdir -p /proc /sys /dev /newroot /bin /sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {names}; do insmod /lib/modules/$m.ko 2>/dev/null; done
root=/dev/vda
for word in $(cat /proc/cmdline); do
  case "$word" in root=*) root="${{word#root=}}" ;; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if ! mount -t ext4 -o rw "$root" /newroot; then
  echo "dcp-initramfs: cannot mount root $root; powering off"
  poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot {init}
"""
