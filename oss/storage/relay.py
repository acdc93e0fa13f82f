"""The OSS relays a program's storage to the instances it runs on (issue 14, VMs).

The run's owner (`dcptrace --oss`) holds the account token, not the instances':
it gives the OSS its storage spec (the SFTP server's address, pinned host key,
the run's key, the tiers) once, and asks for a mount on each instance before the
first process placed there starts.  The OSS hands the spec to that instance's
agent in a heartbeat command (only to an instance the program is placed on) and
waits for the agent's outcome; at the end it orders every such instance to
unmount (publishing what is still open).  Specs and mounts are kept in the
OSS's database too (`SpecStore`; the private data directory, never a log), so an
OSS restarted while the program runs keeps mounting it on the instances its
later processes are placed on, and still orders the unmounts at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from oss.compute.commands import CommandQueue
from oss.errors import Conflict

MOUNT_TIMEOUT = 90.0  # seconds for an instance to mount (a TCG guest starts dcpfs slowly)
UNMOUNT_TIMEOUT = 30.0


class StorageNotMounted(Conflict):
    """The program's storage could not be mounted on the instance."""

    code = "storage_not_mounted"


class SpecStore(Protocol):
    """Where specs and mounts outlive the OSS process (`SqlSpecs`)."""

    async def put(self, program: str, spec: dict[str, Any]) -> None:
        """Keep the program's spec (replacing an earlier one)."""
        ...

    async def load(self, program: str) -> tuple[dict[str, Any], set[str]] | None:
        """The program's spec and the instances that mount it; None if none."""
        ...

    async def mounted(self, program: str, instance: str) -> None:
        """`instance` mounts the program's storage."""
        ...

    async def forget(self, program: str) -> None:
        """The program's storage is unmounted everywhere."""
        ...

    async def forget_instance(self, instance: str) -> None:
        """A failed instance mounts nothing."""
        ...


class SqlSpecs:
    """`SpecStore` in the OSS's SQLite store (oss.storage.store)."""

    def __init__(self, store: Any, clock: Callable[[], float]) -> None:
        self.store = store  # oss.db.store.Store
        self.clock = clock

    async def put(self, program: str, spec: dict[str, Any]) -> None:
        from oss.storage import store as q

        now = self.clock()
        await self.store.write(lambda c: q.put_spec(c, program, spec, now))

    async def load(self, program: str) -> tuple[dict[str, Any], set[str]] | None:
        from oss.storage import store as q

        found: tuple[dict[str, Any], set[str]] | None = await self.store.read(
            lambda c: q.spec_of(c, program)
        )
        return found

    async def mounted(self, program: str, instance: str) -> None:
        from oss.storage import store as q

        await self.store.write(lambda c: q.mounted(c, program, instance))

    async def forget(self, program: str) -> None:
        from oss.storage import store as q

        await self.store.write(lambda c: q.forget(c, program))

    async def forget_instance(self, instance: str) -> None:
        from oss.storage import store as q

        await self.store.write(lambda c: q.forget_instance(c, instance))


class StorageRelay:
    """Specs of programs' storage and the mounts the OSS ordered (in memory, and in
    `saved` when given: a restarted OSS reads them back on first use)."""

    def __init__(self, commands: CommandQueue, saved: SpecStore | None = None) -> None:
        self.commands = commands
        self.saved = saved
        self.specs: dict[str, dict[str, Any]] = {}  # program -> spec (with its key)
        self.mounted: dict[str, set[str]] = {}  # program -> instances that mounted it
        # command id -> (its instance, the future of its outcome)
        self._waiting: dict[int, tuple[str, asyncio.Future[tuple[bool, str]]]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._soon: dict[tuple[str, str], asyncio.Task[None]] = {}  # mount_soon's, running

    async def put(self, program: str, spec: Mapping[str, Any]) -> None:
        """Remember the program's storage (replacing an earlier spec)."""
        if self.saved is not None:
            await self.saved.put(program, dict(spec))
        self.specs[program] = dict(spec)
        self.mounted.setdefault(program, set())

    async def _spec(self, program: str) -> dict[str, Any] | None:
        """The program's spec: in memory, or read back from `saved` (after a restart)."""
        spec = self.specs.get(program)
        if spec is None and self.saved is not None:
            found = await self.saved.load(program)
            if found is not None:
                spec = self.specs[program] = found[0]
                self.mounted.setdefault(program, set()).update(found[1])
        return spec

    async def mounts(self, program: str) -> set[str] | None:
        """The instances that mount the program's storage; None if it declared none."""
        if await self._spec(program) is None:
            return None
        return set(self.mounted.get(program, set()))

    async def mount(self, program: str, instance: str) -> None:
        """Have `instance` mount the program's storage (once); StorageNotMounted if it cannot."""
        spec = await self._spec(program)
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
            if self.saved is not None:
                await self.saved.mounted(program, instance)

    def mount_soon(
        self, program: str, instance: str, said: Callable[[str], Awaitable[None]]
    ) -> None:
        """Start mounting the program's storage on `instance` (the OSS chose it for one of
        the program's execs but it has no mount yet); `said(line)` gets the outcome.  An
        exec placed from an instance waits seconds at most, a mount takes a heartbeat and
        dcpfs's start: this one runs on while that exec stays where it was asked, and the
        next can go there."""
        key = (program, instance)
        if key in self._soon or instance in self.mounted.get(program, set()):
            return

        async def mount() -> None:
            try:
                await self.mount(program, instance)
                await said(f"storage mounted on {instance} (for execs placed from instances)")
            except StorageNotMounted as exc:
                await said(
                    f"storage not mounted on {instance} (for execs placed from instances):"
                    f" {exc.detail}"
                )
            finally:
                self._soon.pop(key, None)

        self._soon[key] = asyncio.get_running_loop().create_task(mount())

    async def unmount_all(self, program: str) -> dict[str, str]:
        """Order every instance that mounted the program's storage to unmount it; forget
        the spec.  Instances that did not confirm, with why."""
        soon = [t for (p, _i), t in self._soon.items() if p == program]
        if soon:  # mounts under way end first, so that they are unmounted too
            await asyncio.wait(soon, timeout=UNMOUNT_TIMEOUT)
        await self._spec(program)
        spec = self.specs.pop(program, None)
        instances = sorted(self.mounted.pop(program, set()))
        for key in [k for k in self._locks if k[0] == program]:
            del self._locks[key]
        if self.saved is not None and spec is not None:
            await self.saved.forget(program)
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

    async def forget_instance(self, instance: str, why: str = "the instance failed") -> None:
        """The instance is gone (`why`): nothing of it to unmount, no order of it to wait for."""
        if self.saved is not None:
            await self.saved.forget_instance(instance)
        for instances in self.mounted.values():
            instances.discard(instance)
        for where, fut in self._waiting.values():
            if where == instance and not fut.done():
                fut.set_result((False, why))
