"""A private libvirt for a lab: virtlogd then libvirtd, inside a network namespace.

Debian 12 has no split daemons and this machine has no systemd, so the daemons
are started by hand with --pid-file and stopped by PID. Running them inside a
namespace we create keeps the tap devices, the lab bridge and libvirt's
firewall chains off the host's network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from net import bridge

log = logging.getLogger(__name__)

SYSTEM_SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")


class LibvirtdError(Exception):
    """The private libvirt daemons could not be started or stopped."""


class AlreadyRunning(LibvirtdError):
    """A libvirtd already owns the system socket."""


@dataclass(frozen=True)
class LibvirtdConfig:
    """Where the private daemons run and how long to wait for them."""

    netns: str | None = "dcp-lab"
    run_dir: Path = Path("/run/dcp-libvirt")
    start_timeout: float = 20.0
    stop_timeout: float = 10.0


class PrivateLibvirtd:
    """Owns one virtlogd and one libvirtd process; `async with` starts and stops them."""

    def __init__(self, config: LibvirtdConfig | None = None) -> None:
        self.config = config or LibvirtdConfig()
        self.pids: dict[str, int] = {}
        self._made_netns = False

    @property
    def uri(self) -> str:
        """The libvirt URI of this daemon."""
        return "qemu:///system"

    @property
    def netns(self) -> str | None:
        """The namespace the daemons (and so the VMs' taps) live in."""
        return self.config.netns

    async def __aenter__(self) -> PrivateLibvirtd:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Create the namespace, start virtlogd, then libvirtd; wait for the socket."""
        if _socket_alive(SYSTEM_SOCKET):
            raise AlreadyRunning(
                f"a libvirtd already listens on {SYSTEM_SOCKET}; stop it or use its URI"
            )
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            async with asyncio.timeout(self.config.start_timeout):
                if self.config.netns is not None:
                    self._made_netns = not bridge.netns_exists(self.config.netns)
                    await asyncio.to_thread(bridge.create_netns, self.config.netns)
                await self._daemon("virtlogd", VIRTLOGD_SOCKET)
                await self._daemon("libvirtd", SYSTEM_SOCKET)
        except TimeoutError as exc:
            await self.stop()
            raise LibvirtdError(
                f"libvirt daemons not ready within {self.config.start_timeout:.0f} s"
            ) from exc
        except BaseException:
            await self.stop()
            raise
        log.info("private libvirtd pids %s in netns %s", self.pids, self.config.netns)

    async def _daemon(self, name: str, sock: Path) -> None:
        pidfile = self.config.run_dir / f"{name}.pid"
        pidfile.unlink(missing_ok=True)
        argv = [name, "--daemon", "--pid-file", str(pidfile)]
        if self.config.netns is not None:
            argv = ["ip", "netns", "exec", self.config.netns, *argv]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise LibvirtdError(f"{name} failed to start: {(err or out).decode().strip()}")
        while True:
            if pidfile.exists() and pidfile.read_text().strip():
                self.pids[name] = int(pidfile.read_text().strip())
                if _socket_alive(sock):
                    return
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """SIGTERM libvirtd then virtlogd (SIGKILL after the timeout); remove the namespace."""
        for name in ("libvirtd", "virtlogd"):
            pid = self.pids.pop(name, None)
            if pid is not None:
                await _terminate(pid, self.config.stop_timeout)
                with contextlib.suppress(FileNotFoundError):
                    (self.config.run_dir / f"{name}.pid").unlink()
        if self._made_netns and self.config.netns is not None:
            await asyncio.to_thread(bridge.remove_netns, self.config.netns)
            self._made_netns = False


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


async def _terminate(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.05)


def _socket_alive(path: Path) -> bool:
    import socket

    if not path.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


async def stop_by_pidfiles(config: LibvirtdConfig) -> list[int]:
    """Stop daemons a previous `start` left running (their pid files), remove the netns."""
    stopped = []
    for name in ("libvirtd", "virtlogd"):
        pidfile = config.run_dir / f"{name}.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            continue
        await _terminate(pid, config.stop_timeout)
        pidfile.unlink(missing_ok=True)
        stopped.append(pid)
    if config.netns is not None:
        await asyncio.to_thread(bridge.remove_netns, config.netns)
    return stopped


def main(argv: list[str] | None = None) -> int:
    """`python3 -m oss.compute.providers.libvirtd start|stop [--netns NAME]` (Vagrant lab)."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python3 -m oss.compute.providers.libvirtd", description=main.__doc__
    )
    ap.add_argument("action", choices=("start", "stop"))
    ap.add_argument("--netns", default="dcp-lab", help="namespace ('' for the host's)")
    ap.add_argument("--run-dir", default=str(LibvirtdConfig.run_dir))
    args = ap.parse_args(argv)
    config = LibvirtdConfig(netns=args.netns or None, run_dir=Path(args.run_dir))
    try:
        if args.action == "start":
            daemon = PrivateLibvirtd(config)
            asyncio.run(daemon.start())
            print(
                f"libvirtd pid {daemon.pids['libvirtd']} virtlogd pid {daemon.pids['virtlogd']}"
                f" netns {config.netns or '-'}: {daemon.uri}"
            )
        else:
            pids = asyncio.run(stop_by_pidfiles(config))
            print(f"stopped {pids or 'nothing'}")
    except LibvirtdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
