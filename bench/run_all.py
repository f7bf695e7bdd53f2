"""Every benchmark, one combined JSON object (`make bench`).

    python bench/run_all.py [--quick] [--skip guest,...]

Runs, each as its own process: bench/blk_bench.py (vhostmem vs qemu-storage-daemon through the
Python load generator; then split vs packed virtqueues, ``blk-packed``), bench/guest_bench.py
(a real guest under QEMU on each backend, vhostmem also with packed=on),
blk_bench.py --log-all (dirty logging on vs off), bench/migration_bench.py (live migration of a
real guest on each backend),
bench/memmap_bench.py (the memory map against SPDK's C figures) and bench/region_bench.py (a
16 GiB memfd region registered end to end). ``--quick`` passes the short variants on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SUITES: dict[str, tuple[str, list[str], list[str]]] = {
    # name: (script, full-mode args, quick-mode args)
    "blk": ("blk_bench.py", [], ["--quick"]),
    # split vs packed virtqueues (vhostmem), qsd's split rings as the peer
    "blk-packed": ("blk_bench.py", ["--ring", "split,packed", "--storage", "shm", "--queues", "1"],
                   ["--quick", "--ring", "split,packed"]),
    "guest": ("guest_bench.py", ["--seconds", "5", "--jobs", "1,4", "--ring", "split,packed"],
              ["--seconds", "2", "--jobs", "1", "--rounds", "1", "--ring", "split,packed"]),
    # dirty logging on vs off (live migration), both backends
    "blk-log": ("blk_bench.py", ["--log-all", "--storage", "shm", "--queues", "1"],
                ["--quick", "--log-all", "--rw", "randread"]),
    "migration": ("migration_bench.py", ["--rounds", "2"],
                  ["--rounds", "1", "--switchovers", "1"]),
    "memmap": ("memmap_bench.py", [], []),
    "region": ("region_bench.py", [], ["--reps", "3"]),
}


def run_suite(name: str, quick: bool) -> dict[str, Any]:
    script, full_args, quick_args = SUITES[name]
    argv = [sys.executable, str(BENCH_DIR / script), *(quick_args if quick else full_args)]
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": f"{script} exited with {proc.returncode}",
                "stderr_tail": proc.stderr[-2000:]}
    out = json.loads(proc.stdout)
    out["suite_wall_s"] = round(time.monotonic() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help=f"comma list of suites to skip ({list(SUITES)})")
    args = ap.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(SUITES)
    if unknown:
        ap.error(f"unknown suites {sorted(unknown)}; known: {list(SUITES)}")
    t0 = time.monotonic()
    results: dict[str, Any] = {"mode": "quick" if args.quick else "full"}
    for name in SUITES:
        if name not in skip:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_suite(name, args.quick)
    results["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(results, indent=1))
    return 1 if any(isinstance(v, dict) and "error" in v for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
