"""The embedded coordinator: the OSS services `dcptrace` needs, in-process.

Zero set-up: one local instance (this machine), the storage service's path
mapping, and process bookkeeping.  The standalone service (`dcp-oss`) and the
cluster wiring (`vmagent.cluster.coordinator`) wrap or replace it behind the same
`tracer.coordinator.Coordinator` protocol.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

from oss.storage.pathmap import PathMap
from tracer.coordinator import (
    Allow,
    Complete,
    Decision,
    ProcessEvent,
    Rewrite,
    SyscallCall,
)
from tracer.syscalls import SyscallTable

log = logging.getLogger(__name__)

LOCAL_INSTANCE = "local"
# Calls whose result (a symlink's target) is shown back as a virtual path; the
# table says which argument is the link, the buffer and its size.
_LINK_READERS = frozenset({"readlink", "readlinkat"})
# Refused with ENOSYS while paths are mapped, since they would reach files
# around the map: an io_uring's IORING_OP_OPENAT, STATX, UNLINKAT, ... take
# paths the kernel reads from the ring, never seen here; a file handle names
# an inode on a filesystem, not a path.  Programs fall back to the plain
# syscalls (liburing users on kernels without io_uring do), which are mapped.
_REFUSED_WHEN_MAPPED = frozenset({"io_uring_setup", "open_by_handle_at"})
# Calls that act on a final symlink itself, never on what it points to (every
# path argument of theirs; the `*at` calls below follow unless told not to).
_NOFOLLOW_LAST = frozenset({
    "lstat", "readlink", "readlinkat", "unlink", "unlinkat", "rmdir", "rename", "renameat",
    "renameat2", "symlink", "symlinkat", "lchown", "lsetxattr", "lgetxattr", "llistxattr",
    "lremovexattr", "mkdir", "mkdirat", "mknod", "mknodat", "link", "umount2",
})  # fmt: skip
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
O_NOFOLLOW = 0o400000
O_CREAT_EXCL = 0o300  # O_CREAT | O_EXCL: a final symlink is not followed (EEXIST)
# Where a call's AT_SYMLINK_NOFOLLOW flags are (argument index).
_AT_FLAGS = {"newfstatat": 3, "fchownat": 4, "utimensat": 3, "faccessat2": 3, "statx": 2,
             "execveat": 4, "fchmodat2": 3, "name_to_handle_at": 4}  # fmt: skip
_OPEN_FLAGS = {"open": 1, "openat": 2}
_NAMING = frozenset({"path", "target", "sockaddr", "sockaddr_out"})  # formats that name files
AF_UNIX = 1
SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path)
NAMESPACE_ROOT = b"/run/dcp/fs/"  # oss.storage.run.FS_ROOT: each instance's dcpfs mounts
_EXECS = {"execve": 0, "execveat": 1}  # the index of the path (argv follows it)


def signed_int(value: int) -> int:
    """A register's low 32 bits as a C int."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _readlink(path: bytes) -> bytes | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


BINPRM_BUF_SIZE = 256  # what the kernel reads of a file to find its `#!` line
AT_FDCWD = -100


def _read_head(path: bytes) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return b""
    try:
        return os.read(fd, BINPRM_BUF_SIZE)
    except OSError:
        return b""
    finally:
        os.close(fd)


def shebang(head: bytes) -> tuple[bytes, bytes | None] | None:
    """(interpreter, optional argument) of a `#!` line, split as binfmt_script does."""
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].split(b"\0", 1)[0].strip(b" \t")
    if not line:
        return None
    name = line.replace(b"\t", b" ").partition(b" ")[0]
    arg = line[len(name) :].strip(b" \t")
    return name, arg or None


def _follows(call: SyscallCall, index: int) -> bool:
    """Does the call follow a symlink in the last component of its path `index`?"""
    name = call.name
    if name in _NOFOLLOW_LAST:
        return False
    if name == "linkat":
        return index == 1 and bool(call.args[4] & AT_SYMLINK_FOLLOW)
    if name in _AT_FLAGS:
        return not call.args[_AT_FLAGS[name]] & AT_SYMLINK_NOFOLLOW
    if name in _OPEN_FLAGS:
        flags = call.args[_OPEN_FLAGS[name]]
        return not flags & O_NOFOLLOW and flags & O_CREAT_EXCL != O_CREAT_EXCL
    return True


