#!/usr/bin/python3 -IS
"""PID 1 of a DCP guest: mounts, modules, address, then runs the agent.

This file is copied into the image as /sbin/dcp-init and runs with the
guest's Python and the standard library only (`-S`: no site packages), so it
must not import anything from DCP. It never starts an interactive shell: if
something essential fails it powers the VM off, so a host-side timeout is the
worst case, never a hang on a prompt.

Settings come from two places (CONTRACTS.md):

- the kernel command line, for what is not secret: `dcp.oss=URL
  dcp.instance=NAME dcp.ip=A.B.C.D/NN dcp.gw=A.B.C.D dcp.listen=0.0.0.0:7070
  dcp.config=disk`, plus, for the Vagrant lab: `dcp.ssh=1` (start dropbear),
  `dcp.ip=dhcp` (ask busybox udhcpc) and `dcp.role=agent|oss|none` (what to
  run: the agent, the OSS listening on dcp.listen, or nothing). The command
  line is readable by every guest user and shows on the host in qemu's argv,
  so `dcp.token=` there is ignored (and said so on the console);
- the config disk, for secrets: a small raw virtio disk (serial `dcp-config`)
  holding `DCP-CONFIG 1` and `token=TOKEN` lines (`encode_config`). Its block
  device node is root's (0600 on devtmpfs), so only root in the guest reads it.
  `dcp.config=disk` on the command line says the host attached one: init waits
  for it a few seconds, then goes on without a token if it never appears.

The token then reaches the agent as a 0600 file (`--token-file`); it is never
printed.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

MODULES_FILE = "/etc/dcp/modules"
UDHCPC_SCRIPT = "/etc/dcp/udhcpc.sh"
OSS_DATA = "/var/lib/dcp-oss"
ROLES = ("agent", "oss", "none")
DEFAULT_LISTEN = "0.0.0.0:7070"
PYTHON = "/usr/bin/python3"
TOKEN_FILE = "/run/dcp/instance.token"  # 0600, root's: how the token reaches the agent
CONFIG_MAGIC = b"DCP-CONFIG 1\n"
CONFIG_BYTES = 4096  # the whole config disk: one page, a whole number of sectors
CONFIG_SERIAL = "dcp-config"  # the virtio disk's serial number
CONFIG_KEYS = ("token",)  # what a config disk may carry
CONFIG_WAIT = 10.0  # seconds init waits for the disk when dcp.config=disk
MAX_CONFIG_DEVICE = 2**20  # block devices larger than this are never read as a config disk
RB_POWER_OFF = 0x4321FEDC
RB_AUTOBOOT = 0x01234567
STOP_GRACE = 10.0  # seconds the services get between SIGTERM and SIGKILL at power-off
# struct input_event on x86_64: struct timeval (two longs), u16 type, u16 code, s32 value.
INPUT_EVENT = struct.Struct("llHHi")
EV_KEY = 1
KEY_POWER = 116
POWER_BUTTON_WAIT = 5.0  # seconds init looks for the ACPI power button after modprobe


@dataclass(frozen=True)
class GuestSettings:
    """What the host asked of this guest through the kernel command line."""

    instance: str = "dcp-guest"
    oss: str | None = None
    token: str | None = None
    ip: str | None = None
    gw: str | None = None
    listen: str = DEFAULT_LISTEN
    ssh: bool = False
    role: str = "agent"
    alias: str | None = None  # an extra static address (the lab coordinator's fixed one)
    config_disk: bool = False  # dcp.config=disk: the host attached a config disk
    token_on_cmdline: bool = False  # dcp.token= was on the command line (and is ignored)


class ConfigError(ValueError):
    """The config disk is malformed."""


def encode_config(values: dict[str, str]) -> bytes:
    """The config disk's bytes: magic, `key=value` lines, NUL padding to CONFIG_BYTES."""
    lines = [CONFIG_MAGIC]
    for key, value in values.items():
        if key not in CONFIG_KEYS:
            raise ConfigError(f"unknown config key {key!r}")
        if not value or not value.isprintable() or any(c.isspace() for c in value):
            raise ConfigError(f"config value for {key!r} must be printable, without spaces")
        lines.append(f"{key}={value}\n".encode())
    data = b"".join(lines)
    if len(data) > CONFIG_BYTES:
        raise ConfigError(f"config is {len(data)} bytes, more than {CONFIG_BYTES}")
    return data + b"\0" * (CONFIG_BYTES - len(data))


