"""A real guest's O_DIRECT random reads on vhostmem, then on qemu-storage-daemon.

    python bench/guest_bench.py [--seconds 5] [--jobs 1,4] [--ring split,packed]
        [--backends vhostmem,qsd,...] [--pin]

Boots the QEMU harness guest (qemu/launch.py; KVM where a probe boot works, else TCG) per
backend and job count, interleaved A B B A over ``rounds``; in the guest
``vmtest --bench`` runs ``jobs`` processes of O_DIRECT 4 KiB random reads at queue depth 1 each
for a fixed time. Reports guest IOPS per backend and the ratio vhostmem/qsd. Under TCG the guest
CPU (emulated) is the bottleneck, so this mostly measures the guest, not the backend: the ratio
says whether a backend is slow enough to show through a real virtio-blk driver.
The CPU seconds of the backend and of QEMU are sampled for the whole boot (boot + workload).
``--ring split,packed``: vhostmem also boots with ``packed=on`` on the vhost-user-blk-pci device
(the guest negotiates packed virtqueues, checked in its sysfs features: ``vhostmem+packed``), in
the same A B B A order; qemu-storage-daemon has split rings only. ``--backends`` names the
variants instead: ``vhostmem``, ``vhostmem+packed``, ``vhostmem-pollN`` (``--poll-us N``),
``vhostmem-thread`` (``--io-mode thread``), ``vhostmem-wN`` (``--workers N``), ``qsd``,
``qsd-iothread`` (its export in an IOThread, which polls adaptively), and
``vhostmem@EXECUTABLE`` (another build's ``vhostmem`` command, e.g. a wrapper running an older
tree, for before/after in one run). Per variant the guest's
cost of the run is reported too: the disk's completion interrupts and the guest's context
switches per read (``irqs_per_io``, ``ctxt_per_io``, from /proc/interrupts and /proc/stat).
``--pin`` (a diagnostic): QEMU on CPU 0, the backend on CPU 1 (``taskset``), so that neither
competes with the other for a core; a variant named ``NAME+pin`` is pinned so on its own, for
pinned and unpinned boots in the same run. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import cpu_seconds
from qemu.backends import Backend, BackendRequest, qsd_backend, vhostmem_backend
from qemu.hostchecks import PACKED_CHECK
from qemu.launch import GuestConfig, run_guest

MIB = 1 << 20
DISK_MIB = 64
BOOT_ALLOWANCE_S = 60.0
NS = 1e9
BENCH_LINE = re.compile(r"VHOSTMEM-INFO bench job=(\d+) ops=(\d+) ns=(\d+)")
COUNTERS_LINE = re.compile(
    r"VHOSTMEM-INFO bench-counters irqs=(\d+) ctxt=(\d+) idle=(\d+) ticks=(\d+)")
SAMPLE_S = 0.1
QEMU_COMM = "qemu-system-x86"  # /proc comm is cut at 15 characters


Times = tuple[float, float]  # (CPU seconds, seconds runnable but waiting for a CPU)


class ChildCpu:
    """Samples the CPU time of this process's children (backend, QEMU) while a boot runs:
    run_guest does not expose their pids, and their times are gone once they are reaped.
    Besides CPU time, the time their threads spent runnable but waiting for a CPU (the second
    field of /proc/PID/task/TID/schedstat; a thread that exited takes its share with it).
    ``history`` keeps (time, backend, QEMU) per sample, each (CPU s, wait s), for the
    workload's window."""

    def __init__(self) -> None:
        self.last: dict[int, tuple[str, float, float]] = {}
        self.history: list[tuple[float, Times, Times]] = []
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
            before = dict(self.last)
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    self._sample(int(entry.name), me)
            if self.last != before:  # a child ran: the boot is still going
                self.history.append((time.monotonic(), self.times(qemu=False),
                                     self.times(qemu=True)))

    def _sample(self, pid: int, parent: str) -> None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
            comm = text[text.index("(") + 1 : text.rindex(")")]
            if text.rsplit(")", 1)[1].split()[1] == parent:  # ppid
                self.last[pid] = (comm, cpu_seconds(pid), _runqueue_wait(pid))
        except (OSError, ValueError, IndexError):
            pass  # the process is gone

    def seconds(self, qemu: bool) -> float:
        return self.times(qemu)[0]

    def times(self, qemu: bool) -> Times:
        """(CPU s, wait s) of the backend's or QEMU's processes."""
        picked = [(cpu, wait) for comm, cpu, wait in self.last.values()
                  if (comm == QEMU_COMM) == qemu]
        return sum(c for c, _ in picked), sum(w for _, w in picked)

    def last_window(self, seconds: float) -> tuple[Times, Times]:
        """(backend, QEMU) (CPU s, wait s) in the last ``seconds`` of the boot: the workload,
        which ends just before the guest powers off (its start is not seen from the host)."""
        if not self.history:
            return (0.0, 0.0), (0.0, 0.0)
        end = self.history[-1]
        start = next((h for h in reversed(self.history) if h[0] <= end[0] - seconds),
                     self.history[0])
        return ((end[1][0] - start[1][0], end[1][1] - start[1][1]),
                (end[2][0] - start[2][0], end[2][1] - start[2][1]))


