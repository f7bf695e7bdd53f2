"""vhostmem vs qemu-storage-daemon, same image, same load generator, same run.

    python bench/blk_bench.py [--quick] [--table]
    python bench/blk_bench.py --backends vhostmem-nbd,qsd-nbd --storage shm --table
    python bench/blk_bench.py --ring split,packed --storage shm --queues 1 --table

``vhostmem-wN``: vhostmem with ``--workers N`` (data-plane worker processes; the CPU counted
is the serve process's and its workers').

``vhostmem-nbd`` / ``qsd-nbd``: the same two backends over NBD, on one qemu-nbd serving the
image on a Unix socket (vhostmem ``nbd=URI``; qemu-storage-daemon an ``nbd`` blockdev).
``vhostmem-nbd-1conn``: vhostmem-nbd with ``nbd-conns=1``; with 2 queues qemu-nbd offers
multi-conn and vhostmem-nbd opens 2 connections (``ratio_conns``: vhostmem-nbd over it).
``vhostmem-nbd-pollN``: vhostmem-nbd with ``--poll-us N`` (busy polling, as ``vhostmem-pollN``).

For every case (storage: a /dev/shm file or a file on disk; 4 KiB random read or write; queue
depth 1/32/128 per queue; 1 or 2 queues) both backends are started fresh on the same image and
driven by bench/ringdriver.py for a fixed time, interleaved A B A B. Per backend: IOPS, MB/s,
p50/p99/p99.9 latency, the backend process's CPU seconds per I/O (utime + stime from /proc/PID/stat,
all threads), and the load generator's own CPU use (``loadgen_cpu`` = CPU seconds per wall
second; ``loadgen_saturated`` when it is near one full core, i.e. the numbers are a floor for the
backend). Prints one JSON object (``--table`` adds a markdown table on stderr).

``--log-all``: every backend also runs each case with dirty logging on, as during a live
migration (SET_LOG_BASE with a log sized like QEMU's, VHOST_F_LOG_ALL, VHOST_VRING_F_LOG on
the rings: the backend marks every page it writes); those runs are ``BACKEND+log`` in the same
A B B A order, and ``ratio.log_cpu_per_io`` is logging-on CPU per I/O over logging-off. The log
is not collected while the load runs (QEMU fetches it every few hundred ms; marking costs the
same whether or not a bit was already set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import (
    BACKENDS,
    NBD_BACKENDS,
    NBD_CONNS,
    cpu_seconds,
    running,
    runqueue_wait_seconds,
)
from bench.ringdriver import drive, make_queue, ram_bytes_for, sector_table
from vhostmem.frontend import VhostUserBlk

BLOCK = 4096
MIB = 1 << 20
IMAGE_MIB = 256
FILL_CHUNK = 4 * MIB
SATURATED = 0.9  # loadgen CPU seconds per wall second that counts as one busy core
WARMUP_S = 0.3
STORAGE_DIRS = {"shm": "/dev/shm", "disk": "/var/tmp"}
FULL = {"storage": ["shm", "disk"], "rw": ["randread", "randwrite"], "qd": [1, 32, 128],
        "queues": [1, 2], "seconds": 1.5, "rounds": 2}
QUICK = {"storage": ["shm"], "rw": ["randread", "randwrite"], "qd": [1, 128],
         "queues": [1], "seconds": 1.0, "rounds": 1}
US = 1e6


def make_image(storage: str, mib: int) -> str:
    """A fully written (not sparse) image so reads copy real data."""
    path = os.path.join(STORAGE_DIRS[storage], f"vhostmem-bench-{os.getpid()}-{storage}.img")
    chunk = (bytes(range(256)) * (FILL_CHUNK // 256))
    with open(path, "wb") as f:
        for _ in range(mib * MIB // FILL_CHUNK):
            f.write(chunk)
    return path


LOG_SUFFIX = "+log"
PACKED_SUFFIX = "+packed"  # a variant on packed virtqueues: BACKEND+packed[+log]
RINGS = ("split", "packed")
SPLIT_ONLY = ("qsd", "qsd-nbd")  # qemu-storage-daemon 7.2 has no packed virtqueues


def run_once(variant: str, image: str, rw: str, qd: int, queues: int,
             seconds: float, seed: int) -> dict[str, Any]:
    write = rw == "randwrite"
    backend = variant.removesuffix(LOG_SUFFIX).removesuffix(PACKED_SUFFIX)
    packed = PACKED_SUFFIX in variant
    with running(backend, image, queues) as (proc, sock), VhostUserBlk.open(
            sock, ram_size=ram_bytes_for(qd, queues, BLOCK), event_idx=True,
            packed=packed) as dev:
        if dev.packed != packed:
            raise RuntimeError(f"{variant}: packed rings {'not ' if packed else ''}negotiated")
        capacity = dev.config()["capacity"]
        qs: list[Any] = []
        try:
            for i in range(queues):
                qs.append(make_queue(dev, i, qd, BLOCK, write,
                                     sector_table(capacity, BLOCK, seed + i)))
            if variant.endswith(LOG_SUFFIX):
                dev.set_logging(True)
            drive(qs, WARMUP_S)
            cpu0, wait0 = cpu_seconds(proc.pid), runqueue_wait_seconds(proc.pid)
            res = drive(qs, seconds)
            cpu1, wait1 = cpu_seconds(proc.pid), runqueue_wait_seconds(proc.pid)
        finally:
            for q in qs:
                q.release()
    return {"ops": res.ops, "seconds": res.seconds, "backend_cpu_s": cpu1 - cpu0,
            "backend_wait_s": wait1 - wait0,
            "loadgen_cpu_s": res.loadgen_cpu_s, "kicks": res.kicks, "sleeps": res.sleeps,
            "batches": res.batches, "lat": res.latencies}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ops = sum(r["ops"] for r in runs)
    secs = sum(r["seconds"] for r in runs)
    lat = np.concatenate([r["lat"] for r in runs]) if runs else np.empty(0)
    cpu = sum(r["backend_cpu_s"] for r in runs)
    lg = sum(r["loadgen_cpu_s"] for r in runs)
    iops = ops / secs
    return {
        "iops": round(iops),
        "mb_s": round(iops * BLOCK / 1e6, 1),
        "p50_us": round(float(np.percentile(lat, 50)) * US, 1),
        "p99_us": round(float(np.percentile(lat, 99)) * US, 1),
        "p999_us": round(float(np.percentile(lat, 99.9)) * US, 1),
        "backend_cpu_us_per_io": round(cpu / ops * US, 2),
        "backend_cpu": round(cpu / secs, 2),
        # Runnable but waiting for a CPU (other jobs on the machine): cores it could have used.
        "backend_runqueue_wait": round(sum(r["backend_wait_s"] for r in runs) / secs, 2),
        "loadgen_cpu": round(lg / secs, 2),
        "loadgen_cpu_us_per_io": round(lg / ops * US, 2),
        "loadgen_saturated": lg / secs >= SATURATED,
        "kicks_per_io": round(sum(r["kicks"] for r in runs) / ops, 4),
        "interrupts_per_io": round(sum(r["sleeps"] for r in runs) / ops, 4),
        "ios_per_batch": round(ops / max(1, sum(r["batches"] for r in runs)), 1),
        "rounds": len(runs),
    }


# Backends compared when both ran: (a, b) and the key of a/b in each case.
PAIRS = ((BACKENDS, "ratio"), (NBD_BACKENDS, "ratio_nbd"), (NBD_CONNS, "ratio_conns"))


def with_rings(backends: list[str], rings: list[str]) -> list[str]:
    """The backends, then each one that has packed rings as BACKEND+packed when asked for."""
    packed = [b + PACKED_SUFFIX for b in backends if b not in SPLIT_ONLY]
    return (list(backends) if "split" in rings else []) + (
        packed if "packed" in rings else [])


def run_case(images: dict[str, str], storage: str, rw: str, qd: int, queues: int,
             seconds: float, rounds: int, backends: list[str],
             log_all: bool = False, rings: tuple[str, ...] = ("split",)) -> dict[str, Any]:
    base = with_rings(backends, list(rings))
    variants = base + [b + LOG_SUFFIX for b in base] if log_all else base
    case = _run_variants(images, storage, rw, qd, queues, seconds, rounds, variants)
    packed_ratios(case, backends)
    for b in base:
        if b + LOG_SUFFIX in case:
            on, off = case[b + LOG_SUFFIX], case[b]
            case.setdefault("ratio", {})[f"{b}_log_cpu_per_io"] = round(
                on["backend_cpu_us_per_io"] / off["backend_cpu_us_per_io"], 3)
            case["ratio"][f"{b}_log_iops"] = round(on["iops"] / off["iops"], 3)
    return case


def _run_variants(images: dict[str, str], storage: str, rw: str, qd: int, queues: int,
                  seconds: float, rounds: int, backends: list[str]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    for rnd in range(rounds):
        order = backends if rnd % 2 == 0 else backends[::-1]  # A B B A: no fixed position bias
        for b in order:
            runs[b].append(run_once(b, images[storage], rw, qd, queues, seconds, seed=rnd))
    case: dict[str, Any] = {"storage": storage, "rw": rw, "bs": BLOCK, "qd": qd,
                            "queues": queues}
    for b in backends:
        case[b] = summarize(runs[b])
    for pair, key in PAIRS:
        if set(pair) <= set(backends):
            case[key] = _ratio(case[pair[0]], case[pair[1]])
    return case


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    """a over b; None where b measured 0 (a short run's CPU can be below one clock tick)."""
    return {name: round(a[key] / b[key], 3) if b[key] else None
            for name, key in (("iops", "iops"), ("cpu_per_io", "backend_cpu_us_per_io"),
                              ("p99", "p99_us"), ("p999", "p999_us"))}


def packed_ratios(case: dict[str, Any], backends: list[str]) -> None:
    """``ratio_packed``: each packed variant over its split runs and over qsd's (split)."""
    for b in backends:
        packed = case.get(b + PACKED_SUFFIX)
        if packed is None:
            continue
        out = case.setdefault("ratio_packed", {})
        if b in case:
            out[f"{b}_packed_vs_split"] = _ratio(packed, case[b])
        peer = "qsd-nbd" if b.endswith("-nbd") else "qsd"
        if peer in case:
            out[f"{b}_packed_vs_{peer}"] = _ratio(packed, case[peer])


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version()}


