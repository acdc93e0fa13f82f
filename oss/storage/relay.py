"""The OSS relays a program's storage to the instances it runs on (issue 14, VMs).

The run's owner (`dcptrace --oss`) holds the account token, not the instances':
it gives the OSS its storage spec (the SFTP server's address, pinned host key,
the run's key, the tiers) once, and asks for a mount on each instance before the
first process placed there starts.  The OSS hands the spec to that instance's
agent in a heartbeat command (only to an instance the program is placed on) and
waits for the agent's outcome; at the end it orders every such instance to
unmount (publishing what is still open).  Specs live in memory only: the key is
never written to the OSS's database or log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from oss.compute.commands import CommandQueue
from oss.errors import Conflict

MOUNT_TIMEOUT = 90.0  # seconds for an instance to mount (a TCG guest starts dcpfs slowly)
UNMOUNT_TIMEOUT = 30.0


class StorageNotMounted(Conflict):
    """The program's storage could not be mounted on the instance."""

    code = "storage_not_mounted"


class StorageRelay:
    """Specs of programs' storage and the mounts the OSS ordered (in memory)."""

    def __init__(self, commands: CommandQueue) -> None:
        self.commands = commands
        self.specs: dict[str, dict[str, Any]] = {}  # program -> spec (with its key)
        self.mounted: dict[str, set[str]] = {}  # program -> instances that mounted it
        # command id -> (its instance, the future of its outcome)
        self._waiting: dict[int, tuple[str, asyncio.Future[tuple[bool, str]]]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def put(self, program: str, spec: Mapping[str, Any]) -> None:
        """Remember the program's storage (replacing an earlier spec)."""
        self.specs[program] = dict(spec)
        self.mounted.setdefault(program, set())

    async def mount(self, program: str, instance: str) -> None:
        """Have `instance` mount the program's storage (once); StorageNotMounted if it cannot."""
        spec = self.specs.get(program)
        if spec is None:
            raise StorageNotMounted(f"program {program} declared no storage")
        lock = self._locks.setdefault((program, instance), asyncio.Lock())
        async with lock:
            if instance in self.mounted.get(program, set()):
                return
            ok, error = await self._order(instance, program, "mount", spec, MOUNT_TIMEOUT)
            if not ok:
                raise StorageNotMounted(f"instance {instance}: {error}")
            self.mounted.setdefault(program, set()).add(instance)

    async def unmount_all(self, program: str) -> dict[str, str]:
        """Order every instance that mounted the program's storage to unmount it; forget
        the spec.  Instances that did not confirm, with why."""
        spec = self.specs.pop(program, None)
        instances = sorted(self.mounted.pop(program, set()))
        for key in [k for k in self._locks if k[0] == program]:
            del self._locks[key]
        if spec is None or not instances:
            return {}
        public = {"name": spec.get("name", "")}  # an unmount needs no key
        results = await asyncio.gather(
            *(self._order(i, program, "unmount", public, UNMOUNT_TIMEOUT) for i in instances)
        )
        return {i: err for i, (ok, err) in zip(instances, results, strict=True) if not ok}

    async def _order(
        self, instance: str, program: str, action: Any, spec: Mapping[str, Any], timeout: float
    ) -> tuple[bool, str]:
        cmd = self.commands.storage(instance, program, action, spec)
        fut: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
        self._waiting[cmd.id] = (instance, fut)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return False, f"no word within {timeout:g}s"
        finally:
            self._waiting.pop(cmd.id, None)
            self.commands.cancel(instance, cmd.id)

    def outcome(self, instance: str, command: int, ok: bool, error: str) -> bool:
        """An agent's word on a storage command given to it; False if none such waits."""
        waiting = self._waiting.get(command)
        if waiting is None or waiting[0] != instance or waiting[1].done():
            return False  # not this instance's, or nobody waits for it any more
        fut = waiting[1]
        fut.set_result((ok, error))
        return True

    def forget_instance(self, instance: str) -> None:
        """The instance is gone: nothing of it to unmount, no order of it to wait for."""
        for instances in self.mounted.values():
            instances.discard(instance)
        for where, fut in self._waiting.values():
            if where == instance and not fut.done():
                fut.set_result((False, f"instance {instance} failed"))
