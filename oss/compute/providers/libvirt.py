"""Compute instances as libvirt domains (VMs booted from a DCP guest image).

The adapter `LibvirtProvider` runs every blocking libvirt-python call on a worker
thread under `asyncio.timeout`; what it asks libvirt for (URIs, names, addresses,
MACs, the domain and volume XML, the config disk) is decided by the pure
`oss.compute.providers.domain`.

One provider owns: a transient `dir` storage pool for the per-instance qcow2
overlays and config disks (created through libvirt, so it works against remote
hosts too), optionally the lab bridge (local hosts only), and the domains named
`<prefix><instance>`. `close()` releases all of them.

Secrets never go on the kernel command line (it shows in the domain XML, in
qemu's argv on the host and in the guest's /proc/cmdline). The instance token
reaches the guest on a per-instance config disk: a 4 KiB raw volume
(`images.guestinit.encode_config`), mode 0600, uploaded through libvirt into the
pool and attached read-only as a virtio disk with serial `dcp-config`; the guest
init reads it as a block device, which only root there can open. The command
line says only `dcp.config=disk`. On a local host the pool and the serial log
directories are 0711 and 0700 and every file in them 0600.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import ipaddress
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from net import bridge
from oss.compute.providers.domain import (
    AddressBook,
    BadInstance,
    BootFailed,
    DomainSpec,
    DomainType,
    GuestImage,
    ImageMissing,
    LibvirtConfig,
    LibvirtTimeout,
    ProviderError,
    Unreachable,
    check_name,
    config_disk,
    config_volume_xml,
    domain_xml,
    kernel_cmdline,
    mac_for,
    overlay_xml,
    parse_uri,
    pool_xml,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

BOOT_MARKER = "Linux version"


# ---- the adapter's own types -------------------------------------------------------


class InstanceTypeLike(Protocol):
    """The part of `oss.compute.pool.InstanceType` the provider reads."""

    @property
    def cpus(self) -> int: ...

    @property
    def memory_mb(self) -> int: ...


class CredentialsLike(Protocol):
    """The part of `oss.compute.pool.Credentials` the provider reads."""

    @property
    def token(self) -> str: ...

    @property
    def oss_url(self) -> str | None: ...


@dataclass
class Instance:
    """One VM the provider started."""

    name: str
    domain: str
    address: ipaddress.IPv4Interface
    mac: str
    volume: str
    serial_log: Path
    started_at: float

    @property
    def config_volume(self) -> str:
        """The name of the instance's config disk volume in the pool."""
        return self.domain + ".config"


class DomainState(enum.Enum):
    """What libvirt says about an instance's domain."""

    RUNNING = "running"
    STOPPED = "stopped"
    GONE = "gone"


# ---- adapter -----------------------------------------------------------------------


