"""Closed-loop random-I/O load generator on top of the frontend.

    python -m vhostmem.frontend.loadgen --socket /path/blk.sock --qd 128 --seconds 5

Keeps `qd` requests in flight: every completion batch is refilled with new requests and published
with one avail.idx store and at most one kick. Offsets come from a precomputed table, so the loop
does no random-number generation and no construct.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass

from vhostmem.frontend.blk import INDIRECT, MERGED, SECTOR_SIZE, STANDARD, BlkStatus, BlkType
from vhostmem.frontend.device import VhostUserBlk
from vhostmem.frontend.queue import BlkError, BlkQueue

LAYOUTS = {"standard": STANDARD, "merged": MERGED, "indirect": INDIRECT}
OFFSET_TABLE = 1 << 16
RAM_HEADROOM = 16 << 20


@dataclass
class LoadResult:
    ops: int
    seconds: float
    iops: float
    mib_per_s: float
    kicks: int
    qd: int
    block_size: int


def random_reads(q: BlkQueue, capacity_sectors: int, *, qd: int, seconds: float,
                 block_size: int = 4096, write: bool = False, layout=STANDARD,
                 seed: int = 1) -> LoadResult:
    """Random `block_size` reads (or writes) at queue depth `qd` for `seconds`."""
    per_block = block_size // SECTOR_SIZE
    rng = random.Random(seed)
    sectors = [rng.randrange(capacity_sectors // per_block) * per_block
               for _ in range(OFFSET_TABLE)]
    kind = BlkType.OUT if write else BlkType.IN
    payload = bytes(block_size) if write else None
    in_len = 0 if write else block_size
    mask, n, ops = OFFSET_TABLE - 1, 0, 0
    kicks0 = q.kicks
    for _ in range(qd):
        q.prepare(kind, sectors[n & mask], data=payload, in_len=in_len, layout=layout)
        n += 1
    q.notify()
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        done = q.wait()
        for req in done:
            if req.status != BlkStatus.OK:
                raise BlkError("load request", req.status)
        ops += len(done)
        if time.perf_counter() >= deadline:
            break
        for _ in done:
            q.prepare(kind, sectors[n & mask], data=payload, in_len=in_len, layout=layout)
            n += 1
        q.notify()
    elapsed = time.perf_counter() - start
    while q.in_flight:  # drain so the queue can be reused or stopped cleanly
        q.wait()
    return LoadResult(ops, elapsed, ops / elapsed, ops * block_size / elapsed / (1 << 20),
                      q.kicks - kicks0, qd, block_size)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="standard")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--no-event-idx", action="store_true")
    args = ap.parse_args(argv)
    ram = args.qd * (args.bs + 3 * 4096) + RAM_HEADROOM
    ram = (ram + RAM_HEADROOM - 1) // RAM_HEADROOM * RAM_HEADROOM
    with VhostUserBlk.open(args.socket, ram_size=ram, event_idx=not args.no_event_idx) as dev:
        q = dev.start_queue(0, size=args.queue_size, depth=args.qd, max_data=args.bs)
        result = random_reads(q, dev.config()["capacity"], qd=args.qd, seconds=args.seconds,
                              block_size=args.bs, write=args.write, layout=LAYOUTS[args.layout])
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
