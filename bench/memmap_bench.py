"""Benchmark of vhostmem.memmap against SPDK's C memory map (lib/env_dpdk/memory.c).

Prints one JSON object. The SPDK C figures are from a C build of memory.c timed on a
2 vCPU Zen 4 machine doing the same work; ours are medians of several repetitions, each on a
fresh registry and fresh maps so table allocation is included. No memory is mapped: the maps
only record addresses.
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vhostmem.memmap import MapOps, MemMap, MemRegistry, NotifyAction

GIB = 1 << 30
MIB2 = 2 << 20
BASE = 0x7F00_0020_0000  # 2 MiB aligned, not 1 GiB aligned: the range spans 101 tables
SIZE = 100 * GIB
SMALL_COUNT = SIZE // MIB2  # 51200 registrations of 2 MiB
REPS = 7
SMALL_REPS = 3
TRANSLATE_MANY_COUNT = 10_000_000
SCALAR_COUNT = 2_000_000  # scalar calls are timed on fewer addresses to keep the run short
SEED_SPDK_MS_PER_GB = 169.3  # seed document: SPDK registration including vtophys

SPDK_C = {
    "register_100g_0maps_ms": 0.85,
    "register_100g_1maps_ms": 1.55,
    "register_100g_3maps_ms": 2.63,
    "register_2m_x51200_3maps_ms": 3.93,
    "unregister_100g_3maps_ms": 1.84,
    "translate_ns": 3.83,
}


def notify(mem_map: MemMap, ctx: Any, action: NotifyAction, vaddr: int, length: int) -> None:
    """One translation over the whole chunk, as the benchmarked C notify does."""
    if action == NotifyAction.REGISTER:
        mem_map.set_translation(vaddr, length, vaddr)
    else:
        mem_map.clear_translation(vaddr, length)


def fresh(maps: int) -> tuple[MemRegistry, list[MemMap]]:
    reg = MemRegistry()
    return reg, [reg.alloc_map(0, MapOps(notify=notify)) for _ in range(maps)]


def timed(setup: Callable[[], Any], work: Callable[[Any], None], reps: int) -> float:
    """Median milliseconds of ``work(setup())`` over ``reps`` runs (setup not timed)."""
    samples = []
    for _ in range(reps):
        state = setup()
        gc.collect()
        start = time.perf_counter()
        work(state)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def bench_register(maps: int) -> float:
    return timed(lambda: fresh(maps), lambda s: s[0].register(BASE, SIZE), REPS)


def bench_small_registrations() -> float:
    def work(state: tuple[MemRegistry, list[MemMap]]) -> None:
        register = state[0].register
        for i in range(SMALL_COUNT):
            register(BASE + i * MIB2, MIB2)

    return timed(lambda: fresh(3), work, SMALL_REPS)


def bench_unregister() -> float:
    def setup() -> tuple[MemRegistry, list[MemMap]]:
        state = fresh(3)
        state[0].register(BASE, SIZE)
        return state

    return timed(setup, lambda s: s[0].unregister(BASE, SIZE), REPS)


def bench_translate() -> dict[str, float]:
    reg, (mem_map,) = fresh(1)
    reg.register(BASE, SIZE)
    rng = np.random.default_rng(1)
    batch = np.uint64(BASE) + rng.integers(0, SIZE, TRANSLATE_MANY_COUNT, dtype=np.uint64)
    scalar = [int(a) for a in batch[:SCALAR_COUNT]]
    translate, lookup = mem_map.translate, mem_map.lookup
    out: dict[str, list[float]] = {"translate": [], "lookup": [], "many": []}
    mem_map.translate_many(batch[:1])  # builds the numpy mirror once, outside the timing
    for _ in range(3):
        start = time.perf_counter()
        for a in scalar:
            translate(a)
        out["translate"].append((time.perf_counter() - start) / SCALAR_COUNT * 1e9)
        start = time.perf_counter()
        for a in scalar:
            lookup(a)
        out["lookup"].append((time.perf_counter() - start) / SCALAR_COUNT * 1e9)
        start = time.perf_counter()
        result = mem_map.translate_many(batch)
        out["many"].append((time.perf_counter() - start) / TRANSLATE_MANY_COUNT * 1e9)
    if int(result[0]) != mem_map.lookup(int(batch[0])) or int(result[0]) != BASE:
        raise SystemExit("translate_many disagrees with lookup")
    return {key: statistics.median(values) for key, values in out.items()}


def bench_memory() -> dict[str, float]:
    """tracemalloc bytes per registered GiB per map (table storage; the fixed top-level list
    each map allocates up front is reported separately, as is translate_many's numpy mirror,
    whose 2 MiB top-level array is a fixed cost too)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    reg, (mem_map,) = fresh(1)
    after_alloc = tracemalloc.get_traced_memory()[0]
    reg.register(BASE, SIZE)
    after_register = tracemalloc.get_traced_memory()[0]
    mem_map.translate_many([BASE])
    after_mirror = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "map_fixed_bytes": after_alloc - before,
        "bytes_per_gib_per_map": (after_register - after_alloc) / (SIZE / GIB),
        "translate_many_mirror_bytes_for_100g": after_mirror - after_register,
    }


def main() -> None:
    started = time.perf_counter()
    result: dict[str, Any] = {}
    for maps in (0, 1, 3):
        key = f"register_100g_{maps}maps_ms"
        result[key] = round(bench_register(maps), 3)
        result[f"{key}_spdk_c"] = SPDK_C[key]
    result["register_100g_3maps_ms_per_gib"] = round(result["register_100g_3maps_ms"] / 100, 5)
    result["seed_spdk_ms_per_gb_with_vtophys"] = SEED_SPDK_MS_PER_GB
    result["register_2m_x51200_3maps_ms"] = round(bench_small_registrations(), 1)
    result["register_2m_x51200_3maps_ms_spdk_c"] = SPDK_C["register_2m_x51200_3maps_ms"]
    result["unregister_100g_3maps_ms"] = round(bench_unregister(), 3)
    result["unregister_100g_3maps_ms_spdk_c"] = SPDK_C["unregister_100g_3maps_ms"]
    tr = bench_translate()
    result["translate_scalar_ns_per_call"] = round(tr["translate"], 1)
    result["lookup_scalar_ns_per_call"] = round(tr["lookup"], 1)
    result["translate_scalar_addresses"] = SCALAR_COUNT
    result["translate_many_ns_per_address"] = round(tr["many"], 2)
    result["translate_many_addresses"] = TRANSLATE_MANY_COUNT
    result["translate_spdk_c_ns_per_call"] = SPDK_C["translate_ns"]
    result.update({k: round(v, 1) for k, v in bench_memory().items()})
    result["repetitions"] = {"register_unregister": REPS, "small_registrations": SMALL_REPS,
                             "translate": 3}
    result["statistic"] = "median"
    result["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    random.seed(0)
    main()
