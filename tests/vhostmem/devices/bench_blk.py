"""Micro-benchmark: 4 KiB reads from a RAM disk through one virtqueue, one thread.

    .venv/bin/python -m tests.vhostmem.devices.bench_blk [--seconds 3] [--layout direct|indirect]
        [--io-mode inline|thread] [--ring split|packed]

The driver side re-publishes the same request chains after each batch (cheap u16 writes on a
split ring; on a packed ring each chain's descriptors are written again at the avail position),
and only the device's ``handle_queue`` is timed.
"""

from __future__ import annotations

import argparse
import time

from tests.vhostmem.devices.blkenv import HEADER
from tests.vhostmem.ringhelpers import GPA_BASE, DriverRing, GuestRam, PackedDriver
from vhostmem.devices import BlkDevice, ram_disk
from vhostmem.devices.blk import VIRTIO_BLK_T_IN
from vhostmem.guest_memory import GuestMemory
from vhostmem.memmap import MemRegistry
from vhostmem.virtqueue import Virtqueue

READ_SIZE = 4096
QUEUE_SIZE = 256
DISK_SIZE = 64 << 20


Bench = tuple[BlkDevice, Virtqueue, DriverRing, list[int], GuestRam]


def build(layout: str, io_mode: str) -> Bench:
    ram = GuestRam(32 << 20)
    mem = GuestMemory(MemRegistry())
    ram.add_to(mem)
    dev = BlkDevice(ram_disk(DISK_SIZE), queue_size=QUEUE_SIZE, io_mode=io_mode)
    dev.set_features(dev.features())
    vq = Virtqueue(0, mem)
    ring = DriverRing(ram, QUEUE_SIZE)
    ring.attach(vq)
    per_chain = 1 if layout == "indirect" else 3
    heads = []
    for n in range(QUEUE_SIZE // per_chain):
        hdr = ram.alloc(16)
        ram.write(hdr, HEADER.pack(VIRTIO_BLK_T_IN, 0, (n * 8) % (DISK_SIZE // 512)))
        data = ram.alloc(READ_SIZE, 4096)
        status = ram.alloc(1)
        bufs = [(hdr, 16, False), (data, READ_SIZE, True), (status, 1, True)]
        heads.append(ring.add(bufs, indirect=layout == "indirect"))
    return dev, vq, ring, heads, ram


PackedBench = tuple[BlkDevice, Virtqueue, PackedDriver, list[list[tuple[int, int, bool]]],
                    GuestRam]


def build_packed(layout: str, io_mode: str) -> PackedBench:
    """``build`` on a packed ring: the same requests, buffer id = chain number; the chains are
    made available by :func:`republish_packed`."""
    ram = GuestRam(32 << 20)
    mem = GuestMemory(MemRegistry())
    ram.add_to(mem)
    dev = BlkDevice(ram_disk(DISK_SIZE), queue_size=QUEUE_SIZE, io_mode=io_mode)
    dev.set_features(dev.features())
    vq = Virtqueue(0, mem)
    ring = PackedDriver(ram, QUEUE_SIZE)
    ring.counts = {}
    ring.attach(vq)
    chains = []
    for n in range(QUEUE_SIZE // (1 if layout == "indirect" else 3)):
        hdr = ram.alloc(16)
        ram.write(hdr, HEADER.pack(VIRTIO_BLK_T_IN, 0, (n * 8) % (DISK_SIZE // 512)))
        chains.append([(hdr, 16, False), (ram.alloc(READ_SIZE, 4096), READ_SIZE, True),
                       (ram.alloc(1), 1, True)])
    return dev, vq, ring, chains, ram


def republish_packed(ring: PackedDriver, chains: list[list[tuple[int, int, bool]]],
                     indirect: bool) -> None:
    """The driver gives the same buffers back: each chain's descriptors written again."""
    for n, bufs in enumerate(chains):
        if indirect:
            ring.add_indirect(n, bufs)
        else:
            ring.add(n, bufs)


def run_packed(seconds: float, layout: str, io_mode: str = "inline") -> float:
    """``run`` on a packed ring."""
    dev, vq, ring, chains, ram = build_packed(layout, io_mode)
    done = 0
    busy = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        republish_packed(ring, chains, layout == "indirect")
        t0 = time.perf_counter()
        vq.new_turn()
        dev.handle_queue(vq)
        vq.wait_idle()
        busy += time.perf_counter() - t0
        done += len(chains)
    vq.close()
    dev.close()
    ram.close()
    return done / busy


def run(seconds: float, layout: str, io_mode: str = "inline") -> float:
    dev, vq, ring, heads, ram = build(layout, io_mode)
    avail = memoryview(ram.mm)[ring.avail - GPA_BASE :][: 4 + 2 * QUEUE_SIZE].cast("H")
    done = 0
    busy = 0.0
    idx = ring.avail_idx
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        vq.new_turn()  # what the session does per kick
        dev.handle_queue(vq)
        vq.wait_idle()
        busy += time.perf_counter() - t0
        done += len(heads)
        for h in heads:  # the driver gives the same chains back
            avail[2 + idx % QUEUE_SIZE] = h
            idx = (idx + 1) & 0xFFFF
        avail[1] = idx
    avail.release()
    vq.close()
    dev.close()
    ram.close()
    return done / busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--layout", choices=("direct", "indirect"), default="direct")
    parser.add_argument("--io-mode", choices=("inline", "thread"), default="inline")
    parser.add_argument("--ring", choices=("split", "packed"), default="split")
    args = parser.parse_args()
    rate = (run_packed if args.ring == "packed" else run)(args.seconds, args.layout, args.io_mode)
    print(
        f"4 KiB reads, RAM disk, {args.ring} ring, {args.layout} chains, "
        f"io_mode={args.io_mode}: {rate:,.0f} requests/s"
    )


if __name__ == "__main__":
    main()
