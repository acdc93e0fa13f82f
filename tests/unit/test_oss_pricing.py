"""Billing arithmetic for both pricing models (pure, exact)."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from oss.billing.pricing import (
    GIB,
    InstanceUse,
    Metered,
    PricingModel,
    Rates,
    charge,
    whole_seconds,
)


def test_sum_of_resources() -> None:
    m = Metered(
        seconds=10,
        instances=[
            InstanceUse("a", 1000, processes=2, slots=8, dedicated=False),  # 1/4 share
            InstanceUse("b", 300, processes=1, slots=4, dedicated=True),  # whole
        ],
        storage_mb=2048,
        net_bytes=3 * GIB,
    )
    ch = charge(m, PricingModel.SUM, Rates(storage_micros_per_gb_s=5, net_micros_per_gb=7))
    assert ch.instance_micros == 10 * 1000 / 4 + 10 * 300
    assert ch.storage_micros == 2 * 10 * 5
    assert ch.net_micros == 21
    assert ch.premium_micros == 0
    assert ch.amount_micros == 2500 + 3000 + 100 + 21


def test_premium_model_adds_percentage() -> None:
    m = Metered(seconds=7, instances=[InstanceUse("a", 100, 4, 4, False)])
    base = charge(m, PricingModel.SUM, Rates(premium_pct=15)).amount_micros
    prem = charge(m, PricingModel.PREMIUM, Rates(premium_pct=15))
    assert base == 700
    assert prem.premium_micros == Fraction(105) and prem.amount_micros == 805


def test_rounds_up_once_at_the_end() -> None:
    # 3 x (1/3 micro) = exactly 1, not 3 x ceil(1/3) = 3.
    uses = [InstanceUse(str(i), 1, 1, 3, False) for i in range(3)]
    assert charge(Metered(1, uses), PricingModel.SUM, Rates()).amount_micros == 1
    assert charge(Metered(1, uses[:1]), PricingModel.SUM, Rates()).amount_micros == 1  # ceil(1/3)


def test_whole_seconds_carry() -> None:
    assert whole_seconds(10.0, 12.9) == 2
    assert whole_seconds(10.0, 9.0) == 0


def test_share_caps_at_whole_instance() -> None:
    assert InstanceUse("a", 1, processes=9, slots=4, dedicated=False).share == 1


@given(
    secs=st.integers(0, 10**6),
    price=st.integers(0, 10**6),
    procs=st.integers(1, 64),
    slots=st.integers(1, 64),
    pct=st.integers(0, 100),
)
def test_premium_never_below_sum_and_linear_in_time(
    secs: int, price: int, procs: int, slots: int, pct: int
) -> None:
    u = [InstanceUse("a", price, procs, slots, False)]
    r = Rates(premium_pct=pct)
    s = charge(Metered(secs, u), PricingModel.SUM, r)
    p = charge(Metered(secs, u), PricingModel.PREMIUM, r)
    assert p.amount_micros >= s.amount_micros >= 0
    double = charge(Metered(2 * secs, u), PricingModel.SUM, r)
    assert double.instance_micros == 2 * s.instance_micros
