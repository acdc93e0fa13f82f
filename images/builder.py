"""Building the guest image (the I/O adapter around mmdebstrap, pip, depmod, mkfs, qemu-img).

Steps: resolve inputs -> cache lookup -> mmdebstrap -> wheels -> DCP packages ->
modules + depmod -> init and users -> initramfs -> ext4 -> qcow2 -> Vagrant box ->
manifest. Every input goes into the cache key; a finished entry is reused as is.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Protocol

from images import cpio, pydeps, sources, spec
from images.errors import (
    ImageError,
    KernelNotFound,
    MirrorNotFound,
    ModulesNotFound,
    OutputDirError,
    StepFailed,
    ToolMissing,
)

log = logging.getLogger(__name__)

IMAGE_FILES = ("base.qcow2", "vmlinuz", "initrd.img", "dcp.box", "manifest.json")
TOOLS = ("mmdebstrap", "mkfs.ext4", "qemu-img", "modprobe", "depmod", "dpkg-query", "apt-cache")
GUEST_EXTRAS = ("storage",)  # optional dependencies the guest installs too
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
VAGRANT_KEY_GLOB = "/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub"


class Reporter(Protocol):
    """Where the builder says what it is doing (a rich progress display, or nothing)."""

    def step(self, title: str) -> contextlib.AbstractContextManager[None]:
        """A long step; the context ends when the step does."""
        ...

    def note(self, message: str) -> None:
        """A one-line remark."""
        ...


class QuietReporter:
    """A reporter that only logs."""

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        """Log the step's start and duration."""
        t0 = time.monotonic()
        log.info("step %s", title)
        yield
        log.info("step %s done in %.1f s", title, time.monotonic() - t0)

    def note(self, message: str) -> None:
        """Log the remark."""
        log.info("%s", message)


@dataclass(frozen=True)
class BuildConfig:
    """Validated inputs of one build."""

    source_dir: Path
    cache_dir: Path
    out_dir: Path | None = None
    kernel: Path | None = None
    suite: str = "bookworm"
    force: bool = False
    extra_packages: tuple[str, ...] = ()


@dataclass(frozen=True)
class Image:
    """A built image: its files and manifest."""

    directory: Path
    base: Path
    kernel: Path
    initrd: Path
    box: Path
    manifest: dict[str, object]
    cached: bool

    @staticmethod
    def load(directory: Path, cached: bool) -> Image:
        """The image whose files are in `directory` (manifest.json must exist)."""
        manifest = json.loads((directory / "manifest.json").read_text())
        return Image(
            directory=directory,
            base=directory / "base.qcow2",
            kernel=directory / "vmlinuz",
            initrd=directory / "initrd.img",
            box=directory / "dcp.box",
            manifest=manifest,
            cached=cached,
        )