def _runqueue_wait(pid: int) -> float:
    """Seconds the process's threads spent runnable and waiting for a CPU (schedstat)."""
    total = 0
    for task in os.scandir(f"/proc/{pid}/task"):
        try:
            with open(f"{task.path}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            pass  # the thread is gone
    return total / NS


class GuestBenchError(RuntimeError):
    """The guest did not report a benchmark result."""


PACKED_SUFFIX = "+packed"  # vhostmem with packed=on (qemu-storage-daemon 7.2 has no packed rings)
POLL_PREFIX = "vhostmem-poll"
WORKERS_PREFIX = "vhostmem-w"
OTHER_BUILD = "vhostmem@"
QEMU_CPU, BACKEND_CPU = 0, 1  # --pin
PIN_SUFFIX = "+pin"


def variants(rings: list[str]) -> list[str]:
    return (["vhostmem", "qsd"] if "split" in rings else []) + (
        ["vhostmem" + PACKED_SUFFIX] if "packed" in rings else [])


def _qsd_iothread() -> Backend:
    """qemu-storage-daemon with its export in an IOThread (adaptive polling, poll-max-ns)."""
    plain = qsd_backend()

    def command(req: BackendRequest) -> list[str]:
        argv = plain.argv(req)
        return [argv[0], "--object", "iothread,id=io0", *argv[1:-1], argv[-1] + ",iothread=io0"]

    return Backend(name="qsd-iothread", command=command)


def make_backend(variant: str) -> Backend:
    """The backend a variant name stands for (see the module docstring)."""
    variant = variant.removesuffix(PIN_SUFFIX)
    if variant == "qsd":
        return qsd_backend()
    if variant == "qsd-iothread":
        return _qsd_iothread()
    if variant in ("vhostmem", "vhostmem" + PACKED_SUFFIX):
        return vhostmem_backend()
    if variant.startswith(OTHER_BUILD):
        return vhostmem_backend(executable=Path(variant[len(OTHER_BUILD):]))
    if variant == "vhostmem-thread":
        return vhostmem_backend(extra=("--io-mode", "thread"))
    for prefix, option in ((POLL_PREFIX, "--poll-us"), (WORKERS_PREFIX, "--workers")):
        if variant.startswith(prefix) and variant[len(prefix):].isdigit():
            return vhostmem_backend(extra=(option, variant[len(prefix):]))
    raise ValueError(f"unknown backend variant {variant!r}")


def _pinned(backend: Backend) -> Backend:
    """The backend's command under ``taskset`` on BACKEND_CPU (--pin)."""
    taskset = shutil.which("taskset") or "taskset"
    return Backend(name=backend.name, ram_disk=backend.ram_disk,
                   command=lambda req: [taskset, "-c", str(BACKEND_CPU), *backend.argv(req)])


def one_boot(variant: str, seconds: int, jobs: int, pin: bool = False) -> dict[str, Any]:
    backend = make_backend(variant)
    packed = variant.removesuffix(PIN_SUFFIX).endswith(PACKED_SUFFIX)
    pin = pin or variant.endswith(PIN_SUFFIX)
    config = GuestConfig(disk_size=DISK_MIB * MIB, bench_seconds=seconds, bench_jobs=jobs,
                         timeout=seconds + BOOT_ALLOWANCE_S, packed=packed)
    mask = os.sched_getaffinity(0)
    if pin:  # QEMU inherits this process's CPU set; the backend gets its own
        backend = _pinned(backend)
        os.sched_setaffinity(0, {QEMU_CPU})
    try:
        with ChildCpu() as cpu:
            result = run_guest(backend, config)
    finally:
        os.sched_setaffinity(0, mask)
    found = BENCH_LINE.findall(result.serial_log)
    counters = COUNTERS_LINE.search(result.serial_log)
    packed_seen = any(c.name == PACKED_CHECK and c.passed for c in result.checks)
    if not result.passed or len(found) != jobs or packed_seen != packed or counters is None:
        raise GuestBenchError(f"{variant} jobs={jobs} (packed check {packed_seen}): "
                              f"{result.report()}")
    ops = sum(int(o) for _, o, _ in found)
    longest = max(int(ns) for _, _, ns in found) / NS
    (backend_s, backend_wait), (qemu_s, qemu_wait) = cpu.last_window(longest)
    return {"iops": round(ops / longest), "ops": ops, "seconds": round(longest, 3),
            "irqs": int(counters[1]), "ctxt": int(counters[2]),
            "guest_idle": round(int(counters[3]) / max(1, int(counters[4])), 3),
            "backend_cpu_s_run": round(backend_s, 2), "qemu_cpu_s_run": round(qemu_s, 2),
            "backend_wait_s_run": round(backend_wait, 3), "qemu_wait_s_run": round(qemu_wait, 3),
            "boot_total_s": round(result.seconds, 1),
            "backend_cpu_s_whole_boot": round(cpu.seconds(qemu=False), 2),
            "qemu_cpu_s_whole_boot": round(cpu.seconds(qemu=True), 2),
            "accel": result.accel}


def merge(boots: list[dict[str, Any]]) -> dict[str, Any]:
    ops = sum(b["ops"] for b in boots)
    secs = sum(b["seconds"] for b in boots)
    return {"iops": round(ops / secs), "per_boot_iops": [b["iops"] for b in boots],
            "irqs_per_io": round(sum(b["irqs"] for b in boots) / ops, 3),
            "ctxt_per_io": round(sum(b["ctxt"] for b in boots) / ops, 3),
            "guest_idle": [b["guest_idle"] for b in boots],
            # host CPU per read over the workload's last ``seconds`` (see ChildCpu.last_window)
            "backend_cpu_us_per_io": round(sum(b["backend_cpu_s_run"] for b in boots) / ops
                                           * 1e6, 1),
            "qemu_cpu_us_per_io": round(sum(b["qemu_cpu_s_run"] for b in boots) / ops * 1e6, 1),
            # time runnable but without a CPU, per read (schedstat): waiting for the scheduler
            "backend_wait_us_per_io": round(sum(b["backend_wait_s_run"] for b in boots) / ops
                                            * 1e6, 1),
            "qemu_wait_us_per_io": round(sum(b["qemu_wait_s_run"] for b in boots) / ops * 1e6,
                                         1),
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
    if "qsd" in case:  # every other variant against plain qsd
        case["iops_vs_qsd"] = {name: round(v["iops"] / case["qsd"]["iops"], 3)
                               for name, v in case.items()
                               if isinstance(v, dict) and "iops" in v and name != "qsd"}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--jobs", default="1,4", help="comma list of guest process counts")
    ap.add_argument("--rounds", type=int, default=2, help="boots per backend, interleaved")
    ap.add_argument("--ring", default="split", help="comma list of split,packed")
    ap.add_argument("--backends", default="",
                    help="comma list of variants (overrides --ring; see the module docstring)")
    ap.add_argument("--pin", action="store_true",
                    help="diagnostic: QEMU on CPU 0, the backend on CPU 1")
    args = ap.parse_args(argv)
    names = args.backends.split(",") if args.backends else variants(args.ring.split(","))
    if not names:
        ap.error("--ring: choose from split,packed")
    for name in names:
        try:
            make_backend(name)
        except ValueError as exc:
            ap.error(str(exc))
    t0 = time.monotonic()
    cases = []
    for jobs in (int(j) for j in args.jobs.split(",")):
        case: dict[str, Any] = {"workload": "randread", "bs": 4096, "jobs": jobs,
                                "qd_per_job": 1}
        boots: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for rnd in range(args.rounds):
            for name in names if rnd % 2 == 0 else names[::-1]:  # A B B A
                boots[name].append(one_boot(name, args.seconds, jobs, args.pin))
        for name, runs in boots.items():
            case[name] = merge(runs)
        ratios(case)
        cases.append(case)
    accels = sorted({a for c in cases for n in names for a in c[n]["accel"]})
    return {"bench": "guest", "accel": "/".join(accels), "disk_mib": DISK_MIB, "pin": args.pin,
            "seconds_per_boot": args.seconds, "cases": cases,
            "note": "under TCG the emulated guest CPU bounds IOPS; see bench/RESULTS.md",
            "wall_s": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(argv), indent=1))


if __name__ == "__main__":
    main()