# The directories (and links) whose links `_magic` finds, as whole path components.
MAGIC_LINKS = (b"/proc", b"/dev/fd", b"/dev/stdin", b"/dev/stdout", b"/dev/stderr")


def _magic(call: SyscallCall) -> bool:
    """Is the link a readlink reads one of /proc's (fd, cwd, exe: real paths, shown virtual)?

    A symlink stored on disk reads back as stored, as under a bind mount.
    """
    for index, path in call.paths.items():
        full = path if path.startswith(b"/") else call.bases.get(index, b"") + b"/" + path
        if full.startswith((b"/proc/", b"/dev/fd/", b"/dev/std")):
            return True
    return False


class EmbeddedCoordinator:
    """Serves intercepted calls on this machine: path mapping, process records."""

    def __init__(
        self,
        table: SyscallTable,
        pathmap: PathMap | None = None,
        listener: Callable[[ProcessEvent], None] | None = None,
    ) -> None:
        self.table = table
        self.pathmap = pathmap or PathMap({})
        self.events: list[ProcessEvent] = []
        self._listener = listener

    def interception(self) -> frozenset[str]:
        """Path-taking calls (getcwd, the refused ones) when paths are mapped; else nothing."""
        if not self.pathmap:
            return frozenset()
        names = {s.name for s in self.table.values() if _NAMING & set(s.args)}
        names.add("getcwd")
        return frozenset(names | _REFUSED_WHEN_MAPPED)

    def acts_under(self) -> tuple[bytes, ...]:
        """Where a path must be for `on_syscall` to do anything with it: the map's
        virtual and real directories and the magic links', as whole components (a
        path naming none of them lexically, without `..`, is the kernel's:
        `PathMap.resolve`).  An instance tracer lets the others go unseen
        (`vmagent.trace.placing.InstanceCoordinator.skippable`)."""
        return (*MAGIC_LINKS, *(p for pair in self.pathmap.pairs for p in pair))

    def on_syscall(self, call: SyscallCall) -> Decision:
        """Rewrite mapped paths; answer getcwd with the virtual directory."""
        if not self.pathmap:
            return Allow()
        if call.name == "getcwd":
            return self._getcwd(call)
        if call.name in _REFUSED_WHEN_MAPPED:
            return Complete(-errno.ENOSYS)
        spec = self.table[call.nr]
        rewrites: dict[int, bytes] = {}
        if "sockaddr_out" in spec.args:
            return Allow(observe_result=True)  # shown back as the view names it
        for index, path in call.paths.items():
            if spec.args[index] == "target":
                continue  # stored as given, as under a bind mount
            if spec.args[index] == "sockaddr":
                mapped = self._socket_path(path, call.bases.get(index))
                if isinstance(mapped, Complete):
                    return mapped
                if mapped is not None:
                    return Rewrite({index: mapped, index + 1: len(mapped) + 1})
                continue
            follow = _follows(call, index)
            real = self.pathmap.resolve(path, call.bases.get(index), _readlink, follow)
            if real is not None and real != path:
                rewrites[index] = real
        observe = call.name in _LINK_READERS and _magic(call)
        if call.name in _EXECS and rewrites:
            script = self._script(call, rewrites)
            if script is not None:
                return script
        if rewrites:
            log.debug("%s: %s", call.name, rewrites)
            return Rewrite(rewrites, observe_result=observe)
        return Allow(observe_result=observe)

    def _script(self, call: SyscallCall, rewrites: dict[int, bytes]) -> Rewrite | None:
        """The exec of a mapped `#!` script, as the kernel would run it through a bind mount.

        The kernel gives the interpreter the script's path as the exec named it,
        so `$0`, `sys.argv[0]` and `__file__` show the path the program used
        (not the real one the tracer would pass): the exec becomes that of the
        interpreter (itself found through the view), with the argv binfmt_script
        builds: interpreter, its optional argument, the script's path, the rest.
        """
        index = _EXECS[call.name]
        path = call.paths.get(index)
        if path is None or call.argv is None or index not in rewrites:
            return None
        if call.name == "execveat" and not path.startswith(b"/"):
            if signed_int(call.args[0]) != AT_FDCWD or call.args[4]:
                return None  # the kernel would name it /dev/fd/N/...: keep its exec
        script = rewrites[index]
        found = shebang(_read_head(script)) if os.access(script, os.X_OK) else None
        if found is None:
            return None
        interpreter, arg = found
        base = call.bases.get(index) if not interpreter.startswith(b"/") else None
        real = self.pathmap.resolve(interpreter, base, _readlink) or interpreter
        argv = (interpreter, *((arg,) if arg is not None else ()), path, *call.argv[1:])
        return Rewrite({index: real, index + 1: argv})

    def _socket_path(self, path: bytes, base: bytes | None) -> bytes | Complete | None:
        """The AF_UNIX address naming `path`'s real file (None: as it is)."""
        real = self.pathmap.resolve(path, base, _readlink)
        if real is not None and real.startswith(NAMESPACE_ROOT):
            # A socket in the program's namespace (issue 14): the kernel finds a bound
            # socket by inode, which each instance's dcpfs mount numbers apart, so the
            # address names the directory itself (the home's, on local instances: one
            # kernel and disk, so every instance reaches the socket, as before).
            real = self.pathmap.to_virtual(real)
        if real is None or real == path:
            return None
        if len(real) >= SUN_PATH_MAX:
            return Complete(-errno.ENAMETOOLONG)  # the real path does not fit an address
        return AF_UNIX.to_bytes(2, "little") + real

    def _socket_result(self, call: SyscallCall, output: bytes) -> Complete | None:
        """getsockname/getpeername: an AF_UNIX path as the program named it."""
        ((index, size),) = call.sizes.items()
        if len(output) < 3 or int.from_bytes(output[:2], "little") != AF_UNIX:
            return None
        real = output[2:].split(b"\0", 1)[0]
        if not real.startswith(b"/"):
            return None
        virtual = self.pathmap.to_virtual(real)
        if virtual == real:
            return None
        address = AF_UNIX.to_bytes(2, "little") + virtual + b"\0"
        # As the kernel does: the buffer gets what fits, the length is the whole.
        writes = ((call.args[index], address[: max(0, size)]),)
        length = len(address).to_bytes(4, "little")
        return Complete(0, (*writes, (call.args[index + 1], length)))

    def _getcwd(self, call: SyscallCall) -> Decision:
        if call.cwd is None:
            return Allow()
        virtual = self.pathmap.to_virtual(call.cwd)
        if virtual == call.cwd:
            return Allow()
        buf, size = call.args[0], call.args[1]
        if len(virtual) + 1 > size:
            return Complete(-errno.ERANGE)
        return Complete(len(virtual) + 1, ((buf, virtual + b"\0"),))

    def on_result(self, call: SyscallCall, result: int, output: bytes | None) -> Complete | None:
        """Show a /proc magic link's target (a real path) as the view names it."""
        if output is None:
            return None
        if call.sizes:
            return self._socket_result(call, output)
        buf_index = self.table[call.nr].output_arg()
        assert buf_index is not None  # only link readers are observed
        size = call.args[buf_index + 1]
        if result >= size:
            # The kernel may have cut the real target to the program's buffer,
            # and the virtual one can be shorter: read the whole target.
            full = self._read_link(call)
            if full is not None:
                output = full
        if not output.startswith(b"/"):
            return None
        virtual = self.pathmap.to_virtual(output)
        if virtual == output:
            return None
        data = virtual[:size]
        return Complete(len(data), ((call.args[buf_index], data),))

    def _read_link(self, call: SyscallCall) -> bytes | None:
        ((index, _dirfd),) = self.table[call.nr].path_args()
        path = call.paths.get(index)
        if path is None:
            return None
        real = self.pathmap.resolve(path, call.bases.get(index), _readlink, follow=False)
        if real is None and not path.startswith(b"/"):
            base = call.bases.get(index)
            real = base + b"/" + path if base is not None else None
        return _readlink(real or path)

    def on_process(self, event: ProcessEvent) -> None:
        """Keep the lifecycle events and pass them to the local state."""
        self.events.append(event)
        if self._listener is not None:
            self._listener(event)

    def instance_of(self, pid: int) -> str:
        """Everything runs on this machine."""
        return LOCAL_INSTANCE
