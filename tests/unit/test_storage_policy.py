"""oss.storage.policy and oss.billing.storage: placement, moves, limits, GiB-seconds (pure)."""

from __future__ import annotations

import errno

import pytest

from oss.billing.storage import GiB, Meter
from oss.storage.policy import (
    Heat,
    MiB,
    Policy,
    StorageLimits,
    StorageUsage,
    Tier,
    admit,
    after_read_open,
    for_write,
    streams,
    to_make_room,
)

ROOMY = {Tier.MEMORY: 64 * MiB, Tier.DISK: None, Tier.NET: None}


def test_a_new_file_starts_in_memory_when_it_fits() -> None:
    assert for_write(0, Policy(), ROOMY) == Tier.MEMORY
    assert for_write(100 * MiB, Policy(), ROOMY) == Tier.DISK  # above largest_in_memory
    assert for_write(1 * MiB, Policy(), {**ROOMY, Tier.MEMORY: 0}) == Tier.DISK
    assert for_write(1, Policy(), {Tier.MEMORY: 0, Tier.DISK: 0}) == Tier.NET


def test_the_clients_preferred_tier_wins_when_it_has_room() -> None:
    assert for_write(0, Policy(preferred=Tier.DISK), ROOMY) == Tier.DISK
    assert for_write(0, Policy(preferred=Tier.NET), ROOMY) == Tier.NET
    full = {**ROOMY, Tier.DISK: 0}
    assert for_write(10, Policy(preferred=Tier.DISK), full) == Tier.MEMORY


def test_large_sequential_writes_stream_unless_a_fast_tier_is_preferred() -> None:
    policy = Policy(stream_bytes=8 * MiB)
    assert not streams(0, 4096, True, policy)
    assert streams(8 * MiB, 4096, True, policy)
    assert not streams(8 * MiB, 4096, False, policy)  # random writes stay staged
    assert not streams(8 * MiB, 4096, True, Policy(preferred=Tier.MEMORY))


def test_repeated_reads_promote_to_memory() -> None:
    policy = Policy(promote_after_reads=3)
    heat = Heat(size=1000, reads=2, tier=Tier.NET)
    assert after_read_open("/v0/f", heat, policy, ROOMY) is None
    heat.reads = 3
    move = after_read_open("/v0/f", heat, policy, ROOMY)
    assert move is not None and (move.source, move.target) == (Tier.NET, Tier.MEMORY)
    assert "read 3 times" in move.reason
    heat.tier = Tier.MEMORY
    assert after_read_open("/v0/f", heat, policy, ROOMY) is None


def test_a_large_hot_file_comes_to_disk_not_memory() -> None:
    heat = Heat(size=100 * MiB, reads=5, tier=Tier.NET)
    move = after_read_open("/v0/big", heat, Policy(), ROOMY)
    assert move is not None and move.target == Tier.DISK


def test_a_full_tier_demotes_least_recently_used_first() -> None:
    files = {
        "/v0/old": Heat(size=400, last_access=1.0, tier=Tier.MEMORY),
        "/v0/new": Heat(size=400, last_access=9.0, tier=Tier.MEMORY),
        "/v0/open": Heat(size=400, last_access=0.5, tier=Tier.MEMORY, open_handles=1),
        "/v0/disk": Heat(size=400, last_access=0.1, tier=Tier.DISK),
    }
    free = {Tier.MEMORY: 100, Tier.DISK: None}
    moves = to_make_room(Tier.MEMORY, 300, files, free)
    assert [(m.path, m.target) for m in moves] == [("/v0/old", Tier.DISK)]
    assert "least recently used" in moves[0].reason
    assert to_make_room(Tier.MEMORY, 50, files, free) == []  # there is room already
    # No room on disk either: memory demotes straight to the net (the volume has the data).
    moves = to_make_room(Tier.MEMORY, 300, files, {Tier.MEMORY: 100, Tier.DISK: 0})
    assert [(m.path, m.target) for m in moves] == [("/v0/old", Tier.NET)]


@pytest.mark.parametrize(
    ("limits", "usage", "growth", "expected"),
    [
        (StorageLimits(program=100), StorageUsage(program=90), 10, None),
        (StorageLimits(program=100), StorageUsage(program=90), 11, errno.EDQUOT),
        (StorageLimits(user=100), StorageUsage(user=95), 6, errno.EDQUOT),
        (StorageLimits(account=100), StorageUsage(account=100), 1, errno.EDQUOT),
        (StorageLimits(volume_capacity=10), StorageUsage(volume=10), 1, errno.ENOSPC),
        (StorageLimits(program=1), StorageUsage(program=50), 0, None),  # shrinking is fine
    ],
)
def test_limits_at_three_levels(
    limits: StorageLimits, usage: StorageUsage, growth: int, expected: int | None
) -> None:
    refusal = admit(growth, usage, limits)
    assert (refusal.errno if refusal else None) == expected


def test_the_meter_integrates_measured_bytes_over_time() -> None:
    meter = Meter()
    meter.sample(0.0, {"net": int(GiB), "memory": 0})
    meter.sample(2.0, {"net": int(GiB) // 2, "memory": int(GiB)})
    meter.sample(3.0, {"net": 0, "memory": 0})
    assert meter.gib_seconds() == pytest.approx({"net": 2.5, "memory": 1.0})
    assert meter.charges({"net": 2, "memory": 40}) == pytest.approx({"net": 5.0, "memory": 40.0})
