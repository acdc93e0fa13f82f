#!/bin/sh
# DCP Vagrant lab: ./lab.sh up | list | run PROG... | vagrant ARGS... | down   (see README.md)
# Runs vagrant inside the lab's network namespace, against a private libvirtd.
set -eu
cd "$(dirname "$0")"
HERE=$(pwd)
REPO=$(cd .. && pwd)
NETNS=${DCP_LAB_NETNS:-dcp-lab}
IMAGE=${DCP_IMAGE:-$REPO/image}
LAB=$HERE/.lab                       # tokens (0600), the lab's size; removed by down
BOOTDIR=/var/lib/dcp/lab             # kernel + initrd where qemu (libvirt-qemu) can read them
POOL=/var/lib/libvirt/images         # the transient storage pool's directory
RUNDIR=/run/dcp-lab-libvirt          # pid files of the lab's virtlogd and libvirtd
URL=http://${DCP_LAB_NET:-10.231.9}.2:8470
READY_TIMEOUT=${DCP_LAB_READY_TIMEOUT:-300}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "lab.sh: $*" >&2; exit 1; }
in_ns() { ip netns exec "$NETNS" "$@"; }

# A python3 with DCP's dependencies (the one DCP was pip-installed into), not
# necessarily the first python3 on PATH: DCP_PYTHON, python3, ../.venv, /usr/bin.
find_python() {
  for py in ${DCP_PYTHON:-} python3 "$REPO/.venv/bin/python3" /usr/bin/python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import aiohttp, click, pydantic, pyroute2' 2>/dev/null; then
      "$py" -c 'import sys; print(sys.executable)'
      return
    fi
  done
  die "no python3 with DCP's dependencies: pip install -e '.[vm]' into one, or set DCP_PYTHON"
}
PY=$(find_python)

# How the user's shell runs dcptrace: as installed, or from this checkout (PYTHONPATH
# before `ip netns exec`) if the installed one is another checkout's.
dcptrace_cmd() {
  installed=$(cd / && env -u PYTHONPATH "$PY" -c 'import tracer; print(tracer.__file__)' 2>/dev/null || true)
  bin=$(dirname "$PY")/dcptrace
  if [ "$installed" = "$REPO/tracer/__init__.py" ] && command -v dcptrace >/dev/null; then
    echo "ip netns exec $NETNS dcptrace"
  elif [ -x "$bin" ]; then
    echo "PYTHONPATH=$REPO ip netns exec $NETNS $bin"
  else
    die "no dcptrace beside $PY: pip install -e '$REPO'"
  fi
}

ours_alive() { [ -f "$RUNDIR/libvirtd.pid" ] && kill -0 "$(cat "$RUNDIR/libvirtd.pid")" 2>/dev/null; }
socket_alive() { "$PY" -c 'import sys; from oss.compute.providers.libvirtd import _socket_alive, SYSTEM_SOCKET; sys.exit(not _socket_alive(SYSTEM_SOCKET))'; }

start_libvirtd() {
  ours_alive && return
  socket_alive && die "another libvirtd owns /run/libvirt/libvirt-sock (stop it, or wait for the VM tests using it)"
  "$PY" -m oss.compute.providers.libvirtd start --netns "$NETNS" --run-dir "$RUNDIR"
  virsh -c qemu:///system pool-info default >/dev/null 2>&1 || {
    mkdir -p "$POOL"
    virsh -c qemu:///system pool-create-as default dir --target "$POOL" >/dev/null
  }
  chmod 711 "$POOL"   # qemu opens volumes by path; nobody lists them
}

