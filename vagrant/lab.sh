#!/bin/sh
# DCP Vagrant lab: ./lab.sh up | status | run CMD... | down
# Runs vagrant inside the lab's network namespace, against a private libvirtd.
set -eu
cd "$(dirname "$0")"
REPO=$(cd .. && pwd)
NETNS=${DCP_LAB_NETNS:-dcp-lab}
N=${DCP_INSTANCES:-2}
IMAGE=${DCP_IMAGE:-$REPO/image}
BOOT=.lab/boot
export DCP_INSTANCES=$N PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
in_ns() { ip netns exec "$NETNS" "$@"; }

case "${1:-}" in
up)
  mkdir -p .lab "$BOOT"
  [ -f "$IMAGE/dcp.box" ] || python3 -m images build --out "$IMAGE"
  # qemu runs as libvirt-qemu: kernel and initrd must be somewhere it can read.
  mkdir -p /var/lib/dcp/lab && chmod 755 /var/lib/dcp /var/lib/dcp/lab
  cp "$IMAGE/vmlinuz" "$IMAGE/initrd.img" /var/lib/dcp/lab/
  ln -sfn /var/lib/dcp/lab/vmlinuz "$BOOT/vmlinuz"
  ln -sfn /var/lib/dcp/lab/initrd.img "$BOOT/initrd.img"
  vagrant box list | grep -q '^dcp ' || vagrant box add --name dcp "$IMAGE/dcp.box"
  [ -S /run/libvirt/libvirt-sock ] || python3 -m oss.providers.libvirtd start --netns "$NETNS"
  virsh -c qemu:///system pool-info default >/dev/null 2>&1 || {
    mkdir -p /var/lib/libvirt/images
    virsh -c qemu:///system pool-create-as default dir --target /var/lib/libvirt/images
  }
  chmod 711 /var/lib/libvirt/images   # qemu opens volumes by path; nobody lists them
  in_ns vagrant up coordinator
  rm -f .lab/tokens
  i=1
  while [ "$i" -le "$N" ]; do
    tok=$(in_ns vagrant ssh coordinator -c \
      "sudo python3 -m oss instance-token --data /var/lib/dcp-oss inst$i" 2>/dev/null | tr -d '\r')
    echo "inst$i $tok" >> .lab/tokens
    i=$((i + 1))
  done
  chmod 600 .lab/tokens
  # Each token goes on a config disk (0600 raw volume, read by dcp-init as root),
  # never on a kernel command line. The script comes on stdin: no token in any argv.
  python3 - .lab/tokens /var/lib/libvirt/images <<'PY'
import os, sys
from images.guestinit import encode_config
tokens, pool = sys.argv[1:]
for line in open(tokens):
    name, token = line.split()
    path = os.path.join(pool, f"dcp-lab-{name}.config")
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(encode_config({"token": token}))
PY
  virsh -c qemu:///system pool-refresh default >/dev/null
  in_ns vagrant up
  ;;
status)
  in_ns vagrant status
  ;;
run)
  # Run a command in the lab namespace (e.g. dcptrace --oss http://10.231.9.2:8470 -- prog).
  shift
  in_ns "$@"
  ;;
down)
  in_ns vagrant destroy -f || true
  python3 -m oss.providers.libvirtd stop --netns "$NETNS"
  # vagrant-libvirt keeps the uploaded box volume in the pool directory.
  rm -f /var/lib/libvirt/images/dcp_vagrant_box_image_*_box.img
  rm -f /var/lib/libvirt/images/dcp-lab-*.config   # allow_existing disks stay otherwise
  rm -rf .lab
  ;;
*)
  echo "usage: $0 up|status|run CMD...|down" >&2
  exit 2
  ;;
esac
