"""The networking manager: a program's address on its instances, its listeners steered.

The OSS calls it where the program's life changes:
- `join(program, instance)` before a process of it starts on an instance (the
  exec grant): the program gets its address (allocated from the prefix on the
  first join, durable in SQLite) and the instance holds it before the process runs;
- `listen` / `unlisten` when an instance tracer reports a listening socket
  opened or closed (the agents' routes): redirects exist only while someone listens;
- `moved(program, pid, source, target)` when a migration moved a process:
  its listeners' redirects re-point to the target (the hook issue 12 calls),
  and its connections' ports follow it: the established connections from P
  found on the target with a local port of another instance's block (CRIU
  restored them) are pinned there (`plan.Pin`, rows of `net_pins`: a restarted
  OSS steers them as before; applier that can read a node's connections only:
  local instances);
- `release(program)` when it ends: every node drops it, the address is free.

Each change is planned for every node (`oss.network.plan`, pure) and handed
to the applier, which changes only what differs; applying runs in a thread
under `apply_timeout`, one change at a time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from oss.db.store import Conn, Store
from oss.network import store as q
from oss.network.plan import (
    HOME,
    HomeSpot,
    HostSpot,
    InstanceSpot,
    Listener,
    NodeKey,
    NodeState,
    PlanError,
    ProgramNet,
    bound_class,
    max_slots,
    moved,
    pins,
    plan,
)

log = logging.getLogger(__name__)


class Applier(Protocol):
    """Puts node states in place (`net.redirector.Redirector`, or a fake in unit tests)."""

    def knows(self, key: NodeKey) -> bool:
        """Whether node `key` can be changed."""
        ...

    def apply(self, key: NodeKey, program: str, state: NodeState) -> bool:
        """Make node `key` hold `state` for `program`; False if nothing changed."""
        ...

    def remove_program(self, program: str) -> None:
        """Take `program` off every node."""
        ...

    def close(self) -> None:
        """Take every program off every node."""
        ...


@runtime_checkable
class ConnectionReader(Protocol):
    """An applier that can read a node's connections (`net.redirector.Redirector`)."""

    def connections(self, key: NodeKey, address: str) -> list[int]:
        """Local ports of the established TCP connections from `address` in node `key`."""
        ...


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """Where program addresses come from and how nodes are reached (validated)."""

    prefix: ipaddress.IPv4Network
    spots: Mapping[str, InstanceSpot] = field(default_factory=dict)
    hosts: Mapping[str, HostSpot] = field(default_factory=dict)
    ports_per_instance: int = 1024
    apply_timeout: float = 10.0
    home: HomeSpot | None = None  # where the program's home is (local runs): its servers too

    def __post_init__(self) -> None:
        if self.prefix.num_addresses < 4:
            raise ValueError(f"network prefix {self.prefix} holds no program address")
        if any(s.slot >= max_slots(self.ports_per_instance) for s in self.spots.values()):
            raise ValueError(
                f"at most {max_slots(self.ports_per_instance)} instances get "
                f"{self.ports_per_instance} ephemeral ports each"
            )
        if self.apply_timeout <= 0:
            raise ValueError("apply_timeout must be positive")


RateOf = Callable[[Conn, str], int]  # program -> egress cap in kbit/s (0: none)


