"""Syscalls per request at queue depth 1 over NBD: vhostmem-nbd and qsd-nbd, same run.

    python bench/nbd_syscalls.py [--requests 3000] [--rw read,write]
    python bench/nbd_syscalls.py --cpu [--backends vhostmem-nbd,vhostmem,qsd-nbd,qsd]

Each backend (bench/peers.py: one qemu-nbd on a /dev/shm image, the backend on it) is
started fresh, `strace -f -c` is attached to all its threads, and the fake guest
(vhostmem.frontend) makes REQUESTS 4 KiB requests one at a time on one queue. Per backend and
kind: the backend's syscalls per request, by name (those made at least once per ten
requests). No times: strace slows every call (blk_bench.py measures IOPS and CPU). Order per
kind: vhostmem-nbd, qsd-nbd, then the other way round for the next kind. Prints one JSON
object.

``--cpu``: no strace; instead the backend's user and system CPU per request (utime and stime
deltas from /proc/PID/stat over the requests, after 200 writes of warm-up), for the backends
given (the file backends too: what the NBD path adds to a request at depth 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import peers
from bench.blk_bench import machine, make_image
from vhostmem.frontend import VhostUserBlk

BLOCK = 4096
GUEST_RAM = 64 << 20
IMAGE_MIB = 64
STRACE_ATTACH_S = 0.5  # strace -p needs a moment before it sees every thread's calls
SPREAD_SECTORS = 100_000  # requests walk the image, 8 sectors apart


WARMUP_WRITES = 200


def cpu_split(pid: int) -> tuple[float, float]:
    """utime, stime of ``pid`` in seconds (bench/peers.py reads their sum)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    after = peers.UTIME_AFTER_COMM
    return int(fields[after]) / peers.CLK_TCK, int(fields[after + 1]) / peers.CLK_TCK


def drive(sock: str, requests: int, rw: str, pid: int | None = None) -> dict[str, float]:
    """QD1 requests; with ``pid``, that process's user and system CPU per request (us)."""
    with VhostUserBlk.open(sock, ram_size=GUEST_RAM) as dev:
        q = dev.start_queue(0, size=128, depth=1)
        data = b"x" * BLOCK
        for i in range(WARMUP_WRITES if pid is not None else 0):
            q.write((i * 8) % SPREAD_SECTORS, data)
        before = cpu_split(pid) if pid is not None else (0.0, 0.0)
        for i in range(requests):
            sector = (i * 8) % SPREAD_SECTORS
            if rw == "read":
                q.read(sector, BLOCK)
            else:
                q.write(sector, data)
        if pid is None:
            return {}
        after = cpu_split(pid)
        return {"user_us": round((after[0] - before[0]) / requests * 1e6, 1),
                "sys_us": round((after[1] - before[1]) / requests * 1e6, 1)}


def parse_strace_summary(text: str) -> dict[str, int]:
    """``strace -c``'s table: calls per syscall name."""
    calls = {}
    for line in text.splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    return calls


def measure(name: str, image: str, requests: int, rw: str) -> dict[str, Any]:
    with peers.running(name, image, 1) as (proc, sock), \
            tempfile.NamedTemporaryFile(prefix="nbd-syscalls-", suffix=".txt") as out:
        threads = [arg for tid in os.listdir(f"/proc/{proc.pid}/task") for arg in ("-p", tid)]
        tracer = subprocess.Popen(["strace", "-f", "-c", "-o", out.name, *threads],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(STRACE_ATTACH_S)
        drive(sock, requests, rw)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        calls = parse_strace_summary(Path(out.name).read_text())
    per = {k: round(v / requests, 2) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])
           if v >= requests // 10}
    return {"per_request": per, "total_per_request": round(sum(calls.values()) / requests, 2)}


def measure_cpu(name: str, image: str, requests: int, rw: str) -> dict[str, Any]:
    with peers.running(name, image, 1) as (proc, sock):
        return drive(sock, requests, rw, proc.pid)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rw", default="read,write")
    ap.add_argument("--cpu", action="store_true", help="CPU per request instead of syscalls")
    ap.add_argument("--backends", help="comma list (default: vhostmem-nbd,qsd-nbd)")
    args = ap.parse_args(argv)
    if not args.cpu and shutil.which("strace") is None:
        sys.exit("strace is not installed")
    backends = tuple(args.backends.split(",")) if args.backends else peers.NBD_BACKENDS
    run = measure_cpu if args.cpu else measure
    image = make_image("shm", IMAGE_MIB)
    results: dict[str, Any] = {}
    try:
        for i, rw in enumerate(args.rw.split(",")):
            order = backends if i % 2 == 0 else backends[::-1]
            for name in order:
                results[f"{name} {rw}"] = run(name, image, args.requests, rw)
    finally:
        os.unlink(image)
    print(json.dumps({"bench": "nbd_syscalls", "machine": machine(),
                      "requests": args.requests, "results": results}, indent=1))


if __name__ == "__main__":
    main()
