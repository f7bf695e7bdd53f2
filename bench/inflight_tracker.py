"""The packed inflight tracker alone (vhostmem/inflight_packed.py) of two source trees, A/B.

    python bench/inflight_tracker.py --a /tmp/base --b . [--rounds 3] [--number 100000]

In a process of its own per slot (slot order A B B A per round), with that tree first on
sys.path: a 256-entry packed region on a real memfd, recovered fresh, then ``timeit`` (min of 7
repeats of ``--number`` calls) of one ``fetched`` + ``completing`` + ``completed`` of a chain of
1 and of 3 descriptors (the blk request shape), the only work between them the ring's own.
Prints one JSON object: ns per fetch + completion per slot, and per side the median of the
slots' values with their min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.blk_bench import machine

QUEUE_SIZE = 256
# Runs in the slot's process: argv[1] the tree, argv[2] calls per repeat, argv[3] queue size.
SLOT = r"""
import json, sys, timeit
tree, number, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, tree)
import vhostmem
from vhostmem.inflight import InflightRegion, create_inflight_fd
from vhostmem.inflight_packed import PACKED_LAYOUT
fd, p = create_inflight_fd(1, size, layout=PACKED_LAYOUT)
region = InflightRegion.attach(fd, p["mmap_size"], 0, 1, size, layout=PACKED_LAYOUT)
q = region.queue(0)
q.recover(size, 0, 1, lambda i: 0)
# addr, len, id, flags as the ring's walk hands them over: header, data, status.
chain = [(0x1000, 16, 5, 0x81), (0x2000, 4096, 5, 0x83), (0x3000, 1, 5, 0x82)]
out = {"imported": vhostmem.__file__}
for n in (1, 3):
    descs = chain[:n]
    def one():
        q.fetched(5, descs)
        q.completed(q.completing(5, n, 1))
    best = min(timeit.repeat(one, number=number, repeat=7))
    out[f"desc{n}_ns"] = round(best / number * 1e9, 1)
region.close()
print(json.dumps(out))
"""
KEYS = ("desc1_ns", "desc3_ns")


def slot(tree: Path, number: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", SLOT, str(tree), str(number),
                          str(QUEUE_SIZE)], cwd=tree,
                         env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True,
                         text=True, check=True).stdout
    res: dict[str, Any] = json.loads(out)
    if not res["imported"].startswith(str(tree) + os.sep):
        raise RuntimeError(f"slot for {tree} imported {res['imported']}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, required=True)
    ap.add_argument("--b", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--number", type=int, default=100_000)
    a = ap.parse_args()
    trees = {"A": a.a.resolve(), "B": a.b.resolve()}
    t0 = time.monotonic()
    runs = []
    for rnd in range(a.rounds):
        for side in ("A", "B", "B", "A"):
            runs.append({"round": rnd, "side": side} | slot(trees[side], a.number))
    summary: dict[str, Any] = {}
    for side in ("A", "B"):
        summary[side] = {}
        for k in KEYS:
            vals = [r[k] for r in runs if r["side"] == side]
            summary[side][k] = {"median": statistics.median(vals), "min": min(vals),
                                "max": max(vals)}
    summary["b_vs_a_pct"] = {
        k: round((summary["B"][k]["median"] - summary["A"][k]["median"])
                 / summary["A"][k]["median"] * 100, 1) for k in KEYS}
    print(json.dumps({"bench": "inflight_tracker", "machine": machine(), "argv": sys.argv[1:],
                      "trees": {k: str(t) for k, t in trees.items()}, "runs": runs,
                      "summary": summary, "wall_s": round(time.monotonic() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