def default_cache_dir() -> Path:
    """~/.cache/dcp/images (or under $XDG_CACHE_HOME): outside the repository."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dcp" / "images"


def source_checkout() -> Path:
    """The checkout this builder runs from (its DCP packages go into the guest)."""
    return Path(__file__).resolve().parent.parent


@dataclass
class _Inputs:
    spec: spec.ImageSpec
    kernel: Path
    debian_packages: tuple[str, ...]
    wheels: tuple[str, ...]
    notes: list[str] = field(default_factory=list)


class Builder:
    """Builds (or finds in the cache) the guest image for a config."""

    def __init__(self, config: BuildConfig, reporter: Reporter | None = None) -> None:
        self.config = config
        self.reporter: Reporter = reporter or QuietReporter()

    # ---- inputs -------------------------------------------------------------------

    def check(self) -> None:
        """Fail early and clearly on bad input (before any long step)."""
        out = self.config.out_dir
        if out is not None:
            if out.exists() and not out.is_dir():
                raise OutputDirError(f"output path {out} exists and is not a directory", out)
            parent = out if out.exists() else out.parent
            if not parent.exists():
                raise OutputDirError(f"output directory's parent {parent} does not exist", out)
            if not os.access(parent, os.W_OK):
                raise OutputDirError(f"output directory {parent} is not writable", out)
        if self.config.kernel is not None and not self.config.kernel.is_file():
            raise KernelNotFound(f"kernel {self.config.kernel} is not a file", self.config.kernel)
        for pkg in spec.DCP_PACKAGES:
            if not (self.config.source_dir / pkg / "__init__.py").is_file():
                raise ImageError(f"{self.config.source_dir} is not a DCP checkout (no {pkg}/)")
        missing = [t for t in TOOLS if shutil.which(t) is None and not _in_sbin(t)]
        if missing:
            raise ToolMissing(
                f"missing build tools: {', '.join(missing)} (see .ci/apt-vm.txt)", missing[0]
            )

    def _kernel(self) -> tuple[Path, str]:
        versions = [p.name for p in Path("/lib/modules").glob("*") if p.is_dir()]
        if self.config.kernel is not None:
            kernel = self.config.kernel
        else:
            found = sorted(Path("/boot").glob("vmlinuz-*"))
            if not found:
                raise KernelNotFound(
                    "no /boot/vmlinuz-*: install linux-image-amd64 or pass --kernel PATH"
                )
            kernel = found[-1]
        version = spec.kernel_version(kernel.name, versions)
        if version is None:
            raise ModulesNotFound(
                f"no /lib/modules/<version> matches kernel {kernel} "
                f"(installed: {', '.join(sorted(versions)) or 'none'})",
                kernel.name,
            )
        return kernel, version

    def _mirrors(self) -> list[sources.AptSource]:
        found: list[sources.AptSource] = []
        for path in APT_SOURCES:
            files = sorted(path.glob("*")) if path.is_dir() else [path]
            for f in files:
                if not f.is_file():
                    continue
                text = f.read_text(errors="replace")
                if f.suffix == ".sources":
                    found += sources.parse_deb822(text)
                elif f.suffix == ".list" or f.name == "sources.list":
                    found += sources.parse_one_line(text)
        mirrors = sources.mirrors_for(found, self.config.suite)
        if not mirrors or mirrors[0].suite != self.config.suite:
            raise MirrorNotFound(
                f"no apt source for suite {self.config.suite!r} in /etc/apt/sources.list(.d)"
            )
        return mirrors

    def _python_plan(self) -> pydeps.PythonDepsPlan:
        pyproject = self.config.source_dir / "pyproject.toml"
        project = tomllib.loads(pyproject.read_text())["project"]
        reqs = list(project["dependencies"])
        # The extras a guest's agent uses (dcpfs's FUSE binding: issue 14).
        for extra in GUEST_EXTRAS:
            reqs += project.get("optional-dependencies", {}).get(extra, [])
        names = [pydeps.debian_name(r) for r in reqs]
        res = subprocess.run(
            ["apt-cache", "policy", *names], capture_output=True, text=True, timeout=60
        )
        return pydeps.plan(reqs, pydeps.parse_apt_policy(res.stdout))

    def _source_hash(self) -> str:
        files: list[tuple[PurePath, bytes]] = []
        root = self.config.source_dir
        for pkg in spec.DCP_PACKAGES:
            for p in sorted((root / pkg).rglob("*.py")):
                files.append((p.relative_to(root), p.read_bytes()))
        here = Path(__file__).resolve().parent
        for name in ("guestinit.py", "builder.py", "spec.py", "cpio.py"):
            files.append((PurePath("images", name), (here / name).read_bytes()))
        files.append((PurePath("pyproject.toml"), (root / "pyproject.toml").read_bytes()))
        return spec.hash_files(files)

    def inputs(self) -> _Inputs:
        """Resolve every input and the spec whose hash is the cache key."""
        kernel, version = self._kernel()
        mirrors = self._mirrors()
        plan = self._python_plan()
        packages = tuple(
            dict.fromkeys(spec.BASE_PACKAGES + plan.debian + self.config.extra_packages)
        )
        key_files = sorted(glob.glob(VAGRANT_KEY_GLOB))
        vagrant_key = Path(key_files[-1]).read_text().strip() if key_files else ""
        image_spec = spec.ImageSpec(
            suite=self.config.suite,
            mirrors=tuple(m.line() for m in mirrors),
            packages=packages,
            wheels=plan.wheels,
            kernel_version=version,
            kernel_sha256=hashlib.sha256(kernel.read_bytes()).hexdigest(),
            source_sha256=self._source_hash(),
            vagrant_key=vagrant_key,
        )
        return _Inputs(image_spec, kernel, packages, plan.wheels)

    # ---- build --------------------------------------------------------------------

    def build(self) -> Image:
        """Build the image, or reuse the cached one with the same inputs."""
        self.check()
        with self.reporter.step("resolving inputs"):
            inputs = self.inputs()
        key = inputs.spec.key()
        entry = self.config.cache_dir / key[:16]
        if (entry / "manifest.json").is_file() and not self.config.force:
            self.reporter.note(f"inputs unchanged: cached image {entry}")
            image = Image.load(entry, cached=True)
        else:
            image = self._build_into(entry, inputs, key)
        if self.config.out_dir is not None:
            return self._export(image, self.config.out_dir)
        return image

    def _build_into(self, entry: Path, inputs: _Inputs, key: str) -> Image:
        t0 = time.monotonic()
        self.config.cache_dir.mkdir(parents=True, exist_ok=True)
        work = self.config.cache_dir / f"tmp-{key[:16]}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            root = work / "rootfs"
            self._bootstrap(root, inputs)
            pyver = _guest_python(root)
            site = root / "usr/local/lib" / pyver / "dist-packages"
            self._wheels(site, inputs.wheels, pyver)
            self._dcp_packages(site)
            modules = self._modules(root, inputs.spec.kernel_version)
            self._configure(root, inputs.spec)
            packages = self._package_versions(root)
            self._trim(root)
            out = work / "image"
            out.mkdir()
            shutil.copyfile(inputs.kernel, out / "vmlinuz")
            self._initramfs(root, modules, inputs.spec.kernel_version, out / "initrd.img")
            size = self._disk(root, work / "root.img", out / "base.qcow2")
            content = _sha256_file(out / "base.qcow2")
            manifest: dict[str, object] = {
                "format": 1,
                "inputs_sha256": key,
                "content_sha256": content,
                "suite": inputs.spec.suite,
                "kernel_version": inputs.spec.kernel_version,
                "kernel_sha256": inputs.spec.kernel_sha256,
                "kernel_cmdline": "console=ttyS0 panic=-1 root=/dev/vda rw",
                "guest_python": pyver,
                "packages": packages,
                "wheels": list(inputs.wheels),
                "modules": list(inputs.spec.guest_modules),
                "source_sha256": inputs.spec.source_sha256,
                "vagrant_user": bool(inputs.spec.vagrant_key),
                "virtual_size": size,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": 0.0,
                "spec": asdict(inputs.spec),
            }
            self._box(out, size)
            manifest["build_seconds"] = round(time.monotonic() - t0, 1)
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=list))
            shutil.rmtree(entry, ignore_errors=True)
            out.rename(entry)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return Image.load(entry, cached=False)

    def _bootstrap(self, root: Path, inputs: _Inputs) -> None:
        with self.reporter.step(
            f"mmdebstrap {inputs.spec.suite} ({len(inputs.debian_packages)} packages)"
        ):
            argv = [
                "mmdebstrap",
                "--variant=minbase",
                "--mode=root",
                f"--include={','.join(inputs.debian_packages)}",
                "--hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr",
                *(f"--dpkgopt=path-exclude={p}" for p in spec.DPKG_EXCLUDES),
                "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                "--format=directory",
                inputs.spec.suite,
                str(root),
                *inputs.spec.mirrors,
            ]
            _run("mmdebstrap", argv, timeout=900)

    def _wheels(self, site: Path, wheels: Sequence[str], pyver: str) -> None:
        if not wheels:
            return
        version = pyver.removeprefix("python")
        with self.reporter.step(f"wheels for the guest's {pyver}: {', '.join(wheels)}"):
            site.mkdir(parents=True, exist_ok=True)
            nodot = version.replace(".", "")
            argv = [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-warn-conflicts",
                "--target",
                str(site),
                "--only-binary=:all:",
                "--platform",
                "manylinux2014_x86_64",
                "--python-version",
                version,
                "--implementation",
                "cp",
                "--abi",
                f"cp{nodot}",
                *wheels,
            ]
            _run("wheels", argv, timeout=600)
            shutil.rmtree(site / "bin", ignore_errors=True)

    def _dcp_packages(self, site: Path) -> None:
        with self.reporter.step("DCP packages"):
            site.mkdir(parents=True, exist_ok=True)
            for pkg in spec.DCP_PACKAGES:
                shutil.copytree(
                    self.config.source_dir / pkg,
                    site / pkg,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    dirs_exist_ok=True,
                )
            _run("compileall", [sys.executable, "-m", "compileall", "-q", str(site)], timeout=300)

    def _modules(self, root: Path, version: str) -> list[Path]:
        """Copy guest + initramfs modules with dependencies; depmod. Returns initramfs files."""
        with self.reporter.step(f"kernel modules {version}"):
            src = Path("/lib/modules") / version
            if not src.is_dir():
                raise ModulesNotFound(f"{src} does not exist", version)
            dst = root / "lib/modules" / version
            dst.mkdir(parents=True, exist_ok=True)
            for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
                if (src / meta).exists():
                    shutil.copyfile(src / meta, dst / meta)
            initramfs: list[Path] = []
            names = dict.fromkeys(spec.GUEST_MODULES + spec.INITRAMFS_MODULES)
            for name in names:
                res = subprocess.run(
                    ["modprobe", "-S", version, "--show-depends", name],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                if res.returncode != 0:
                    raise StepFailed(
                        f"module {name} not found for {version}", "modules", res.stderr
                    )
                for path in map(Path, spec.parse_show_depends(res.stdout)):
                    target = dst / path.relative_to(src)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
                    if name in spec.INITRAMFS_MODULES and path not in initramfs:
                        initramfs.append(path)
            _run("depmod", ["depmod", "-b", str(root), version], timeout=120)
            return initramfs

    def _configure(self, root: Path, image_spec: spec.ImageSpec) -> None:
        with self.reporter.step("init, settings and users"):
            init = root / "sbin/dcp-init"
            shutil.copyfile(Path(__file__).resolve().parent / "guestinit.py", init)
            init.chmod(0o755)
            etc = root / "etc"
            (etc / "dcp").mkdir(exist_ok=True)
            (etc / "dcp/modules").write_text("\n".join(image_spec.guest_modules) + "\n")
            dhcp = etc / "dcp/udhcpc.sh"
            dhcp.write_text(spec.UDHCPC_SCRIPT)
            dhcp.chmod(0o755)
            for name in spec.POWER_COMMANDS:
                command = root / "usr/sbin" / name
                command.unlink(missing_ok=True)
                command.write_text(spec.POWER_SCRIPT)
                command.chmod(0o755)
            (etc / "hostname").write_text("dcp-guest\n")
            (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
            (etc / "fstab").write_text("/dev/vda / ext4 rw 0 1\n")
            if image_spec.vagrant_key:
                self._vagrant_user(root, image_spec.vagrant_key)

    def _vagrant_user(self, root: Path, key: str) -> None:
        _run("useradd", ["chroot", str(root), "useradd", "-m", "-s", "/bin/sh", "vagrant"], 60)
        ssh = root / "home/vagrant/.ssh"
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        (ssh / "authorized_keys").write_text(key + "\n")
        (ssh / "authorized_keys").chmod(0o600)
        _run("chown", ["chroot", str(root), "chown", "-R", "vagrant:vagrant", "/home/vagrant"], 60)
        sudoers = root / "etc/sudoers.d/vagrant"
        sudoers.write_text("vagrant ALL=(ALL) NOPASSWD: ALL\n")
        sudoers.chmod(0o440)

    def _package_versions(self, root: Path) -> dict[str, str]:
        res = subprocess.run(
            ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f=${Package}\t${Version}\n"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return dict(line.split("\t", 1) for line in res.stdout.splitlines() if "\t" in line)

    def _trim(self, root: Path) -> None:
        for rel in ("var/lib/apt/lists", "var/cache/apt", "var/cache/debconf", "var/log"):
            path = root / rel
            if path.is_dir():
                for child in path.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()

    def _initramfs(self, root: Path, modules: list[Path], version: str, out: Path) -> None:
        with self.reporter.step("initramfs"):
            busybox = root / "bin/busybox"
            if not busybox.exists():
                busybox = root / "usr/bin/busybox"
            entries = [
                cpio.Entry.directory(d)
                for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules")
            ]
            entries.append(cpio.Entry.file("bin/busybox", busybox.read_bytes(), 0o755))
            names = []
            for path in modules:
                entries.append(cpio.Entry.file(f"lib/modules/{path.name}", path.read_bytes()))
                names.append(path.name.removesuffix(".ko"))
            entries.append(cpio.Entry.file("init", spec.initramfs_init(names).encode(), 0o755))
            out.write_bytes(cpio.archive(entries))

    def _disk(self, root: Path, raw: Path, qcow2: Path) -> int:
        with self.reporter.step("ext4 file system and qcow2 base"):
            used = _tree_size(root)
            size_mb = spec.disk_size_mb(used)
            _run(
                "mkfs.ext4",
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-L",
                    "dcproot",
                    "-d",
                    str(root),
                    "-E",
                    "root_owner=0:0",
                    str(raw),
                    f"{size_mb}M",
                ],
                timeout=600,
            )
            _run("qemu-img", ["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], 600)
            raw.unlink()
            return size_mb * 2**20

    def _box(self, out: Path, size: int) -> None:
        with self.reporter.step("Vagrant box"):
            meta = json.dumps(spec.box_metadata(size)).encode()
            vagrantfile = (Path(__file__).resolve().parent / "box.Vagrantfile").read_bytes()
            with tarfile.open(out / "dcp.box", "w") as tar:
                _add_bytes(tar, "metadata.json", meta)
                _add_bytes(tar, "Vagrantfile", vagrantfile)
                tar.add(out / "base.qcow2", arcname="box.img")
                tar.add(out / "vmlinuz", arcname="vmlinuz")
                tar.add(out / "initrd.img", arcname="initrd.img")

    def _export(self, image: Image, out: Path) -> Image:
        with self.reporter.step(f"copying the image to {out}"):
            out.mkdir(parents=True, exist_ok=True)
            for name in IMAGE_FILES:
                dst = out / name
                if dst.exists():
                    dst.unlink()
                try:
                    os.link(image.directory / name, dst)
                except OSError:
                    shutil.copyfile(image.directory / name, dst)
        return Image.load(out, cached=image.cached)


def _in_sbin(tool: str) -> bool:
    return any(Path(d, tool).exists() for d in ("/usr/sbin", "/sbin"))


def _run(step: str, argv: Sequence[str], timeout: float) -> None:
    env = dict(os.environ)
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError as exc:
        raise ToolMissing(f"{argv[0]} is not installed", argv[0]) from exc
    except subprocess.TimeoutExpired as exc:
        raise StepFailed(f"{step} took longer than {timeout:.0f} s", step) from exc
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise StepFailed(f"{step} failed (exit {res.returncode}):\n{tail}", step, res.stderr)


def _guest_python(root: Path) -> str:
    found = sorted(p.name for p in (root / "usr/lib").glob("python3.*") if p.is_dir())
    if not found:
        raise StepFailed("the rootfs has no python3", "bootstrap")
    return found[-1]


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))