# The box is replaced when the image was rebuilt: its content hash is in the box.
box_hash() { cat "${VAGRANT_HOME:-$HOME/.vagrant.d}/boxes/dcp/0/libvirt/content.sha256" 2>/dev/null || true; }
image_hash() { "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["content_sha256"])' "$IMAGE/manifest.json"; }

# Ask the coordinator's OSS, with the lab account's token (read from its file, never argv).
oss_instances() {
  in_ns "$PY" - "$URL" "$LAB/account.token" <<'PY'
import json, sys, urllib.request
url, token_file = sys.argv[1:]
req = urllib.request.Request(url + "/v1/instances")
req.add_header("Authorization", "Bearer " + open(token_file).read().strip())
try:
    rows = json.load(urllib.request.urlopen(req, timeout=10))
except OSError as exc:
    print(f"lab.sh: the OSS at {url} does not answer: {exc}", file=sys.stderr)
    sys.exit(1)
for r in rows:
    print(r["name"], r["state"], r["address"] or "-")
PY
}

wait_ready() {
  want=$1 deadline=$(( $(date +%s) + READY_TIMEOUT ))
  while :; do
    ready=$(oss_instances 2>/dev/null | awk '$2 == "ready"' | wc -l)
    [ "$ready" -ge "$want" ] && return
    [ "$(date +%s)" -lt "$deadline" ] || die "only $ready of $want instances registered within ${READY_TIMEOUT} s (./lab.sh list)"
    sleep 3
  done
}

# `vagrant ssh coordinator -c CMD` into a 0600 file: the secret it prints never reaches a screen.
coordinator_secret() {
  out=$1; shift
  (umask 077; in_ns vagrant ssh coordinator -c "$*" 2>/dev/null | tr -d '\r' | tail -n 1 > "$out.new")
  [ -s "$out.new" ] || die "the coordinator did not answer: $*"
  mv "$out.new" "$out"
}

create_lab() {
  n=$1
  mkdir -p "$LAB/boot"
  # Built from this checkout (reused from the image cache when nothing changed),
  # unless DCP_IMAGE names a finished image.
  if [ -n "${DCP_IMAGE:-}" ]; then
    [ -f "$IMAGE/dcp.box" ] || die "DCP_IMAGE=$IMAGE has no dcp.box"
  else
    "$PY" -m images build --out "$IMAGE"
  fi
  mkdir -p "$BOOTDIR" && chmod 755 /var/lib/dcp "$BOOTDIR"
  cp "$IMAGE/vmlinuz" "$IMAGE/initrd.img" "$BOOTDIR/"
  ln -sfn "$BOOTDIR/vmlinuz" "$LAB/boot/vmlinuz"
  ln -sfn "$BOOTDIR/initrd.img" "$LAB/boot/initrd.img"
  want=$(image_hash)
  if [ "$(box_hash)" != "$want" ]; then
    vagrant box list | grep -q '^dcp ' && vagrant box remove --force dcp >/dev/null
    vagrant box add --name dcp "$IMAGE/dcp.box"
    echo "$want" > "${VAGRANT_HOME:-$HOME/.vagrant.d}/boxes/dcp/0/libvirt/content.sha256"
  fi
  start_libvirtd
  # vagrant-libvirt reuses a box volume of the same name: never an old image's.
  rm -f "$POOL"/dcp_vagrant_box_image_*_box.img "$POOL"/dcp-lab-*.config
  virsh -c qemu:///system pool-refresh default >/dev/null
  in_ns vagrant up coordinator
  coordinator_secret "$LAB/account.token" \
    "sudo python3 -m oss account create --admin --allow-root --data /var/lib/dcp-oss --user lab lab"
  i=1
  (umask 077; : > "$LAB/tokens.new")
  while [ "$i" -le "$n" ]; do
    coordinator_secret "$LAB/inst$i.token" \
      "sudo python3 -m oss instance-token --data /var/lib/dcp-oss inst$i"
    echo "inst$i $(cat "$LAB/inst$i.token")" >> "$LAB/tokens.new"
    rm "$LAB/inst$i.token"
    i=$((i + 1))
  done
  chmod 600 "$LAB/tokens.new" && mv "$LAB/tokens.new" "$LAB/tokens"
  # Each token goes on a config disk (0600 raw volume, read by dcp-init as root),
  # never on a kernel command line. The script comes on stdin: no token in any argv.
  "$PY" - "$LAB/tokens" "$POOL" <<'PY'
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
}

instances_made() { [ -f "$LAB/tokens" ] && wc -l < "$LAB/tokens" || echo 0; }

case "${1:-}" in
up)
  made=$(instances_made)
  if [ "$made" -gt 0 ]; then
    # The lab exists (running or halted): start what is stopped, mint nothing new
    # (the instances' tokens on their config disks stay the coordinator's).
    [ "${DCP_INSTANCES:-$made}" = "$made" ] ||
      die "the lab has $made instances; for ${DCP_INSTANCES} run ./lab.sh down first"
    start_libvirtd
  else
    create_lab "${DCP_INSTANCES:-2}"
    made=$(instances_made)
  fi
  in_ns vagrant up
  echo "waiting for the $made instances to register with the coordinator ..."
  wait_ready "$made"
  cmd=$(dcptrace_cmd)
  cat <<EOF

