"""The DCP guest image: what a compute VM boots, and `dcp-image` that builds it.

It owns the pure decisions (`spec.py`: what goes into an image and its cache key;
`pydeps.py`, `sources.py`, `cpio.py`, `qcow2.py`), the builder adapter around
mmdebstrap, pip, mkfs and qemu-img (`builder.py`, `cli.py`), and the guest's PID 1
(`guestinit.py`: mounts, address, the config disk with the instance token, then the
agent), which runs inside the VM with the standard library only.  Layer 0: it
imports nothing of DCP; `guestinit.py` is copied into the image and imports nothing
at all beyond the standard library.
"""