def parse_config(data: bytes) -> dict[str, str] | None:
    """The settings on a config disk (None: not a config disk); unknown keys are skipped."""
    if not data.startswith(CONFIG_MAGIC):
        return None
    body = data[len(CONFIG_MAGIC) :].split(b"\0", 1)[0]
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ConfigError("config disk is not ASCII") from exc
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError("config disk line without '='")
        if key in CONFIG_KEYS and value:
            values[key] = value
    return values


def with_config(settings: GuestSettings, values: dict[str, str]) -> GuestSettings:
    """The settings with the config disk's secrets added."""
    return replace(settings, token=values.get("token") or settings.token)


def read_config_disk(sys_block: str = "/sys/block", dev: str = "/dev") -> dict[str, str] | None:
    """The settings of the first small block device that is a config disk (None: none)."""
    try:
        names = sorted(os.listdir(sys_block))
    except FileNotFoundError:
        return None

    def serial(name: str) -> str:
        try:
            with open(os.path.join(sys_block, name, "serial")) as f:
                return f.read().strip()
        except OSError:
            return ""

    # The disk with our serial first; then any other small disk (Vagrant may set none).
    for name in sorted(names, key=lambda n: serial(n) != CONFIG_SERIAL):
        try:
            with open(os.path.join(sys_block, name, "size")) as f:
                size = int(f.read().strip()) * 512
        except (OSError, ValueError):
            continue
        if not 0 < size <= MAX_CONFIG_DEVICE:
            continue
        try:
            with open(os.path.join(dev, name), "rb") as disk:
                data = disk.read(CONFIG_BYTES)
        except OSError:
            continue
        values = parse_config(data)
        if values is not None:
            return values
    return None


def parse_cmdline(text: str) -> GuestSettings:
    """Read the `dcp.*` words of a kernel command line; other words are ignored."""
    values: dict[str, str] = {}
    for word in text.split():
        if word.startswith("dcp.") and "=" in word:
            key, value = word[4:].split("=", 1)
            values[key] = value
    return GuestSettings(
        instance=values.get("instance") or "dcp-guest",
        oss=values.get("oss") or None,
        token=None,  # never from the command line: see the module's docstring
        ip=values.get("ip") or None,
        gw=values.get("gw") or None,
        listen=values.get("listen") or DEFAULT_LISTEN,
        ssh=values.get("ssh", "0") in ("1", "yes", "true"),
        role=values["role"] if values.get("role") in ROLES else "agent",
        alias=values.get("alias") or None,
        config_disk=values.get("config") == "disk",
        token_on_cmdline="token" in values,
    )


def load_config(
    settings: GuestSettings,
    wait: float = CONFIG_WAIT,
    reader: Callable[[], dict[str, str] | None] = read_config_disk,
) -> GuestSettings:
    """Add the config disk's secrets; wait up to `wait` s for it when dcp.config=disk."""
    if settings.token_on_cmdline:
        log("dcp.token= on the kernel command line is ignored: secrets come from the config disk")
    deadline = time.monotonic() + (wait if settings.config_disk else 0.0)
    while True:
        try:
            values = reader()
        except ConfigError as exc:
            log(f"config disk: {exc}")
            return settings
        if values is not None:
            log(f"config disk: {', '.join(sorted(values)) or 'empty'}")  # names only
            return with_config(settings, values)
        if time.monotonic() >= deadline:
            if settings.config_disk:
                log(f"dcp.config=disk but no config disk appeared in {wait:.0f} s")
            return settings
        time.sleep(0.2)


def agent_argv(settings: GuestSettings, python: str = PYTHON) -> list[str]:
    """The agent command line of CONTRACTS.md for these settings."""
    argv = [python, "-m", "vmagent"]
    if settings.oss:
        argv += ["--oss", settings.oss]
    argv += ["--instance", settings.instance]
    if settings.token:
        argv += ["--token-file", TOKEN_FILE]
    argv += ["--listen", settings.listen]
    return argv


def service_argv(settings: GuestSettings, python: str = PYTHON) -> list[str] | None:
    """What this guest runs for its role (None: nothing)."""
    if settings.role == "none":
        return None
    if settings.role == "oss":
        argv = [python, "-m", "oss", "serve", "--listen", settings.listen, "--data", OSS_DATA]
        if settings.oss:
            argv += ["--public-url", settings.oss]
        return argv
    return agent_argv(settings, python)


