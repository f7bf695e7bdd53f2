"""Live migration on vhostmem vs qemu-storage-daemon: the same guest and workload, one run.

    python bench/migration_bench.py [--rounds 2] [--switchovers 3] [--jobs 2]

Per backend, interleaved A B B A over ``rounds``: qemu/migrate.py boots a guest (TCG here) whose
writer and page-cache jobs read and write the disk continuously, and migrates it
``switchovers`` times between two QEMU 7.2 processes on the backend's two sockets (one image),
at full speed (``max-bandwidth`` 4 GiB/s, ``downtime-limit`` 300 ms). Per migration: QEMU's
``total-time`` and ``downtime`` (query-migrate), MiB sent, dirty syncs, the time until every job
progressed again on the destination; per run: guest I/O errors, stale page-cache blocks and the
guest's verdict (every block checked at the end). Reports medians per backend and the ratios
vhostmem/qsd. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.blk_bench import machine
from qemu.assets import prepare
from qemu.migrate import (
    MIB,
    MIGRATE,
    MigrationBackend,
    MigrationConfig,
    MigrationResult,
    qsd_migration_backend,
    run_migration_test,
    vhostmem_migration_backend,
)

BACKENDS = {"vhostmem": vhostmem_migration_backend, "qsd": qsd_migration_backend}


def run_once(backend: MigrationBackend, switchovers: int, jobs: int) -> dict[str, Any]:
    result = run_migration_test(backend, MigrationConfig(steps=(MIGRATE,) * switchovers,
                                                         jobs=jobs), assets=prepare())
    return {"passed": result.passed, "verdict": result.verdict, "error": result.error,
            "seconds": round(result.seconds, 1),
            "guest_io_errors": _io_errors(result), "stale_blocks": len(result.stale_lines),
            "failed_checks": [c.name for c in result.checks if not c.passed],
            "migrations": [_migration(m) for m in result.migrations]}


def _io_errors(result: MigrationResult) -> int:
    """Kernel I/O error lines on the guest's console (the harness's no-guest-io-errors)."""
    return sum("I/O error" in line for line in result.serial_log.splitlines())


def _migration(m: Any) -> dict[str, Any]:
    return {"status": m.status, "total_ms": m.total_ms, "downtime_ms": m.downtime_ms,
            "setup_ms": m.setup_ms, "mib_sent": round(m.transferred / MIB, 1),
            "dirty_syncs": m.dirty_syncs, "host_ms": m.host_ms,
            "resumed_s": None if m.resumed_s is None else round(m.resumed_s, 2),
            "ram_identical": m.ram_diff_pages == 0}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [m for r in runs for m in r["migrations"] if m["status"] == "completed"]

    def median(key: str) -> float | None:
        values = [m[key] for m in done if m[key] is not None]
        return round(statistics.median(values), 1) if values else None

    return {"runs": len(runs), "runs_passed": sum(r["passed"] for r in runs),
            "migrations": len(done), "total_ms_median": median("total_ms"),
            "total_ms_max": max((m["total_ms"] or 0 for m in done), default=None),
            "downtime_ms_median": median("downtime_ms"),
            "downtime_ms_max": max((m["downtime_ms"] or 0 for m in done), default=None),
            "mib_sent_median": median("mib_sent"), "resumed_s_median": median("resumed_s"),
            "guest_io_errors": sum(r["guest_io_errors"] for r in runs),
            "stale_blocks": sum(r["stale_blocks"] for r in runs),
            "ram_identical": all(m["ram_identical"] for m in done)}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds (A B B A for 2)")
    ap.add_argument("--switchovers", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="writer jobs, and as many cache jobs")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    args = ap.parse_args(argv)
    names = args.backends.split(",")
    t0 = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in names}
    for rnd in range(args.rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            runs[name].append(run_once(BACKENDS[name](), args.switchovers, args.jobs))
    out: dict[str, Any] = {"bench": "migration", "machine": machine(),
                           "switchovers": args.switchovers, "jobs": args.jobs,
                           "rounds": args.rounds}
    for name in names:
        out[name] = summarize(runs[name])
        out[f"{name}_runs"] = runs[name]
    if set(BACKENDS) <= set(names):
        v, q = out["vhostmem"], out["qsd"]
        out["ratio"] = {key: round(v[key] / q[key], 3) if v[key] and q[key] else None
                        for key in ("total_ms_median", "downtime_ms_median")}
    out["wall_s"] = round(time.monotonic() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(argv), indent=1))


if __name__ == "__main__":
    main()
