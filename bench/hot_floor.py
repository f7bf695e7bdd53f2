"""The floors under the inline hot path on this machine: what a 4 KiB read request costs in
syscalls alone, next to what the whole Python hot path costs, in the same run.

    .venv/bin/python bench/hot_floor.py [--rounds 4] [--seconds 1.0]

Measured per round, in the order A B B A of each pair (syscalls, hot path, hot path,
syscalls), each figure the minimum over batches of ``BATCH`` calls (ns per call):

* ``preadv_4k``: ``os.preadv`` of 4 KiB from a RAM disk (memfd) into a memoryview of another
  memfd's mapping (guest memory), one buffer: the syscall a request cannot avoid, plus the
  Python call around it;
* ``preadv_1b``: the same with 1 byte: syscall and call without the 4 KiB copy;
* ``eventfd_write``: one call-eventfd signal (``os.eventfd_write``), paid once per batch;
* ``py_call``: a call of a trivial C function from Python (``len``), the price of one step
  from Python into C (the loop's own step, an empty closure call, is subtracted from all four);
* ``hot_path``: tests/vhostmem/devices/bench_blk.py's turn (85 three-descriptor 4 KiB read
  chains on a 256-entry split ring: pop, walk, serve, used ring, notify) per request.

Derived: ``python_rest`` = hot_path - preadv_4k - eventfd_write / 85, the Python work per
request; ``helper_floor`` = preadv_4k + eventfd_write / 85, what a compiled helper that walks
the batch, issues one preadv per request and writes the used ring from C would still pay per
request, an upper bound on the syscall part (os.preadv's own argument handling is in it; the
helper's ring work, tens of ns in C, is not); ``copy_4k`` = preadv_4k - preadv_1b, the data
copy itself. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import mmap
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.vhostmem.devices.bench_blk import QUEUE_SIZE, build
from tests.vhostmem.ringhelpers import GPA_BASE

READ_SIZE = 4096
DISK_SIZE = 64 << 20
BATCH = 85  # requests per turn of the hot-path benchmark (256-entry ring, 3 descriptors each)
FLOOR_KEYS = ("preadv_4k", "preadv_1b", "eventfd_write", "py_call")


def _min_per_call(step: Callable[[], None], seconds: float) -> float:
    """Minimum over batches of BATCH calls of ``step``, in ns per call."""
    best = float("inf")
    clock = time.perf_counter_ns
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = clock()
        for _ in range(BATCH):
            step()
        best = min(best, (clock() - t0) / BATCH)
    return best


def floors(seconds: float) -> dict[str, float]:
    """The syscall and call floors, ``seconds`` each."""
    disk = os.memfd_create("hot-floor-disk")
    guest = os.memfd_create("hot-floor-guest")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        os.ftruncate(disk, DISK_SIZE)
        os.pwrite(disk, b"\xa5" * DISK_SIZE, 0)  # pages allocated: reads copy real data
        os.ftruncate(guest, READ_SIZE)
        mm = mmap.mmap(guest, READ_SIZE)
        view = memoryview(mm)
        one = view[:1]
        offsets = [(n * 8 * 512) % (DISK_SIZE - READ_SIZE) for n in range(BATCH)]
        it = itertools.cycle(offsets)
        preadv = os.preadv

        def read_4k() -> None:
            preadv(disk, (view,), next(it))

        def read_1b() -> None:
            preadv(disk, (one,), next(it))

        def signal() -> None:
            os.eventfd_write(efd, 1)

        def call() -> None:
            len(offsets)

        out = {
            "preadv_4k": _min_per_call(read_4k, seconds),
            "preadv_1b": _min_per_call(read_1b, seconds),
            "eventfd_write": _min_per_call(signal, seconds),
            "py_call": _min_per_call(call, seconds),
        }
        one.release()
        view.release()
        mm.close()
        # The loop's own step (a Python call of an empty closure) is in every figure: taken
        # out, the floors are the calls themselves (the preadv figures keep their ``next`` and
        # argument tuple, a few tens of ns).
        out["loop_overhead"] = _min_per_call(lambda: None, seconds)
        for key in FLOOR_KEYS:
            out[key] = max(out[key] - out["loop_overhead"], 0.0)
        return out
    finally:
        os.close(disk)
        os.close(guest)
        os.close(efd)


def hot_path(seconds: float) -> float:
    """bench_blk's inline turn, ns per request (minimum over turns)."""
    dev, vq, ring, heads, ram = build("direct", "inline")
    avail = memoryview(ram.mm)[ring.avail - GPA_BASE :][: 4 + 2 * QUEUE_SIZE].cast("H")
    idx = ring.avail_idx
    best = float("inf")
    clock = time.perf_counter_ns
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            t0 = clock()
            vq.new_turn()
            dev.handle_queue(vq)
            best = min(best, (clock() - t0) / len(heads))
            for h in heads:  # the driver gives the same chains back
                avail[2 + idx % QUEUE_SIZE] = h
                idx = (idx + 1) & 0xFFFF
            avail[1] = idx
    finally:
        avail.release()
        vq.close()
        dev.close()
        ram.close()
    return best


def summary(values: list[float]) -> dict[str, float]:
    lo, hi = min(values), max(values)
    return {"min": round(lo, 1), "median": round(statistics.median(values), 1),
            "max": round(hi, 1), "spread_pct": round(100 * (hi - lo) / lo, 1) if lo else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    a = ap.parse_args()
    runs: dict[str, list[float]] = {k: [] for k in (*FLOOR_KEYS, "loop_overhead", "hot_path")}
    load_before = os.getloadavg()
    for _ in range(a.rounds):  # A B B A: floors, hot path, hot path, floors
        first = floors(a.seconds / 2)
        runs["hot_path"] += [hot_path(a.seconds), hot_path(a.seconds)]
        second = floors(a.seconds / 2)
        for key in first:
            runs[key].append(min(first[key], second[key]))
    res = {k: summary(v) for k, v in runs.items()}
    best = {k: v["min"] for k, v in res.items()}
    per_batch = best["eventfd_write"] / BATCH
    derived = {
        "python_rest": round(best["hot_path"] - best["preadv_4k"] - per_batch, 1),
        "helper_floor": round(best["preadv_4k"] + per_batch, 1),
        "copy_4k": round(best["preadv_4k"] - best["preadv_1b"], 1),
    }
    print(json.dumps({
        "bench": "hot_floor", "unit": "ns per call (hot_path: per request)",
        "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "argv": sys.argv[1:], "batch": BATCH, "results": res, "derived_from_min": derived,
    }, indent=1))


if __name__ == "__main__":
    main()
