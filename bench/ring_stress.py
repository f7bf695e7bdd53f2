"""Many short closed-loop runs on fresh connections, to catch rare ring stalls.

    python bench/ring_stress.py [--runs 400] [--qd 32] [--seconds 0.5] [--backend vhostmem qsd]

Each run connects to the backend, starts a 256-entry queue with EVENT_IDX, keeps `qd` random
4 KiB reads in flight for `seconds` (the load of `test_full_ring_under_load`), drains and
disconnects. A run whose wait times out is a stall: the loop stops there for that backend, since
the connection's queue may be broken. Prints one JSON object: per backend the runs done, the
stalls (0 or 1), the seconds taken and the first stall's message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.blk_bench import make_image
from bench.peers import BACKENDS, running
from vhostmem.frontend import VhostUserBlk
from vhostmem.frontend.loadgen import random_reads

QUEUE_SIZE = 256
BLOCK = 4096
IMAGE_MIB = 64


def stress(backend: str, image: str, runs: int, qd: int, seconds: float) -> dict[str, Any]:
    done, stall = 0, None
    start = time.monotonic()
    with running(backend, image, 1) as (_proc, sock):
        for run in range(runs):
            with VhostUserBlk.open(sock) as dev:
                q = dev.start_queue(0, size=QUEUE_SIZE, depth=qd, max_data=BLOCK)
                try:
                    random_reads(q, dev.config()["capacity"], qd=qd, seconds=seconds,
                                 seed=run + 1)
                except TimeoutError as exc:
                    stall = f"run {run}: {type(exc).__name__}: {exc}"
                    break
            done += 1
    return {"runs": done, "stalls": int(stall is not None),
            "seconds": round(time.monotonic() - start, 1), "first_stall": stall}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--backend", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    args = ap.parse_args(argv)
    image = make_image("shm", IMAGE_MIB)
    try:
        out = {b: stress(b, image, args.runs, args.qd, args.seconds) for b in args.backend}
    finally:
        os.unlink(image)
    print(json.dumps({"queue_size": QUEUE_SIZE, "qd": args.qd, "seconds_per_run": args.seconds,
                      "backends": out}, indent=2))


if __name__ == "__main__":
    main()