class LibvirtProvider:
    """Boots DCP guests as transient libvirt domains (implements oss.compute.pool.Provider)."""

    def __init__(self, config: LibvirtConfig) -> None:
        self.config = config
        self.uri = parse_uri(config.uri)
        self.addresses = AddressBook(config.subnet)
        self.instances: dict[str, Instance] = {}
        self.domain_type: DomainType | None = None
        self._conn: Any = None
        self._pool: Any = None
        self._image: GuestImage | None = None
        self._made_bridge = False
        self._lock = asyncio.Lock()

    # -- plumbing --

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking libvirt call on a thread, bounded by the call timeout."""
        import libvirt

        try:
            async with asyncio.timeout(self.config.call_timeout):
                return await asyncio.to_thread(fn, *args)
        except TimeoutError as exc:
            raise LibvirtTimeout(
                f"libvirt {what} did not answer within {self.config.call_timeout:.0f} s"
            ) from exc
        except libvirt.libvirtError as exc:
            raise ProviderError(f"libvirt {what}: {exc.get_error_message()}") from exc

    @property
    def conn(self) -> Any:
        """The open libvirt connection."""
        if self._conn is None:
            raise ProviderError("the provider is not open (call open() first)")
        return self._conn

    # -- lifecycle --

    async def open(self) -> None:
        """Connect, stage the image, create the overlay pool and bridge, pick KVM or TCG."""
        import libvirt

        for f in self.config.image.files():
            if not self.uri.remote and not f.is_file():
                raise ImageMissing(f"guest image file {f} does not exist (run dcp-image build)")
        libvirt.registerErrorHandler(_quiet_libvirt_errors, None)
        try:
            self._conn = await self._call("connect", libvirt.open, self.config.uri)
        except ProviderError as exc:
            raise Unreachable(f"cannot reach libvirt at {self.config.uri}: {exc}") from exc
        try:
            self._image = await asyncio.to_thread(self._stage_image)
            await self._open_pool()
            if self.config.bridge is not None and self.config.manage_bridge:
                if self.uri.remote:
                    raise ProviderError("manage_bridge works on the local host only")
                spec = bridge.BridgeSpec(self.config.bridge, self.addresses.gateway)
                self._made_bridge = await self._net(
                    bridge.create_bridge, spec, self.config.bridge_netns
                )
            self.domain_type = await self._detect_domain_type()
            log.info(
                "libvirt provider on %s: domain type %s", self.config.uri, self.domain_type.value
            )
        except BaseException:
            await self.close()
            raise

    async def __aenter__(self) -> LibvirtProvider:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Destroy every instance of this provider, the pool and the bridge it made."""
        for name in list(self.instances):
            with contextlib.suppress(ProviderError):
                await self.destroy(name)
        if self._pool is not None:
            with contextlib.suppress(ProviderError):
                await self._call("pool destroy", self._pool.destroy)
            self._pool = None
        if self._made_bridge and self.config.bridge is not None:
            await self._net(bridge.delete_link, self.config.bridge, self.config.bridge_netns)
            self._made_bridge = False
        if self._conn is not None:
            with contextlib.suppress(ProviderError):
                await self._call("close", self._conn.close)
            self._conn = None

    async def _net(self, fn: Callable[..., T], *args: Any) -> T:
        async with asyncio.timeout(self.config.call_timeout):
            return await asyncio.to_thread(fn, *args)

    def _stage_image(self) -> GuestImage:
        """Local hosts: link the image into state_dir, which qemu's user can traverse."""
        if self.uri.remote:
            return self.config.image
        img_dir = self.config.state_dir / "image"
        img_dir.mkdir(parents=True, exist_ok=True)
        for d in (self.config.state_dir, img_dir):
            d.chmod(0o755)
        staged: dict[str, Path] = {}
        for f in self.config.image.files():
            dst = img_dir / f.name
            if not _same_file(f, dst):
                dst.unlink(missing_ok=True)
                try:
                    os.link(f, dst)
                except OSError:  # another file system: a copy with the same mtime
                    shutil.copy2(f, dst)
            staged[str(f)] = dst
        img = self.config.image
        return GuestImage(
            staged[str(img.base)],
            staged[str(img.kernel)],
            staged[str(img.initrd)] if img.initrd else None,
        )

    async def _open_pool(self) -> None:
        import libvirt

        path = self.config.state_dir / "overlays"
        name = f"{self.config.prefix}overlays-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        if not self.uri.remote:
            # qemu's user opens the volumes by path (0711: it can, nobody can list them);
            # libvirt opens the serial logs itself and hands qemu the descriptor (0700).
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o711)
            (self.config.state_dir / "serial").mkdir(exist_ok=True)
            (self.config.state_dir / "serial").chmod(0o700)
        try:
            old = await self._call("pool lookup", self.conn.storagePoolLookupByName, name)
            with contextlib.suppress(ProviderError):
                await self._call("pool destroy", old.destroy)
        except ProviderError:
            pass
        self._pool = await self._call(
            "pool create",
            self.conn.storagePoolCreateXML,
            pool_xml(name, path),
            libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD,
        )

    async def _detect_domain_type(self) -> DomainType:
        """KVM only if a KVM guest really prints its first kernel line in time."""
        wanted = self.config.domain_type
        if wanted != "auto":
            return DomainType(wanted)
        if self.uri.remote:
            # The probe reads the console file, which is on the other host: there,
            # trust what libvirt advertises (set domain_type to override).
            try:
                await self._call(
                    "kvm capabilities", self.conn.getDomainCapabilities, None, "x86_64", None, "kvm"
                )
                return DomainType.KVM
            except ProviderError:
                return DomainType.QEMU
        if not Path("/dev/kvm").exists():
            return DomainType.QEMU
        ok = await self._probe(DomainType.KVM)
        if not ok:
            log.warning(
                "KVM guest showed no kernel output in %.0f s: using TCG", self.config.probe_timeout
            )
        return DomainType.KVM if ok else DomainType.QEMU

    async def _probe(self, dtype: DomainType) -> bool:
        assert self._image is not None
        name = f"{self.config.prefix}probe-{os.getpid()}"
        serial = self.config.state_dir / "serial" / f"{name}.log"
        _private_file(serial)
        spec = DomainSpec(
            name=name,
            domain_type=dtype,
            cpus=1,
            memory_mb=256,
            image=GuestImage(self._image.base, self._image.kernel, None),
            disk=None,
            cmdline="console=ttyS0 panic=-1 earlyprintk=serial",
            mac=mac_for(name),
            bridge=None,
            serial_log=serial,
        )
        try:
            dom = await self._call("probe start", self.conn.createXML, domain_xml(spec), 0)
        except ProviderError as exc:
            log.warning("KVM probe domain did not start: %s", exc)
            return False
        try:
            deadline = time.monotonic() + self.config.probe_timeout
            while time.monotonic() < deadline:
                if BOOT_MARKER in _read_text(serial):
                    return True
                await asyncio.sleep(0.2)
            return False
        finally:
            with contextlib.suppress(ProviderError):
                await self._call("probe destroy", dom.destroy)
            serial.unlink(missing_ok=True)

    # -- Provider protocol --

    async def create(
        self, name: str, instance_type: InstanceTypeLike, credentials: CredentialsLike
    ) -> None:
        """Boot instance `name`; its agent registers with the OSS when up."""
        check_name(name)
        if not 1 <= instance_type.cpus <= self.config.max_cpus:
            raise BadInstance(f"cpus must be 1..{self.config.max_cpus}", name)
        if not 128 <= instance_type.memory_mb <= self.config.max_memory_mb:
            raise BadInstance(f"memory_mb must be 128..{self.config.max_memory_mb}", name)
        if self._image is None or self.domain_type is None:
            raise ProviderError("the provider is not open (call open() first)", name)
        async with self._lock:
            if name in self.instances:
                raise BadInstance(f"instance {name} already exists", name)
            address = self.addresses.lease(name)
            mac = mac_for(name, (i.mac for i in self.instances.values()))
            domain = f"{self.config.prefix}{name}"
            serial = self.config.state_dir / "serial" / f"{name}.log"
            inst = Instance(name, domain, address, mac, f"{domain}.qcow2", serial, time.monotonic())
            self.instances[name] = inst
        try:
            await self._boot(inst, instance_type, credentials)
        except BaseException:
            await self._destroy_domain(inst.domain)
            await self._release(inst)
            raise

    async def _boot(self, inst: Instance, itype: InstanceTypeLike, cred: CredentialsLike) -> None:
        assert self._image is not None and self.domain_type is not None
        config = config_disk(inst.name, cred.token)
        cmdline = kernel_cmdline(
            inst.name,
            cred.oss_url,
            inst.address,
            self.addresses.gateway.ip,
            self.config.listen_port,
            self.config.extra_cmdline,
            config_disk=True,
        )
        if not self.uri.remote:
            await asyncio.to_thread(_private_file, inst.serial_log)
        capacity = await self._base_capacity()
        vol = await self._call(
            "overlay create",
            self._pool.createXML,
            overlay_xml(inst.volume, self._image.base, capacity),
            0,
        )
        disk = Path(await self._call("overlay path", vol.path))
        config_path = await self._upload_config(inst.config_volume, config)
        spec = DomainSpec(
            inst.domain,
            self.domain_type,
            itype.cpus,
            itype.memory_mb,
            self._image,
            disk,
            cmdline,
            inst.mac,
            self.config.bridge,
            inst.serial_log,
            config_path,
        )
        try:
            await self._call("domain create", self.conn.createXML, domain_xml(spec), 0)
        except ProviderError as exc:
            raise BootFailed(f"instance {inst.name} did not start: {exc}", inst.name) from exc
        if self.config.boot_marker and not self.uri.remote:
            # A kernel that does not boot leaves qemu running with a silent console.
            await self.wait_serial(inst.name, self.config.boot_marker, self.config.boot_timeout)
        log.info("instance %s booting: %s %s", inst.name, inst.address, inst.mac)

    async def _upload_config(self, volume: str, data: bytes) -> Path:
        """Create the 0600 config volume in the pool and write `data` into it via libvirt."""
        vol = await self._call(
            "config create", self._pool.createXML, config_volume_xml(volume, len(data)), 0
        )

        def upload() -> None:
            stream = self.conn.newStream(0)
            try:
                vol.upload(stream, 0, len(data), 0)
                stream.send(data)
                stream.finish()
            except BaseException:
                with contextlib.suppress(Exception):
                    stream.abort()
                raise

        await self._call("config upload", upload)
        return Path(await self._call("config path", vol.path))

    async def _base_capacity(self) -> int:
        """The base image's virtual size: from its qcow2 header here, via libvirt remotely."""
        assert self._image is not None
        if not self.uri.remote:
            from images.qcow2 import virtual_size

            return await asyncio.to_thread(virtual_size, self._image.base)
        try:
            vol = await self._call(
                "base lookup", self.conn.storageVolLookupByPath, str(self._image.base)
            )
            info = await self._call("base info", vol.info)
            return int(info[1])
        except ProviderError:
            # The base is in no libvirt pool on that host: qemu-img's view is the same size.
            return self.config.remote_disk_bytes

    async def destroy(self, name: str) -> None:
        """Stop instance `name` and delete its overlay (idempotent)."""
        inst = self.instances.get(name)
        await self._destroy_domain(inst.domain if inst else f"{self.config.prefix}{name}")
        if inst is not None:
            await self._release(inst)

    async def _destroy_domain(self, domain: str) -> None:
        with contextlib.suppress(ProviderError):  # not found: already gone, fine
            dom = await self._call("lookup", self.conn.lookupByName, domain)
            with contextlib.suppress(ProviderError):  # it may power off meanwhile
                await self._call("destroy", dom.destroy)

    async def _release(self, inst: Instance) -> None:
        if self._pool is not None:
            for volume in (inst.volume, inst.config_volume):
                with contextlib.suppress(ProviderError):
                    vol = await self._call(
                        "volume lookup", self._pool.storageVolLookupByName, volume
                    )
                    await self._call("volume delete", vol.delete, 0)
        self.addresses.release(inst.name)
        self.instances.pop(inst.name, None)

    async def state(self, name: str) -> DomainState:
        """Running, stopped, or gone, as libvirt sees the domain now."""
        import libvirt

        domain = f"{self.config.prefix}{name}"
        try:
            dom = await self._call("lookup", self.conn.lookupByName, domain)
            st, _reason = await self._call("state", dom.state)
        except ProviderError:
            return DomainState.GONE
        return DomainState.RUNNING if st == libvirt.VIR_DOMAIN_RUNNING else DomainState.STOPPED

    async def domains(self) -> list[str]:
        """Names of this provider's running domains (by prefix)."""
        ids = await self._call("list", self.conn.listAllDomains, 0)
        names = [d.name() for d in ids]
        return [n for n in names if n.startswith(self.config.prefix)]

    def serial_log(self, name: str) -> Path:
        """Where instance `name`'s serial console goes."""
        return self.config.state_dir / "serial" / f"{name}.log"

    def address(self, name: str) -> ipaddress.IPv4Address:
        """Instance `name`'s address on the lab subnet."""
        return self.instances[name].address.ip

    async def wait_serial(self, name: str, needle: str, timeout: float) -> str:
        """Wait until the serial log contains `needle`; return the log. BootFailed otherwise."""
        path = self.serial_log(name)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    text = await asyncio.to_thread(_read_text, path)
                    if needle in text:
                        return text
                    if await self.state(name) is not DomainState.RUNNING:
                        text = await asyncio.to_thread(_read_text, path)
                        if needle in text:
                            return text
                        raise BootFailed(
                            f"instance {name} stopped before {needle!r}; log tail: {text[-600:]!r}",
                            name,
                        )
                    await asyncio.sleep(0.25)
        except TimeoutError as exc:
            raise BootFailed(
                f"instance {name}: no {needle!r} on the console in {timeout:.0f} s", name
            ) from exc

    async def wait_state(
        self, name: str, want: DomainState | set[DomainState], timeout: float
    ) -> DomainState:
        """Poll the domain until its state is in `want`."""
        wanted = {want} if isinstance(want, DomainState) else want
        async with asyncio.timeout(timeout):
            while True:
                st = await self.state(name)
                if st in wanted:
                    return st
                await asyncio.sleep(0.25)


def _same_file(src: Path, dst: Path) -> bool:
    """dst is src (hard link) or a copy of it (same size and mtime)."""
    try:
        a, b = src.stat(), dst.stat()
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or (
        a.st_size == b.st_size and int(a.st_mtime) == int(b.st_mtime)
    )


def _private_file(path: Path) -> None:
    """An empty file only root can read at `path` (a serial log libvirt will append to)."""
    path.unlink(missing_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except (FileNotFoundError, PermissionError):
        return ""


def _quiet_libvirt_errors(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""
