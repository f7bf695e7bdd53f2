"""A real guest's O_DIRECT random reads on vhostmem, then on qemu-storage-daemon.

    python bench/guest_bench.py [--seconds 5] [--jobs 1,4] [--ring split,packed]

Boots the QEMU harness guest (qemu/launch.py; KVM where a probe boot works, else TCG) per
backend and job count, interleaved A B B A over ``rounds``; in the guest
``vmtest --bench`` runs ``jobs`` processes of O_DIRECT 4 KiB random reads at queue depth 1 each
for a fixed time. Reports guest IOPS per backend and the ratio vhostmem/qsd. Under TCG the guest
CPU (emulated) is the bottleneck, so this mostly measures the guest, not the backend: the ratio
says whether a backend is slow enough to show through a real virtio-blk driver.
The CPU seconds of the backend and of QEMU are sampled for the whole boot (boot + workload).
``--ring split,packed``: vhostmem also boots with ``packed=on`` on the vhost-user-blk-pci device
(the guest negotiates packed virtqueues, checked in its sysfs features: ``vhostmem+packed``), in
the same A B B A order; qemu-storage-daemon has split rings only. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import cpu_seconds
from qemu.backends import qsd_backend, vhostmem_backend
from qemu.hostchecks import PACKED_CHECK
from qemu.launch import GuestConfig, run_guest

MIB = 1 << 20
DISK_MIB = 64
BOOT_ALLOWANCE_S = 60.0
NS = 1e9
BENCH_LINE = re.compile(r"VHOSTMEM-INFO bench job=(\d+) ops=(\d+) ns=(\d+)")
SAMPLE_S = 0.1
QEMU_COMM = "qemu-system-x86"  # /proc comm is cut at 15 characters


class ChildCpu:
    """Samples the CPU time of this process's children (backend, QEMU) while a boot runs:
    run_guest does not expose their pids, and their times are gone once they are reaped."""

    def __init__(self) -> None:
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ChildCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        me = str(os.getpid())
        while not self._stop.wait(SAMPLE_S):
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    self._sample(int(entry.name), me)

    def _sample(self, pid: int, parent: str) -> None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
            comm = text[text.index("(") + 1 : text.rindex(")")]
            if text.rsplit(")", 1)[1].split()[1] == parent:  # ppid
                self.last[pid] = (comm, cpu_seconds(pid))
        except (OSError, ValueError, IndexError):
            pass  # the process is gone

    def seconds(self, qemu: bool) -> float:
        return sum(cpu for comm, cpu in self.last.values() if (comm == QEMU_COMM) == qemu)


class GuestBenchError(RuntimeError):
    """The guest did not report a benchmark result."""


PACKED_SUFFIX = "+packed"  # vhostmem with packed=on (qemu-storage-daemon 7.2 has no packed rings)


def variants(rings: list[str]) -> list[str]:
    return (["vhostmem", "qsd"] if "split" in rings else []) + (
        ["vhostmem" + PACKED_SUFFIX] if "packed" in rings else [])


def one_boot(variant: str, seconds: int, jobs: int) -> dict[str, Any]:
    backend = qsd_backend() if variant == "qsd" else vhostmem_backend()
    packed = variant.endswith(PACKED_SUFFIX)
    config = GuestConfig(disk_size=DISK_MIB * MIB, bench_seconds=seconds, bench_jobs=jobs,
                         timeout=seconds + BOOT_ALLOWANCE_S, packed=packed)
    with ChildCpu() as cpu:
        result = run_guest(backend, config)
    found = BENCH_LINE.findall(result.serial_log)
    packed_seen = any(c.name == PACKED_CHECK and c.passed for c in result.checks)
    if not result.passed or len(found) != jobs or packed_seen != packed:
        raise GuestBenchError(f"{variant} jobs={jobs} (packed check {packed_seen}): "
                              f"{result.report()}")
    ops = sum(int(o) for _, o, _ in found)
    longest = max(int(ns) for _, _, ns in found) / NS
    return {"iops": round(ops / longest), "ops": ops, "seconds": round(longest, 3),
            "boot_total_s": round(result.seconds, 1),
            "backend_cpu_s_whole_boot": round(cpu.seconds(qemu=False), 2),
            "qemu_cpu_s_whole_boot": round(cpu.seconds(qemu=True), 2),
            "accel": result.accel}


def merge(boots: list[dict[str, Any]]) -> dict[str, Any]:
    ops = sum(b["ops"] for b in boots)
    secs = sum(b["seconds"] for b in boots)
    return {"iops": round(ops / secs), "per_boot_iops": [b["iops"] for b in boots],
            "backend_cpu_s_whole_boot": [b["backend_cpu_s_whole_boot"] for b in boots],
            "qemu_cpu_s_whole_boot": [b["qemu_cpu_s_whole_boot"] for b in boots],
            "boots": len(boots), "accel": sorted({b["accel"] for b in boots})}


def ratios(case: dict[str, Any]) -> None:
    """IOPS ratios of the variants a case ran: vhostmem/qsd (split), packed/split, packed/qsd."""
    packed = "vhostmem" + PACKED_SUFFIX
    for key, a, b in (("ratio_iops", "vhostmem", "qsd"),
                      ("ratio_iops_packed_vs_split", packed, "vhostmem"),
                      ("ratio_iops_packed_vs_qsd", packed, "qsd")):
        if a in case and b in case:
            case[key] = round(case[a]["iops"] / case[b]["iops"], 3)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--jobs", default="1,4", help="comma list of guest process counts")
    ap.add_argument("--rounds", type=int, default=2, help="boots per backend, interleaved")
    ap.add_argument("--ring", default="split", help="comma list of split,packed")
    args = ap.parse_args(argv)
    names = variants(args.ring.split(","))
    if not names:
        ap.error("--ring: choose from split,packed")
    t0 = time.monotonic()
    cases = []
    for jobs in (int(j) for j in args.jobs.split(",")):
        case: dict[str, Any] = {"workload": "randread", "bs": 4096, "jobs": jobs,
                                "qd_per_job": 1}
        boots: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for rnd in range(args.rounds):
            for name in names if rnd % 2 == 0 else names[::-1]:  # A B B A
                boots[name].append(one_boot(name, args.seconds, jobs))
        for name, runs in boots.items():
            case[name] = merge(runs)
        ratios(case)
        cases.append(case)
    accels = sorted({a for c in cases for n in names for a in c[n]["accel"]})
    return {"bench": "guest", "accel": "/".join(accels), "disk_mib": DISK_MIB,
            "seconds_per_boot": args.seconds, "cases": cases,
            "note": "under TCG the emulated guest CPU bounds IOPS; see bench/RESULTS.md",
            "wall_s": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(argv), indent=1))


if __name__ == "__main__":
    main()
