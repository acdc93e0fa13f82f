"""Whether this host can run the VM lab tests, and if not, the reason to print.

Importable without libvirt-python: the VM test modules ask it before they
import anything that needs libvirt.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

NEEDED = ("libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img", "mmdebstrap", "mkfs.ext4")
LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")


def socket_alive(path: Path) -> bool:
    """True when something accepts connections on a unix socket."""
    if not path.exists():
        return False
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def why_no_vm_lab() -> str | None:
    """None when a lab can start here: root, the tools, a kernel, libvirt-python, a free socket."""
    if os.geteuid() != 0:
        return "needs root (libvirtd, namespaces, mmdebstrap)"
    for tool in NEEDED:
        if not (shutil.which(tool) or any(Path(d, tool).exists() for d in ("/usr/sbin", "/sbin"))):
            return f"{tool} is not installed (see .ci/apt-vm.txt)"
    if not sorted(Path("/boot").glob("vmlinuz-*")):
        return "no /boot/vmlinuz-* (install linux-image-amd64)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed (pip install '.[vm]')"
    if socket_alive(LIBVIRT_SOCKET):
        return "a libvirtd is already running on this host (the lab starts its own)"
    return None
