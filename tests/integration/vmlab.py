"""A VM lab for the integration tests: image, private libvirtd, bridge, OSS, provider.

Everything runs on one asyncio loop in a background thread, so module-scoped
fixtures can share booted VMs without an async pytest plugin. The lab records
every resource it starts and `close()` releases them all by name and PID.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import tempfile
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from images.builder import BuildConfig, Builder, Image, source_checkout
from net import bridge
from oss.compute.providers.domain import GuestImage, LibvirtConfig
from oss.compute.providers.libvirt import LibvirtProvider
from oss.compute.providers.libvirtd import LibvirtdConfig, PrivateLibvirtd

T = TypeVar("T")


class LoopThread:
    """An event loop on its own thread; `run` waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vmlab-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300.0) -> T:
        """Run `coro` on the lab loop and return its result (bounded by `timeout`)."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def stop(self) -> None:
        """Stop the loop and join the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


@dataclass(frozen=True)
class InstanceType:
    """Matches oss.compute.pool.InstanceType structurally."""

    name: str = "tcg-small"
    cpus: int = 1
    memory_mb: int = 512
    price_micros_per_s: int = 0
    storage: str | None = None


@dataclass(frozen=True)
class Credentials:
    """Matches oss.compute.pool.Credentials structurally."""

    instance: str
    token: str
    oss_url: str | None