def table(cases: list[dict[str, Any]], pair: tuple[str, str] = BACKENDS,
          key: str = "ratio") -> str:
    a, b = pair
    rows = [f"| storage | rw | qd | queues | {a} IOPS | {b} IOPS | IOPS ratio | {a} "
            f"CPU us/IO | {b} CPU us/IO | CPU/IO ratio | {a} p50/p99/p99.9 us | {b} "
            "p50/p99/p99.9 us "
            "| loadgen CPU (a/b) |", "|" + "---|" * 13]
    for c in cases:
        v, q, r = c[a], c[b], c[key]
        rows.append(
            f"| {c['storage']} | {c['rw']} | {c['qd']} | {c['queues']} | {v['iops']} | "
            f"{q['iops']} | {r['iops']} | {v['backend_cpu_us_per_io']} | "
            f"{q['backend_cpu_us_per_io']} | {r['cpu_per_io']} | {_pcts(v)} | {_pcts(q)} | "
            f"{v['loadgen_cpu']}/{q['loadgen_cpu']} |")
    return "\n".join(rows)


def _pcts(s: dict[str, Any]) -> str:
    return f"{s['p50_us']}/{s['p99_us']}/{s['p999_us']}"


def cores_table(cases: list[dict[str, Any]], backends: list[str]) -> str:
    """IOPS and backend cores (CPU seconds per wall second, workers included) per backend,
    with the cores' worth of time its processes waited runnable for a CPU."""
    rows = ["| storage | rw | qd | queues | " + " | ".join(
        f"{b} IOPS | {b} cores (+ runqueue wait)" for b in backends) + " |",
        "|" + "---|" * (4 + 2 * len(backends))]
    for c in cases:
        cells = " | ".join(f"{c[b]['iops']} | {c[b]['backend_cpu']} "
                           f"(+{c[b]['backend_runqueue_wait']})" for b in backends)
        rows.append(f"| {c['storage']} | {c['rw']} | {c['qd']} | {c['queues']} | {cells} |")
    return "\n".join(rows)


