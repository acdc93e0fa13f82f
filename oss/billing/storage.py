"""Storage billing: measured bytes per tier integrated over time (pure).

A `Meter` takes samples (time, bytes held in each tier) as the storage server
receives them and integrates bytes x seconds between samples (the bytes of a
sample hold until the next).  Charges are GiB-seconds times the tier's price.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

GiB = float(1 << 30)
# Micro-units per GiB-second of each tier: the storage server's (StorageConfig.prices)
# and the OSS's, which bills a `--oss` run's measured GiB-seconds into its ledger.
PRICES: Mapping[str, int] = {"memory": 40, "disk": 8, "net": 2}


def charge(gib_seconds: Mapping[str, float], prices: Mapping[str, int] = PRICES) -> float:
    """Micro-units for GiB-seconds per tier (tiers without a price cost nothing)."""
    return sum(gs * prices.get(tier, 0) for tier, gs in gib_seconds.items())


@dataclass(slots=True)
class Meter:
    """GiB-seconds per tier, from samples of measured bytes."""

    byte_seconds: dict[str, float] = field(default_factory=dict)
    _last: tuple[float, dict[str, int]] | None = None

    def sample(self, when: float, held: Mapping[str, int]) -> None:
        """Bytes held per tier at `when` (monotonic seconds, not decreasing)."""
        if self._last is not None:
            then, before = self._last
            dt = max(0.0, when - then)
            for tier, nbytes in before.items():
                self.byte_seconds[tier] = self.byte_seconds.get(tier, 0.0) + nbytes * dt
        self._last = (when, dict(held))

    def gib_seconds(self) -> dict[str, float]:
        """GiB-seconds per tier so far."""
        return {tier: bs / GiB for tier, bs in self.byte_seconds.items()}

    def charges(self, prices: Mapping[str, int]) -> dict[str, float]:
        """Micro-units per tier: GiB-seconds times the tier's price per GiB-second."""
        return {tier: gs * prices.get(tier, 0) for tier, gs in self.gib_seconds().items()}