class NetworkManager:
    """Addresses and redirects of programs (one per OSS)."""

    def __init__(
        self,
        store: Store,
        config: NetworkConfig,
        applier: Applier,
        clock: Callable[[], float] = time.time,
        rate_of: RateOf | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.applier = applier
        self.clock = clock
        self._rate_of = rate_of
        self._lock = asyncio.Lock()
        self._released: dict[str, str] = {}  # program -> the address it had (for records)
        self._members: set[tuple[str, str]] = set()  # (program, instance) joined: no write
        self.last_apply_s = 0.0  # how long the last change took to be in place

    def place(self, instance: str, address: str) -> bool:
        """Instance `instance` registered at `address`: learn where it sits when the spots
        are learned (VMs, `oss.network.vms.SpotBook`); whether it is covered."""
        from oss.network.vms import SpotBook

        if isinstance(self.config.spots, SpotBook):
            return self.config.spots.place(instance, address) is not None
        return self.covers(instance)

    def covers(self, instance: str) -> bool:
        """Whether `instance` sits where this manager can redirect."""
        return instance in self.config.spots

    async def start(self) -> None:
        """Put back what the stored programs need (after an OSS restart)."""
        for program in await self.store.read(q.programs):
            try:
                await self._reapply(program)
            except PlanError as exc:  # VMs: its instances have not registered again yet
                log.warning("program %s: network not put back yet: %s", program, exc)

    async def address_of(self, program: str) -> str | None:
        """The program's address (None: it has none yet)."""
        return await self.store.read(lambda c: q.address_of(c, program))

    async def join(self, program: str, instance: str) -> str | None:
        """Give `program` its address on `instance` (None: not an instance of ours)."""
        if not self.covers(instance):
            return None
        if (program, instance) in self._members:
            return await self.address_of(program)
        now = self.clock()

        def op(c: Conn) -> tuple[str, bool]:
            address = q.allocate(c, program, self.config.prefix, now)
            return address, q.join(c, program, instance)

        address, new = await self.store.write(op)
        if new:
            await self._reapply(program)
        self._members.add((program, instance))
        return address

    async def listen(
        self, program: str, instance: str, pid: int, port: int, local: str, proto: int = 6
    ) -> str:
        """A listener opened on `instance` (HOME: at home); PortTaken if another instance
        holds the port.  Returns the program address."""
        if instance == HOME and self.config.home is not None:
            now = self.clock()
            address: str | None = await self.store.write(
                lambda c: q.allocate(c, program, self.config.prefix, now)
            )
        else:
            address = await self.join(program, instance)
        if address is None:
            return ""
        listener = Listener(instance, port, bound_class(local, address), proto, pid)
        await self.store.write(lambda c: q.listen(c, program, listener, self.clock()))
        await self._reapply(program)
        return address

    async def unlisten(self, program: str, instance: str, port: int, proto: int = 6) -> None:
        """A listener of `instance` closed: its redirects go."""
        if await self.store.write(lambda c: q.unlisten(c, program, instance, proto, port)):
            await self._reapply(program)

    async def moved(self, program: str, pid: int, source: str, target: str) -> float:
        """Process `pid` of `program` moved from `source` to `target`: re-point its
        redirects; the seconds until they were in place (0: nothing to do)."""
        net = await self.store.read(lambda c: q.program_net(c, program))
        if net is None or not self.covers(target):
            return 0.0
        after = moved(net, pid, source, target)
        start = time.perf_counter()
        await self.store.write(lambda c: q.move(c, after))
        spot = self.config.spots.get(target)
        if isinstance(self.applier, ConnectionReader) and spot is not None:
            key = ("instance", target)
            ports = await asyncio.to_thread(self.applier.connections, key, net.address)
            after = pins(after, target, ports, self.config.ports_per_instance, spot.slot)
        # Kept with the program's other rows: a restarted OSS steers them as before.
        await self.store.write(lambda c: q.set_pins(c, program, after.pinned))
        await self._reapply(program)
        took = time.perf_counter() - start
        log.info("program %s: redirects re-pointed %s -> %s in %.1f ms", program, source,
                 target, took * 1000)  # fmt: skip
        return took

    async def address_ever(self, program: str) -> str | None:
        """The program's address, also once it ended (while this OSS runs: run records)."""
        return await self.address_of(program) or self._released.get(program)

    async def release(self, program: str) -> None:
        """The program ended: every node drops it, its address is free."""
        address = await self.address_of(program)
        if address is not None:
            if len(self._released) > 4096:
                self._released.clear()
            self._released[program] = address
        async with self._lock:
            async with asyncio.timeout(self.config.apply_timeout):
                await asyncio.to_thread(self.applier.remove_program, program)
        await self.store.write(lambda c: q.release(c, program))
        self._members = {m for m in self._members if m[0] != program}

    async def show(self, program: str) -> dict[str, Any] | None:
        """The program's address, members and listeners (None: it has no address)."""
        net = await self.store.read(lambda c: q.program_net(c, program))
        if net is None:
            return None
        return dict(
            address=net.address,
            instances=list(net.members),
            listeners=[
                dict(instance=x.instance, port=x.port, bound=x.bound, pid=x.pid,
                     proto="tcp" if x.proto == 6 else "udp")
                for x in net.listeners
            ],
        )  # fmt: skip

    async def close(self) -> None:
        """Take every program's set-up off every node (the OSS is going away)."""
        async with self._lock:
            await asyncio.to_thread(self.applier.close)

    async def _reapply(self, program: str) -> None:
        def read(c: Conn) -> tuple[ProgramNet | None, int]:
            net = q.program_net(c, program)
            rate = self._rate_of(c, program) if self._rate_of and net else 0
            return net, rate

        async with self._lock:
            net, rate = await self.store.read(read)
            if net is None:
                return
            states = plan(
                net, self.config.spots, self.config.hosts,
                ports_per_instance=self.config.ports_per_instance, rate_kbit=rate,
                home=self.config.home,
            )  # fmt: skip
            start = time.perf_counter()
            async with asyncio.timeout(self.config.apply_timeout):
                await asyncio.to_thread(self._apply, program, states)
            self.last_apply_s = time.perf_counter() - start

    def _apply(self, program: str, states: Mapping[NodeKey, NodeState]) -> None:
        # Instances first (they hold the address), then hosts (they steer to it).
        for key in sorted(states, key=lambda k: k[0] != "instance"):
            if self.applier.knows(key):
                self.applier.apply(key, program, states[key])
