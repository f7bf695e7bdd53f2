"""A real guest's O_DIRECT random reads on vhostmem, then on qemu-storage-daemon.

    python bench/guest_bench.py [--seconds 5] [--jobs 1,4]

Boots the QEMU harness guest (qemu/launch.py, TCG) once per backend and job count; in the guest
``vmtest --bench`` runs ``jobs`` processes of O_DIRECT 4 KiB random reads at queue depth 1 each
for a fixed time. Reports guest IOPS per backend and the ratio vhostmem/qsd. Under TCG the guest
CPU (emulated) is the bottleneck, so this mostly measures the guest, not the backend: the ratio
says whether a backend is slow enough to show through a real virtio-blk driver.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu.backends import qsd_backend, vhostmem_backend
from qemu.launch import GuestConfig, run_guest

MIB = 1 << 20
DISK_MIB = 64
BOOT_ALLOWANCE_S = 60.0
NS = 1e9
BENCH_LINE = re.compile(r"VHOSTMEM-INFO bench job=(\d+) ops=(\d+) ns=(\d+)")


class GuestBenchError(RuntimeError):
    """The guest did not report a benchmark result."""


def one_boot(backend_name: str, seconds: int, jobs: int) -> dict[str, Any]:
    backend = vhostmem_backend() if backend_name == "vhostmem" else qsd_backend()
    config = GuestConfig(disk_size=DISK_MIB * MIB, bench_seconds=seconds, bench_jobs=jobs,
                         timeout=seconds + BOOT_ALLOWANCE_S)
    result = run_guest(backend, config)
    found = BENCH_LINE.findall(result.serial_log)
    if not result.passed or len(found) != jobs:
        raise GuestBenchError(f"{backend_name} jobs={jobs}: {result.report()}")
    ops = sum(int(o) for _, o, _ in found)
    longest = max(int(ns) for _, _, ns in found) / NS
    return {"iops": round(ops / longest), "ops": ops, "seconds": round(longest, 3),
            "boot_total_s": round(result.seconds, 1)}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--jobs", default="1,4", help="comma list of guest process counts")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    cases = []
    for jobs in (int(j) for j in args.jobs.split(",")):
        case: dict[str, Any] = {"workload": "randread", "bs": 4096, "jobs": jobs,
                                "qd_per_job": 1}
        for name in ("vhostmem", "qsd"):
            case[name] = one_boot(name, args.seconds, jobs)
        case["ratio_iops"] = round(case["vhostmem"]["iops"] / case["qsd"]["iops"], 3)
        cases.append(case)
    return {"bench": "guest", "accel": "tcg", "disk_mib": DISK_MIB,
            "seconds_per_boot": args.seconds, "cases": cases,
            "note": "TCG: the emulated guest CPU bounds IOPS; see bench/RESULTS.md",
            "wall_s": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(argv), indent=1))


if __name__ == "__main__":
    main()
