"""Registration of a real 16 GiB memfd guest region, end to end.

    python bench/region_bench.py [--gib 16] [--reps 5]

Times ``GuestMemory.add_region`` on a fresh registry: mmap of the memfd (MAP_SHARED |
MAP_NORESERVE), registration in the MemRegistry, the notify callback filling the gpa map; then a
translate at both ends of the region (proves the map is filled) and ``remove_region``. A bare
mmap + munmap of the same fd is timed too, to show what the kernel part costs. No page is
touched, so the memfd stays unpopulated. Prints one JSON object (medians over ``reps``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vhostmem.guest_memory import GuestMemory
from vhostmem.memmap import MemRegistry

GIB = 1 << 30
GPA = 4 * GIB  # above the PCI hole, like QEMU's high RAM
UADDR = 0x7F00_0000_0000  # the frontend's virtual address (only recorded)
PAGE = 4096
MS = 1e3
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def _memfd(size: int) -> int:
    """Guest RAM as QEMU's memory-backend-memfd makes it: sized, then sealed against resizing."""
    fd = os.memfd_create("vhostmem-region-bench", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def one_rep(size: int) -> dict[str, float]:
    src = _memfd(size)
    try:
        t0 = time.perf_counter()
        mm = mmap.mmap(src, size, flags=mmap.MAP_SHARED | MAP_NORESERVE)
        mm.close()
        bare = time.perf_counter() - t0
        mem = GuestMemory(MemRegistry())
        try:
            fd = os.dup(src)  # add_region owns (and closes) its fd
            t0 = time.perf_counter()
            mem.add_region(GPA, size, UADDR, 0, fd)
            add = time.perf_counter() - t0
            t0 = time.perf_counter()
            first = mem.translate(GPA, PAGE)
            last = mem.translate(GPA + size - PAGE, PAGE)
            translate = time.perf_counter() - t0
            if len(first) != 1 or len(last) != 1 or len(last[0]) != PAGE:
                raise RuntimeError("the registered region does not translate")
            first[0].release()
            last[0].release()
            t0 = time.perf_counter()
            mem.remove_region(GPA, size, UADDR)
            remove = time.perf_counter() - t0
        finally:
            mem.close()
    finally:
        os.close(src)
    return {"add_region_ms": add * MS, "remove_region_ms": remove * MS,
            "translate_2_ms": translate * MS, "bare_mmap_munmap_ms": bare * MS}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    size = args.gib * GIB
    reps = [one_rep(size) for _ in range(args.reps)]
    med = {k: round(statistics.median(r[k] for r in reps), 3) for k in reps[0]}
    return {"bench": "region", "region_gib": args.gib, "reps": args.reps, **med,
            "add_region_ms_per_gib": round(med["add_region_ms"] / args.gib, 4),
            "remove_region_ms_per_gib": round(med["remove_region_ms"] / args.gib, 4),
            "add_region_min_ms": round(min(r["add_region_ms"] for r in reps), 3)}


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(argv), indent=1))


if __name__ == "__main__":
    main()
