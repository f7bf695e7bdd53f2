"""vhostmem/gc_stats.py in this process: collections timed per generation, the startup heap
frozen, counters reset on request."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from vhostmem.gc_stats import GENERATIONS, GcStats, freeze_startup_heap


@pytest.fixture
def stats() -> Iterator[GcStats]:
    """Timed collections with automatic ones off, so only the test's own are seen."""
    s = GcStats()
    enabled = gc.isenabled()
    gc.disable()
    s.install()
    try:
        yield s
    finally:
        s.uninstall()
        if enabled:
            gc.enable()


def generation(snap: dict, gen: int) -> dict:
    return snap["generations"][gen]


def test_each_collection_is_counted_and_timed_in_its_generation(stats: GcStats) -> None:
    cycle: list[object] = []
    cycle.append(cycle)  # garbage only the collector can free
    del cycle
    gc.collect(1)
    gc.collect(2)
    gc.collect(2)
    snap = stats.snapshot()
    assert snap["timed"] is True
    assert [generation(snap, g)["collections"] for g in range(GENERATIONS)] == [0, 1, 2]
    assert generation(snap, 1)["collected"] >= 1  # the list that held itself
    for g in (1, 2):
        gen = generation(snap, g)
        assert 0 <= gen["pause_us_max"] <= gen["pause_us_total"]
    assert snap["thresholds"] == list(gc.get_threshold())


def test_the_longest_pause_is_kept(stats: GcStats) -> None:
    gc.collect(2)
    first = stats.pause_ns_max[2]
    assert first > 0
    stats._on_gc("start", {"generation": 2})
    stats._started_ns -= 50_000_000  # a collection that took 50 ms
    stats._on_gc("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    gc.collect(2)
    gen = generation(stats.snapshot(), 2)
    assert gen["collections"] == 3
    assert gen["pause_us_max"] >= 50_000
    assert gen["pause_us_total"] >= gen["pause_us_max"]


def test_reset_returns_the_counts_and_starts_again(stats: GcStats) -> None:
    gc.collect(2)
    assert generation(stats.snapshot(reset=True), 2)["collections"] == 1
    after = stats.snapshot()
    assert [generation(after, g)["collections"] for g in range(GENERATIONS)] == [0, 0, 0]
    assert generation(after, 2)["pause_us_total"] == 0


def test_install_twice_times_each_collection_once(stats: GcStats) -> None:
    stats.install()
    gc.collect(2)
    assert generation(stats.snapshot(), 2)["collections"] == 1
    stats.uninstall()
    gc.collect(2)
    assert generation(stats.snapshot(), 2)["collections"] == 1
    assert stats.snapshot()["timed"] is False


def test_freeze_moves_the_live_heap_out_of_the_collections() -> None:
    try:
        frozen = freeze_startup_heap()
        # An imported interpreter with pytest and vhostmem loaded: thousands of objects.
        assert frozen == gc.get_freeze_count() > 10_000
        tracked = sum(gc.get_count())  # the young generations are empty after the collect
        assert len(gc.get_objects(2)) < frozen // 10
        assert tracked < frozen
    finally:
        gc.unfreeze()
