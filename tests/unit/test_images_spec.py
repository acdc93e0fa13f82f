"""Image spec hashing, module lists, kernel versions, box metadata, initramfs init."""

from pathlib import PurePath

import pytest

from images.qcow2 import NotQcow2, parse_virtual_size
from images.spec import (
    GUEST_MODULES,
    ImageSpec,
    box_metadata,
    disk_size_mb,
    hash_files,
    initramfs_init,
    kernel_version,
    parse_show_depends,
)


def _spec(**kw: object) -> ImageSpec:
    base: dict[str, object] = dict(
        suite="bookworm",
        mirrors=("deb http://m bookworm main",),
        packages=("python3",),
        wheels=(),
        kernel_version="6.1.0-1-amd64",
        kernel_sha256="ab",
    )
    base.update(kw)
    return ImageSpec(**base)  # type: ignore[arg-type]


def test_key_is_stable_and_input_sensitive() -> None:
    assert _spec().key() == _spec().key()
    assert _spec().key() != _spec(packages=("python3", "criu")).key()
    assert _spec().key() != _spec(kernel_sha256="cd").key()
    assert _spec().key() != _spec(source_sha256="new").key()


def test_hash_files_is_order_independent_and_content_sensitive() -> None:
    a = [(PurePath("a.py"), b"1"), (PurePath("b.py"), b"2")]
    assert hash_files(a) == hash_files(list(reversed(a)))
    assert hash_files(a) != hash_files([(PurePath("a.py"), b"1"), (PurePath("b.py"), b"3")])


def test_virtio_pci_loads_first() -> None:
    assert GUEST_MODULES[0] == "virtio_pci"
    assert {"9p", "9pnet_virtio", "tun", "veth", "nf_tables", "nfnetlink"} <= set(GUEST_MODULES)


def test_show_depends_parsing() -> None:
    text = (
        "insmod /lib/modules/v/kernel/drivers/virtio/virtio_ring.ko \n"
        "builtin crc32c\n"
        "insmod /lib/modules/v/kernel/drivers/virtio/virtio.ko \n"
        "insmod /lib/modules/v/kernel/drivers/virtio/virtio_ring.ko \n"
    )
    assert parse_show_depends(text) == [
        "/lib/modules/v/kernel/drivers/virtio/virtio_ring.ko",
        "/lib/modules/v/kernel/drivers/virtio/virtio.ko",
    ]


def test_kernel_version() -> None:
    assert kernel_version("vmlinuz-6.1.0-56-amd64", ["6.1.0-56-amd64", "6.1.0-55-amd64"]) == (
        "6.1.0-56-amd64"
    )
    assert kernel_version("bzImage", ["6.1.0-56-amd64"]) == "6.1.0-56-amd64"
    assert kernel_version("bzImage", ["a", "b"]) is None
    assert kernel_version("vmlinuz-9", []) is None


def test_box_metadata_rounds_up_to_gib() -> None:
    assert box_metadata(1) == {"provider": "libvirt", "format": "qcow2", "virtual_size": 1}
    assert box_metadata(2**30 + 1)["virtual_size"] == 2
    assert disk_size_mb(0) == 384


def test_initramfs_init_loads_modules_then_switches_root() -> None:
    text = initramfs_init(["virtio", "virtio_pci", "ext4"])
    assert text.startswith("#!/bin/busybox sh")
    assert "for m in virtio virtio_pci ext4;" in text
    assert "exec switch_root /newroot /sbin/dcp-init" in text
    assert "poweroff -f" in text  # never an interactive shell


def test_qcow2_header() -> None:
    header = b"QFI\xfb" + b"\0\0\0\3" + b"\0" * 16 + (5 * 2**30).to_bytes(8, "big")
    assert parse_virtual_size(header) == 5 * 2**30
    with pytest.raises(NotQcow2):
        parse_virtual_size(b"\0" * 32)
