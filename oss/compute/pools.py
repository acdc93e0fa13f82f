"""The pool manager: fills pools through their providers (adapter around pool.fill_plan).

Each reconcile: every pool's state (with since when its instances idle), the
demand on it (`demand(state, instance_type)`: placements that waited, target
widths), the fill plan; creates and releases through the pool's provider.  A
provider that fails is backed off (`pool.Backoff`: one create at a time, spaced
`min(base * 2**n, 60 s)`), and failed instances are destroyed through their
provider (availability) under the same rule.  Every decision is one OSS log line
with its reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from oss.compute.instances import Instances
from oss.compute.pool import (
    Backoff,
    Credentials,
    InstanceType,
    PoolDemand,
    PoolState,
    Provider,
    backoff_wait,
    fill_plan,
)
from oss.errors import ProviderError

Demand = Callable[[PoolState, InstanceType], PoolDemand]


class PoolManager:
    """Fills pools through their providers (adapter around pool.fill_plan)."""

    def __init__(
        self,
        instances: Instances,
        providers: Mapping[str, Provider],
        oss_log: Callable[[str], None],
        provider_timeout: float,
        public_url: str | None,
        *,
        clock: Callable[[], float] = time.time,
        slots_per_cpu: int = 1,
        idle_grace: float = 0.0,
        backoff_base: float = 1.0,
        released: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """`oss_log`: a line for the OSS log; `public_url`: the OSS URL new instances get;
        `released`: told each instance a provider destroyed on purpose (idle, drained)."""
        self._instances = instances
        self._providers = providers
        self._log = oss_log
        self._timeout = provider_timeout
        self.public_url = public_url  # the OSS URL handed to new instances
        self._clock = clock
        self._slots_per_cpu = slots_per_cpu
        self._idle_grace = idle_grace
        self._base = backoff_base
        self._released = released
        self._busy: set[str] = set()
        self._said: dict[str, str] = {}  # pool -> its last "cannot" line (said once)

    def _say_once(self, pool: str, line: str) -> None:
        if self._said.get(pool) != line:
            self._said[pool] = line
            self._log(line)

    async def reconcile(self, demand: Demand | None = None) -> None:
        """Create, release or destroy instances so each pool meets its target and demand."""
        now = self._clock()
        states = await self._instances.pool_states(now, self._slots_per_cpu, self._idle_grace)
        backoffs = await self._instances.pool_backoffs()
        for state, provider_name, itype in states:
            if state.name in self._busy:
                continue
            plan = fill_plan(state, demand(state, itype) if demand else PoolDemand(), now)
            if not plan.create and not plan.destroy and not state.failed:
                continue
            provider = self._providers.get(provider_name)
            if provider is None:
                self._say_once(state.name, f"pool {state.name}: no provider {provider_name!r}")
                continue
            backoff = backoffs.get(state.name, Backoff())
            allowed = backoff.allowed(now)
            create = plan.create if allowed is None else min(plan.create, allowed)
            failed = state.failed if allowed is None else state.failed[: allowed or 0]
            if not (create or plan.destroy or failed):
                continue  # backing off: the next try is logged when it happens
            if create or plan.destroy:
                reason = plan.reason
                if create < plan.create:
                    reason += f" (1 at a time after {backoff.failures} failed creates)"
                self._log(reason)
            self._busy.add(state.name)
            try:
                # Not a TaskGroup: one failed create must not cancel its siblings.  gather
                # still awaits every call before this returns.
                results = await asyncio.gather(
                    *(self._create(state.name, provider, itype) for _ in range(create)),
                    *(self._release(name, provider) for name in plan.destroy),
                    *(self._destroy_failed(state.name, name, provider) for name in failed),
                    return_exceptions=True,
                )
            finally:
                self._busy.discard(state.name)
            errors = [r for r in results if isinstance(r, ProviderError)]
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, ProviderError):
                    raise r
            for r in errors:
                self._log(f"pool {state.name}: {r}")
            tried = create + len(failed)
            if errors:
                for err in errors:
                    backoff = backoff.failed(now, self._base, str(err))
                self._log(
                    f"pool {state.name}: back off {backoff_wait(backoff.failures, self._base):g} s"
                    f" after {backoff.failures} failed creates: {errors[-1]}"
                )
                await self._instances.set_pool_backoff(state.name, backoff)
            elif tried and backoff.failures:
                self._log(f"pool {state.name}: provider works again after {backoff.failures}")
                await self._instances.set_pool_backoff(state.name, Backoff())

    async def _create(self, pool: str, provider: Provider, itype: Any) -> None:
        name, token = await self._instances.new_pool_instance(pool)
        self._log(f"pool {pool}: creating instance {name}")
        try:
            async with asyncio.timeout(self._timeout):
                await provider.create(name, itype, Credentials(name, token, self.public_url))
        except Exception as exc:  # provider code is foreign: any failure fails this instance
            # Failed: the next reconcile destroys what the provider may have made of it.
            await self._instances.set_instance_state(name, "failed")
            raise ProviderError(f"create {name}: {exc!r}", instance=name) from exc

    async def release(self, name: str, pool: str | None) -> str:
        """Release a drained instance through its pool's provider (`released`), or mark
        it `drained` when none owns it (nothing is placed on either)."""
        found = await self._instances.pools(pool) if pool else []
        provider = self._providers.get(found[0].get("provider") or "") if found else None
        if provider is None:
            await self._instances.set_instance_state(name, "drained")
            return "drained"
        await self._release(name, provider)
        return "released"

    async def _release(self, name: str, provider: Provider) -> None:
        await self._instances.set_instance_state(name, "destroyed")
        self._log(f"destroying surplus idle instance {name}")
        try:
            async with asyncio.timeout(self._timeout):
                await provider.destroy(name)
        except Exception as exc:  # provider code is foreign
            raise ProviderError(f"destroy {name}: {exc!r}", instance=name) from exc
        if self._released is not None:
            await self._released(name)

    async def _destroy_failed(self, pool: str, name: str, provider: Provider) -> None:
        """A failed instance (silent, or its create failed) is destroyed through its provider."""
        self._log(f"pool {pool}: destroy {name}: failed")
        try:
            async with asyncio.timeout(self._timeout):
                await provider.destroy(name)
        except Exception as exc:  # provider code is foreign; it stays failed: tried again
            raise ProviderError(f"destroy {name}: {exc!r}", instance=name) from exc
        await self._instances.set_instance_state(name, "destroyed")