def ring_table(cases: list[dict[str, Any]], backend: str, peer: str) -> str:
    """Split vs packed (vhostmem) and the peer's split runs, per case."""
    p = backend + PACKED_SUFFIX
    rows = [f"| storage | rw | qd | queues | IOPS split / packed / {peer} | CPU us/IO split / "
            f"packed / {peer} | packed/split IOPS | packed/split CPU/IO | p99 us split / "
            f"packed / {peer} | loadgen CPU split / packed |", "|" + "---|" * 10]
    for c in cases:
        if p not in c or backend not in c:
            continue
        s, k, q = c[backend], c[p], c.get(peer, {})
        r = c["ratio_packed"][f"{backend}_packed_vs_split"]

        def qv(key: str, q: dict[str, Any] = q) -> Any:
            return q.get(key, "-")

        rows.append(
            f"| {c['storage']} | {c['rw']} | {c['qd']} | {c['queues']} | {s['iops']} / "
            f"{k['iops']} / {qv('iops')} | {s['backend_cpu_us_per_io']} / "
            f"{k['backend_cpu_us_per_io']} / {qv('backend_cpu_us_per_io')} | {r['iops']} | "
            f"{r['cpu_per_io']} | {s['p99_us']} / {k['p99_us']} / {qv('p99_us')} | "
            f"{s['loadgen_cpu']} / {k['loadgen_cpu']} |")
    return "\n".join(rows)