The lab is up: a coordinator and $made instances, all ready (./lab.sh list).
Run a program on it from your shell, as root (the account token stays in the
0600 file $LAB/account.token):

  (cd / && DCP_TOKEN=\$(cat $LAB/account.token) $cmd --oss $URL --placement spread -- sh -c 'cat /etc/hostname; cat /etc/hostname')

or the same through this script:

  $HERE/lab.sh run sh -c 'cat /etc/hostname; cat /etc/hostname'

Programs start in /, a directory every instance has (from another directory,
that directory is served to the instances by the run's storage server).
Halt: ./lab.sh vagrant halt   start again: ./lab.sh up   remove: ./lab.sh down
EOF
  ;;
list)
  [ "$(instances_made)" -gt 0 ] || die "no lab (./lab.sh up)"
  oss_instances
  ;;
status)
  in_ns vagrant status
  ;;
run)
  # dcptrace --oss with the lab account, from / (see `up`'s last lines).
  shift
  [ $# -gt 0 ] || die "usage: ./lab.sh run PROG [ARGS...]"
  [ -f "$LAB/account.token" ] || die "no lab (./lab.sh up)"
  DCP_TOKEN=$(cat "$LAB/account.token")
  export DCP_TOKEN
  cd /
  exec ip netns exec "$NETNS" "$PY" -c 'import sys; from tracer.cli import main; sys.argv[0] = "dcptrace"; main()' --oss "$URL" --placement spread -- "$@"
  ;;
vagrant)
  # vagrant inside the namespace (SSH to the guests needs the lab network).
  shift
  in_ns vagrant "$@"
  ;;
down)
  if ours_alive; then
    in_ns vagrant destroy -f || true
    for net in $(virsh -c qemu:///system net-list --all --name 2>/dev/null | grep -x dcp-lab || true); do
      virsh -c qemu:///system net-destroy "$net" >/dev/null 2>&1 || true
      virsh -c qemu:///system net-undefine "$net" >/dev/null 2>&1 || true
    done
  fi
  "$PY" -m oss.compute.providers.libvirtd stop --netns "$NETNS" --run-dir "$RUNDIR"
  # What vagrant-libvirt and libvirt leave in shared directories, by the lab's names only.
  rm -f "$POOL"/dcp_vagrant_box_image_*_box.img "$POOL"/dcp-lab-*.config \
        "$POOL"/vagrant_coordinator.img "$POOL"/vagrant_inst*.img \
        /var/log/libvirt/qemu/vagrant_coordinator.log* /var/log/libvirt/qemu/vagrant_inst*.log* \
        /var/lib/libvirt/dnsmasq/dcp-lab.* \
        /etc/libvirt/qemu/vagrant_coordinator.xml /etc/libvirt/qemu/vagrant_inst*.xml \
        /etc/libvirt/qemu/networks/dcp-lab.xml /etc/libvirt/qemu/networks/autostart/dcp-lab.xml
  rm -rf "$BOOTDIR" "$LAB" "$HERE/.vagrant" "$RUNDIR"
  rmdir /var/lib/dcp 2>/dev/null || true
  echo "the lab is gone; the box stays (vagrant box remove dcp)"
  ;;
*)
  echo "usage: $0 up|list|status|run PROG...|vagrant ARGS...|down" >&2
  exit 2
  ;;
esac
