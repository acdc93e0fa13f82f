"""The pool manager: fills pools through their providers (adapter around pool.fill_plan)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from oss.compute.instances import Instances
from oss.compute.pool import Credentials, Provider, fill_plan
from oss.errors import ProviderError


class PoolManager:
    """Fills pools through their providers (adapter around pool.fill_plan)."""

    def __init__(
        self,
        instances: Instances,
        providers: Mapping[str, Provider],
        oss_log: Callable[[str], None],
        provider_timeout: float,
        public_url: str | None,
    ) -> None:
        """`oss_log`: a line for the OSS log; `public_url`: the OSS URL new instances get."""
        self._instances = instances
        self._providers = providers
        self._log = oss_log
        self._timeout = provider_timeout
        self._public_url = public_url
        self._busy: set[str] = set()

    async def reconcile(self) -> None:
        """Create or destroy instances so each pool meets its warm target."""
        for state, provider_name, itype in await self._instances.pool_states():
            if state.name in self._busy:
                continue
            plan = fill_plan(state)
            if not plan.create and not plan.destroy:
                continue
            provider = self._providers.get(provider_name)
            if provider is None:
                self._log(f"pool {state.name}: no provider {provider_name!r} configured")
                continue
            self._busy.add(state.name)
            try:
                # Not a TaskGroup: one failed create must not cancel its siblings.  gather
                # still awaits every call before this returns.
                results = await asyncio.gather(
                    *(self._create(state.name, provider, itype) for _ in range(plan.create)),
                    *(self._destroy(name, provider) for name in plan.destroy),
                    return_exceptions=True,
                )
            finally:
                self._busy.discard(state.name)
            for r in results:
                if isinstance(r, ProviderError):
                    self._log(f"pool {state.name}: {r}")
                elif isinstance(r, BaseException):
                    raise r

    async def _create(self, pool: str, provider: Provider, itype: Any) -> None:
        name, token = await self._instances.new_pool_instance(pool)
        self._log(f"pool {pool}: creating instance {name}")
        try:
            async with asyncio.timeout(self._timeout):
                await provider.create(name, itype, Credentials(name, token, self._public_url))
        except Exception as exc:  # provider code is foreign: any failure fails this instance
            await self._instances.set_instance_state(name, "failed")
            raise ProviderError(f"create {name}: {exc!r}", instance=name) from exc

    async def _destroy(self, name: str, provider: Provider) -> None:
        await self._instances.set_instance_state(name, "destroyed")
        self._log(f"destroying surplus idle instance {name}")
        try:
            async with asyncio.timeout(self._timeout):
                await provider.destroy(name)
        except Exception as exc:  # provider code is foreign
            raise ProviderError(f"destroy {name}: {exc!r}", instance=name) from exc