def log_table(cases: list[dict[str, Any]], backends: list[str]) -> str:
    rows = ["| storage | rw | qd | queues | backend | IOPS off/on | CPU us/IO off | CPU us/IO "
            "LOG_ALL on | CPU ratio | p99 us off/on |", "|" + "---|" * 10]
    for c in cases:
        for b in backends:
            off, on = c[b], c[b + LOG_SUFFIX]
            rows.append(
                f"| {c['storage']} | {c['rw']} | {c['qd']} | {c['queues']} | {b} | "
                f"{off['iops']}/{on['iops']} | {off['backend_cpu_us_per_io']} | "
                f"{on['backend_cpu_us_per_io']} | {c['ratio'][f'{b}_log_cpu_per_io']} | "
                f"{off['p99_us']}/{on['p99_us']} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset with short runs (CI)")
    ap.add_argument("--seconds", type=float, help="measured seconds per run")
    ap.add_argument("--rounds", type=int, help="A B rounds per case")
    ap.add_argument("--storage", help="comma list of shm,disk")
    ap.add_argument("--rw", help="comma list of randread,randwrite")
    ap.add_argument("--qd", help="comma list of queue depths (per queue)")
    ap.add_argument("--queues", help="comma list of queue counts")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--image-mib", type=int, default=IMAGE_MIB)
    ap.add_argument("--table", action="store_true", help="markdown table on stderr")
    ap.add_argument("--ring", default="split",
                    help="comma list of split,packed (packed: backends that have it)")
    ap.add_argument("--log-all", action="store_true",
                    help="also run every case with dirty logging on (live migration)")
    return ap.parse_args(argv)


def plan(args: argparse.Namespace) -> dict[str, Any]:
    p = dict(QUICK if args.quick else FULL)
    for key, conv in (("storage", str), ("rw", str), ("qd", int), ("queues", int)):
        val = getattr(args, key)
        if val:
            p[key] = [conv(x) for x in val.split(",")]
    if args.seconds:
        p["seconds"] = args.seconds
    if args.rounds:
        p["rounds"] = args.rounds
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    p = plan(args)
    backends = args.backends.split(",")
    rings = tuple(args.ring.split(","))
    if not rings or set(rings) - set(RINGS):
        raise SystemExit(f"--ring: choose from {RINGS}")
    t0 = time.monotonic()
    images = {s: make_image(s, args.image_mib) for s in p["storage"]}
    cases = []
    try:
        for storage in p["storage"]:
            for queues in p["queues"]:
                for rw in p["rw"]:
                    for qd in p["qd"]:
                        cases.append(run_case(images, storage, rw, qd, queues, p["seconds"],
                                              p["rounds"], backends, args.log_all, rings))
    finally:
        for path in images.values():
            os.unlink(path)
    out = {"bench": "blk", "mode": "quick" if args.quick else "full", "machine": machine(),
           "image_mib": args.image_mib, "seconds_per_run": p["seconds"],
           "rounds": p["rounds"], "warmup_s": WARMUP_S, "rings": list(rings), "cases": cases,
           "wall_s": round(time.monotonic() - t0, 1)}
    for pair, key in PAIRS:
        if args.table and set(pair) <= set(backends):
            print(table(cases, pair, key), file=sys.stderr)
    if args.table:
        print(cores_table(cases, backends), file=sys.stderr)
    if args.table and "split" in rings:
        for pair in (BACKENDS, NBD_BACKENDS):
            if "packed" in rings and set(pair) <= set(backends):
                print(ring_table(cases, *pair), file=sys.stderr)
    if args.table and args.log_all:
        print(log_table(cases, with_rings(backends, list(rings))), file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(argv), indent=1))


if __name__ == "__main__":
    main()