def write_token(token: str, path: str = TOKEN_FILE) -> None:
    """Hand the instance token to the agent in a file only root can read."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)


def redacted(argv: list[str]) -> str:
    """The command line for the log (it carries no secret: the token is in a file)."""
    return " ".join(argv)


def log(message: str) -> None:
    """One line on the serial console."""
    sys.stdout.write(f"dcp-init: {message}\n")
    sys.stdout.flush()


def run(*argv: str) -> bool:
    """Run a helper program; log and return False on failure."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"{argv[0]} failed: {exc}")
        return False
    if res.returncode != 0:
        log(f"{' '.join(argv)} -> {res.returncode}: {res.stderr.strip()}")
        return False
    return True


def mount_all() -> None:
    """The pseudo file systems a Debian userland expects."""
    table = [
        ("proc", "/proc", "proc", "nosuid,nodev,noexec"),
        ("sysfs", "/sys", "sysfs", "nosuid,nodev,noexec"),
        ("devtmpfs", "/dev", "devtmpfs", "mode=0755"),
        ("devpts", "/dev/pts", "devpts", "gid=5,mode=620,ptmxmode=666"),
        ("tmpfs", "/dev/shm", "tmpfs", "mode=1777"),
        ("tmpfs", "/run", "tmpfs", "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", "nsdelegate"),
    ]
    for source, target, fstype, opts in table:
        os.makedirs(target, exist_ok=True)
        if os.path.ismount(target):
            continue
        run("/bin/mount", "-t", fstype, "-o", opts, source, target)
    run("/bin/mount", "-o", "remount,rw", "/")


def load_modules(path: str = MODULES_FILE) -> None:
    """modprobe each module named in the image's list, in order (virtio_pci first)."""
    try:
        with open(path) as f:
            names = [w for w in (line.strip() for line in f) if w and not w.startswith("#")]
    except FileNotFoundError:
        return
    for name in names:
        run("/sbin/modprobe", "-q", name)


def first_nic() -> str | None:
    """The first network interface that is not loopback."""
    try:
        names = sorted(os.listdir("/sys/class/net"))
    except FileNotFoundError:
        return None
    return next((n for n in names if n != "lo"), None)


def configure_network(settings: GuestSettings) -> None:
    """Loopback up; the static address and default route from the command line."""
    run("/sbin/ip", "link", "set", "lo", "up")
    nic = first_nic()
    if nic is None:
        log("no network interface")
        return
    run("/sbin/ip", "link", "set", nic, "up")
    if settings.ip == "dhcp":
        busybox = next((b for b in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(b)), "")
        run(busybox, "udhcpc", "-i", nic, "-s", UDHCPC_SCRIPT, "-n", "-q", "-t", "10")
    elif settings.ip:
        run("/sbin/ip", "addr", "add", settings.ip, "dev", nic)
    if settings.alias:
        run("/sbin/ip", "addr", "add", settings.alias, "dev", nic)
    if settings.gw:
        run("/sbin/ip", "route", "add", "default", "via", settings.gw)
    log(f"network {nic} {settings.ip or '-'} gw {settings.gw or '-'}")


def set_hostname(name: str) -> None:
    """The instance name becomes the hostname."""
    try:
        socket.sethostname(name)
        with open("/etc/hostname", "w") as f:
            f.write(name + "\n")
        with open("/etc/hosts", "w") as f:  # sudo and others resolve their own name
            f.write(f"127.0.0.1 localhost\n127.0.1.1 {name}\n::1 localhost\n")
    except OSError as exc:
        log(f"sethostname: {exc}")


def power_off() -> None:
    """Sync and power off (with <acpi/> the domain then disappears)."""
    os.sync()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.reboot(RB_POWER_OFF)
    finally:
        os._exit(1)


def stop_everything(grace: float = STOP_GRACE) -> None:
    """SIGTERM every other process, reap them (SIGKILL after `grace` s), sync, / read-only."""
    with_children = _has_children()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.kill(-1, sig)  # from PID 1: every process but init itself
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while with_children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                with_children = False
                break
            if pid == 0:
                time.sleep(0.1)
        if not with_children:
            break
    os.sync()
    run("/bin/mount", "-o", "remount,ro", "/")


def shutdown(how: str) -> None:
    """Stop every process cleanly, then power off ("poweroff") or reboot ("reboot")."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # one shutdown at a time
    log(f"{how}: stopping every process")
    try:
        stop_everything()
    finally:
        log(how)
        if how == "reboot":
            os.sync()
            import ctypes

            ctypes.CDLL(None, use_errno=True).reboot(RB_AUTOBOOT)
        power_off()


def install_shutdown_handlers() -> None:
    """TERM, USR1, USR2 (shutdown, poweroff, halt, the power button) power off; INT reboots."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda *_: shutdown("poweroff"))
    signal.signal(signal.SIGINT, lambda *_: shutdown("reboot"))