class OssHarness:
    """The real OSS (issue 3) serving inside the lab namespace, if this checkout has it."""

    def __init__(self, oss: Any, runner: Any, url: str) -> None:
        self.oss = oss
        self.runner = runner
        self.url = url

    @staticmethod
    def available() -> str | None:
        """None if the OSS and the agent are importable; otherwise why not."""
        root = source_checkout()
        if not (root / "vmagent" / "__main__.py").is_file():
            return "vmagent (issue 4) is not in this checkout: the guest has no agent to run"
        try:
            import oss.server  # noqa: F401
            import oss.service  # noqa: F401
        except ImportError as exc:
            return f"the OSS (issue 3) is not in this checkout: {exc}"
        return None

    @staticmethod
    async def start(
        data_dir: Path,
        netns: str,
        host: str,
        heartbeat_timeout: float,
        providers: dict[str, Any],
        network: tuple[ipaddress.IPv4Network, str, ipaddress.IPv4Network] | None = None,
    ) -> OssHarness:
        """Serve the OSS on host:<any port> inside `netns` (the guests' gateway)."""
        from oss.server import make_app
        from oss.service import Oss, OssConfig

        sock = await asyncio.to_thread(bridge.listening_socket, netns, host, 0)
        url = f"http://{host}:{sock.getsockname()[1]}"
        oss = Oss(
            OssConfig(
                data_dir=data_dir,
                heartbeat_interval=1.0,
                heartbeat_timeout=heartbeat_timeout,
                tick=0.5,
                public_url=url,
            ),
            providers=providers,
        )
        if network is not None:  # issue 13: program addresses; the host is the lab netns
            prefix, bridge_dev, subnet = network
            oss.use_vm_network(prefix, bridge_dev, subnet, host, netns)
        runner = web.AppRunner(make_app(oss), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        return OssHarness(oss, runner, url)

    async def token(self, name: str) -> str:
        """A fresh instance token for `name`."""
        return str(await self.oss.mint_instance_token(name))

    async def instance(self, name: str) -> dict[str, Any] | None:
        """The OSS's record of instance `name`."""
        rows = await self.oss.instances.instances(None, name)
        return dict(rows[0]) if rows else None

    async def close(self) -> None:
        """Stop serving (make_app's cleanup closes the OSS)."""
        await self.runner.cleanup()


class TokenKeeper:
    """The real provider, remembering the tokens the OSS hands it (tests exec with them)."""

    def __init__(self, provider: LibvirtProvider, tokens: dict[str, str]) -> None:
        self.provider = provider
        self.tokens = tokens

    async def create(self, name: str, instance_type: Any, credentials: Any) -> None:
        """Remember the token, then LibvirtProvider.create."""
        self.tokens[name] = credentials.token
        await self.provider.create(name, instance_type, credentials)

    async def destroy(self, name: str) -> None:
        """LibvirtProvider.destroy."""
        await self.provider.destroy(name)


@dataclass
class Lab:
    """One lab: the resources below exist from `start` until `close`."""

    loop: LoopThread
    work: Path
    netns: str
    bridge_name: str
    subnet: ipaddress.IPv4Network
    heartbeat_timeout: float = 6.0
    image: Image | None = None
    cold: Image | None = None
    daemon: PrivateLibvirtd | None = None
    provider: LibvirtProvider | None = None
    oss: OssHarness | None = None
    oss_missing: str | None = None
    tokens: dict[str, str] = field(default_factory=dict)
    booted: list[str] = field(default_factory=list)
    daemon_pids: dict[str, int] = field(default_factory=dict)
    qemu_pids: dict[str, int] = field(default_factory=dict)
    closed: bool = False
    network_prefix: ipaddress.IPv4Network | None = None  # issue 13: program addresses

    def build_cached_image(self) -> Image:
        """The guest image from this checkout, in the shared cache (~/.cache/dcp/images)."""
        from images.builder import default_cache_dir

        return self.build_image(default_cache_dir())

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The bridge's address inside the lab namespace."""
        return self.subnet[1]

    def build_image(self, cache: Path) -> Image:
        """Build the guest image from this checkout into `cache`."""
        cfg = BuildConfig(source_dir=source_checkout(), cache_dir=cache)
        return Builder(cfg).build()

    async def start(self) -> None:
        """Start libvirtd in the namespace, the OSS on the bridge, and the provider."""
        assert self.image is not None
        self.daemon = PrivateLibvirtd(LibvirtdConfig(netns=self.netns, run_dir=self.work / "run"))
        await self.daemon.start()
        self.daemon_pids = dict(self.daemon.pids)
        self.provider = LibvirtProvider(self.provider_config(self.work / "state"))
        await self.provider.open()  # creates the bridge the OSS listens on
        self.oss_missing = OssHarness.available()
        if self.oss_missing is None:
            self.oss = await OssHarness.start(
                self.work / "oss",
                self.netns,
                str(self.gateway),
                self.heartbeat_timeout,
                {"libvirt": TokenKeeper(self.provider, self.tokens)},
                None
                if self.network_prefix is None
                else (self.network_prefix, self.bridge_name, self.subnet),
            )

    def provider_config(self, state: Path, **kw: Any) -> LibvirtConfig:
        """The lab's provider settings (TCG probe included), with overrides."""
        assert self.image is not None and self.daemon is not None
        values: dict[str, Any] = dict(
            uri=self.daemon.uri,
            image=GuestImage(self.image.base, self.image.kernel, self.image.initrd),
            state_dir=state,
            subnet=self.subnet,
            bridge=self.bridge_name,
            bridge_netns=self.netns,
            extra_cmdline="dcp.ssh=1",
            probe_timeout=8.0,
            call_timeout=60.0,
        )
        values.update(kw)
        return LibvirtConfig(**values)

    async def boot(self, names: list[str], itype: InstanceType | None = None) -> None:
        """Create the instances concurrently and wait for their init to be ready."""
        assert self.provider is not None
        url = self.oss.url if self.oss else f"http://{self.gateway}:9"
        for n in names:
            self.tokens[n] = await self.oss.token(n) if self.oss else f"test-token-{n}"
        async with asyncio.TaskGroup() as tg:
            for n in names:
                cred = Credentials(n, self.tokens[n], url)
                tg.create_task(self.provider.create(n, itype or InstanceType(), cred))
        self.booted += names
        for n in names:
            self.qemu_pids[n] = qemu_pid(self.provider.config.prefix + n)
        async with asyncio.TaskGroup() as tg:
            for n in names:
                tg.create_task(self.provider.wait_serial(n, "dcp-init: starting agent", 120))

    async def registered(self, name: str, seconds: float = 120) -> dict[str, object]:
        """The OSS's row for instance `name` once its agent registered (state ready)."""
        assert self.oss is not None
        async with asyncio.timeout(seconds):
            while True:
                row = await self.oss.instance(name)
                if row and row.get("state") == "ready":
                    return row
                await asyncio.sleep(0.5)

    @property
    def oss_url(self) -> str:
        """The URL the guests were given."""
        return self.oss.url if self.oss else f"http://{self.gateway}:9"

    async def aclose(self) -> list[str]:
        """Release everything; returns the domains still listed after the provider closed."""
        left: list[str] = []
        if self.provider is not None:
            await self.provider.close()
            try:
                import libvirt

                conn = await asyncio.to_thread(libvirt.open, self.provider.config.uri)
                left = [d.name() for d in conn.listAllDomains(0) if d.name().startswith("dcp-")]
                conn.close()
            except Exception:  # the daemon may be gone already: nothing listed
                left = []
        if self.oss is not None:
            await self.oss.close()
        if self.daemon is not None:
            await self.daemon.stop()
        if bridge.netns_exists(self.netns):
            await asyncio.to_thread(bridge.remove_netns, self.netns)
        self.closed = True
        return left


def reap_stale_labs() -> list[int]:
    """Stop the daemons of labs whose test process died without cleaning up.

    Only labs made by make_lab (their work dir records the owner's PID) whose owner
    is gone; their libvirtd/virtlogd are found by the lab's own pid files.
    """
    from oss.compute.providers.libvirtd import LibvirtdConfig, pid_alive, stop_by_pidfiles

    stopped: list[int] = []
    for work in Path("/var/tmp").glob("dcp-vmlab-*"):
        try:
            owner = int((work / "owner.pid").read_text())
            netns = (work / "netns").read_text().strip()
        except (FileNotFoundError, ValueError):
            continue
        if pid_alive(owner):
            continue
        # Its VMs first: qemu outlives libvirtd (the next libvirtd would adopt them).
        for pidfile in Path("/run/libvirt/qemu").glob("dcp-*.pid"):
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            if pid_alive(pid):
                os.kill(pid, 9)
                stopped.append(pid)
            pidfile.unlink(missing_ok=True)
            pidfile.with_suffix(".xml").unlink(missing_ok=True)
        cfg = LibvirtdConfig(netns=netns, run_dir=work / "run")
        stopped += asyncio.run(stop_by_pidfiles(cfg))
        shutil.rmtree(work, ignore_errors=True)
    return stopped


def make_lab(loop: LoopThread, tag: str) -> Lab:
    """A lab with names and a work dir unique to this process."""
    work = Path(tempfile.mkdtemp(prefix=f"dcp-vmlab-{tag}-", dir="/var/tmp"))
    work.chmod(0o755)  # qemu runs as libvirt-qemu and must reach the overlays and logs
    (work / "owner.pid").write_text(str(os.getpid()))
    n = os.getpid() % 10000
    (work / "netns").write_text(f"dcp-vm{tag}{n}")
    return Lab(
        loop=loop,
        work=work,
        netns=f"dcp-vm{tag}{n}",
        bridge_name=f"dcpbr{tag}{n}"[:15],
        subnet=ipaddress.IPv4Network("10.231.7.0/24"),
    )


def qemu_pid(domain: str) -> int:
    """The PID libvirt wrote for a running domain's qemu (0 if none)."""
    path = Path("/run/libvirt/qemu") / f"{domain}.pid"
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return 0


def remove_tree(path: Path) -> None:
    """Delete a lab work dir."""
    shutil.rmtree(path, ignore_errors=True)
