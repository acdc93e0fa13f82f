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


def _readlink(path: bytes) -> bytes | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


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
        names = {s.name for s in self.table.values() if "path" in s.args or "target" in s.args}
        names.add("getcwd")
        return frozenset(names | _REFUSED_WHEN_MAPPED)

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
        for index, path in call.paths.items():
            if spec.args[index] == "target":
                real = self.pathmap.map_target(path)
            else:
                real = self.pathmap.resolve(path, call.bases.get(index), _readlink)
            if real is not None and real != path:
                rewrites[index] = real
        observe = call.name in _LINK_READERS
        if rewrites:
            log.debug("%s: %s", call.name, rewrites)
            return Rewrite(rewrites, observe_result=observe)
        return Allow(observe_result=observe)

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
        """Show a symlink's target as the program stored it (virtual)."""
        if output is None:
            return None
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
        real = self.pathmap.resolve(path, call.bases.get(index), _readlink)
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