def find_power_button(sys_input: str = "/sys/class/input") -> str | None:
    """The event device name (eventN) of the ACPI power button, if the kernel made one."""
    try:
        names = sorted(n for n in os.listdir(sys_input) if n.startswith("event"))
    except FileNotFoundError:
        return None
    for name in names:
        try:
            with open(os.path.join(sys_input, name, "device", "name")) as f:
                if f.read().strip() == "Power Button":
                    return name
        except OSError:
            continue
    return None


def is_power_press(data: bytes) -> bool:
    """Whether one input_event record is the power key going down."""
    _sec, _usec, kind, code, value = INPUT_EVENT.unpack(data)
    return kind == EV_KEY and code == KEY_POWER and value == 1


def watch_power_button(wait: float = POWER_BUTTON_WAIT) -> None:
    """Turn a press of the ACPI power button into SIGUSR2 to this process (PID 1).

    libvirt's shutdown and `vagrant halt -f` press that button; the kernel's
    `button` driver reports it as a key on an input device (read through evdev).
    """
    deadline = time.monotonic() + wait
    name = find_power_button()
    while name is None and time.monotonic() < deadline:
        time.sleep(0.2)
        name = find_power_button()
    if name is None:
        log("no ACPI power button: the host can only power this guest off hard")
        return

    def read_events() -> None:
        try:
            with open(os.path.join("/dev/input", name), "rb", buffering=0) as dev:
                while True:
                    data = dev.read(INPUT_EVENT.size)
                    if len(data) < INPUT_EVENT.size:
                        return
                    if is_power_press(data):
                        log("ACPI power button pressed")
                        os.kill(os.getpid(), signal.SIGUSR2)
        except OSError as exc:
            log(f"power button {name}: {exc}")

    threading.Thread(target=read_events, name="power-button", daemon=True).start()
    log(f"power button on /dev/input/{name}")


def start_ssh() -> subprocess.Popen[bytes] | None:
    """dropbear for the Vagrant lab (host keys made on first connection)."""
    os.makedirs("/etc/dropbear", exist_ok=True)
    for exe in ("/usr/sbin/dropbear",):
        if os.path.exists(exe):
            log("starting dropbear")
            return subprocess.Popen([exe, "-R", "-F", "-E", "-p", "22"])
    log("dcp.ssh=1 but dropbear is not installed")
    return None


def supervise(settings: GuestSettings) -> None:
    """Start the role's service, reap every orphan, restart the service with backoff."""
    argv = service_argv(settings)
    if argv is None:
        log("dcp.role=none: running nothing")
        while True:
            os.waitpid(-1, 0) if _has_children() else time.sleep(3600)
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "PYTHONUNBUFFERED": "1",
        "LANG": "C.UTF-8",
        # The guest is the instance: its agent spreads its programs' pids over the
        # namespace (a migrated program needs its pids free on the target).
        "DCP_SPREAD_PIDS": "1",
    }
    delay = 1.0
    if settings.role == "oss":  # private: dcp-oss serve refuses a data dir others can read
        os.makedirs(OSS_DATA, mode=0o700, exist_ok=True)
    if settings.token:
        write_token(settings.token)
    while True:
        log(f"starting {settings.role}: {redacted(argv)}")
        started = time.monotonic()
        agent = subprocess.Popen(argv, env=env, cwd="/")
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == agent.pid:
                agent.returncode = os.waitstatus_to_exitcode(status)
                break
        log(f"{settings.role} exited with status {agent.returncode}")
        delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
        time.sleep(delay)


def _has_children() -> bool:
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return True
    except ChildProcessError:
        return False


def main() -> None:
    """Bring the guest up and run the agent for ever."""
    if os.getpid() != 1:
        print("dcp-init must run as PID 1", file=sys.stderr)
        sys.exit(2)
    install_shutdown_handlers()
    try:
        mount_all()
        with open("/proc/cmdline") as f:
            settings = parse_cmdline(f.read())
        load_modules()
        watch_power_button()
        settings = load_config(settings)
        set_hostname(settings.instance)
        configure_network(settings)
        if settings.ssh:
            start_ssh()
        log(f"ready instance={settings.instance}")
        supervise(settings)
    except BaseException as exc:  # PID 1 must never return: report and power off.
        log(f"fatal: {exc!r}")
        power_off()


if __name__ == "__main__":
    main()
