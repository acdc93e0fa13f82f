"""Pricing manager decisions: per-second metering and the two pricing models.

All money is integer micro-units (1 unit = 1,000,000 micros); arithmetic is
exact (Fraction) and each billing record rounds up once, at the end.

* sum-of-resources: what the resources would cost individually:
  instance-seconds x price/s x share (processes/slots on a shared instance,
  1 on a dedicated one) + storage MB-seconds x storage rate + network bytes x
  network rate.
* premium: the same sum plus a percentage premium for the automated scaling.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

GIB = 1 << 30


class PricingModel(enum.StrEnum):
    """How a program's charges are computed."""

    SUM = "sum"
    PREMIUM = "premium"


@dataclass(frozen=True, slots=True)
class Rates:
    """Rates for resources other than instances."""

    storage_micros_per_gb_s: int = 0  # per GiB-second (GiB = 1024 MB)
    net_micros_per_gb: int = 0  # per GiB transferred
    premium_pct: int = 20  # premium model surcharge, percent


@dataclass(frozen=True, slots=True)
class InstanceUse:
    """The program's use of one instance during a metering interval."""

    instance: str
    price_micros_per_s: int
    processes: int
    slots: int
    dedicated: bool

    @property
    def share(self) -> Fraction:
        """The fraction of the instance billed to the program."""
        if self.dedicated:
            return Fraction(1)
        return Fraction(min(self.processes, self.slots), max(self.slots, 1))


@dataclass(frozen=True, slots=True)
class Metered:
    """Usage during one interval of whole seconds."""

    seconds: int
    instances: Sequence[InstanceUse]
    storage_mb: int = 0
    net_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Charge:
    """The result of pricing one interval."""

    amount_micros: int
    instance_micros: Fraction
    storage_micros: Fraction
    net_micros: Fraction
    premium_micros: Fraction


def whole_seconds(start: float, now: float) -> int:
    """Whole seconds elapsed; the fraction carries over to the next interval."""
    return max(0, math.floor(now - start))


def charge(m: Metered, model: PricingModel, rates: Rates) -> Charge:
    """Price one metering interval."""
    inst = sum(
        (Fraction(u.price_micros_per_s) * m.seconds * u.share for u in m.instances), Fraction(0)
    )
    storage = Fraction(m.storage_mb * m.seconds * rates.storage_micros_per_gb_s, 1024)
    net = Fraction(m.net_bytes * rates.net_micros_per_gb, GIB)
    base = inst + storage + net
    premium = (
        base * Fraction(rates.premium_pct, 100) if model is PricingModel.PREMIUM else Fraction(0)
    )
    return Charge(math.ceil(base + premium), inst, storage, net, premium)
