"""A driver that submits virtio-blk requests through a real ring to a BlkDevice."""

from __future__ import annotations

import itertools
import os
import struct

from tests.vhostmem.ringhelpers import ALL_RING_FEATURES, Buf, DriverRing, GuestRam
from vhostmem.devices.blk import BlkDevice
from vhostmem.guest_memory import GuestMemory
from vhostmem.memmap import MemRegistry
from vhostmem.virtqueue import Virtqueue

HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")
STATUS_UNWRITTEN = 0xAA  # what the driver puts in the status byte before submitting

# Descriptor layouts of a request: where header, payload and status are split.
LAYOUTS = ("3", "2", "many", "indirect")


class BlkDriver:
    """Guest RAM + one ring per device queue; submit requests, run the device, read results."""

    def __init__(
        self,
        device: BlkDevice,
        num: int = 64,
        features: int = ALL_RING_FEATURES,
        ram_size: int = 8 << 20,
    ) -> None:
        self.device = device
        self.ram = GuestRam(ram_size)
        self.mem = GuestMemory(MemRegistry())
        self.ram.add_to(self.mem)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.queues: list[Virtqueue] = []
        self.rings: list[DriverRing] = []
        device.set_features(device.features())
        for i in range(device.num_queues):
            vq = Virtqueue(i, self.mem)
            vq.set_call_fd(os.dup(self.call))
            ring = DriverRing(self.ram, num)
            ring.attach(vq, features)
            self.queues.append(vq)
            self.rings.append(ring)
        self.pending: dict[tuple[int, int], int] = {}  # (queue, head) -> status gpa

    def close(self) -> None:
        for vq in self.queues:
            vq.close()
        self.mem.close()
        self.ram.close()
        os.close(self.call)

    def buffer(self, data: bytes | int) -> int:
        """A guest buffer holding ``data`` (or that many 0xEE bytes)."""
        if isinstance(data, int):
            data = b"\xee" * data
        gpa = self.ram.alloc(max(len(data), 1))
        self.ram.write(gpa, data)
        return gpa

    def submit(
        self,
        rtype: int,
        sector: int = 0,
        *,
        payload: bytes = b"",
        read_len: int = 0,
        layout: str = "3",
        queue: int = 0,
    ) -> tuple[int, int, int]:
        """Queue one request; returns (head, data-in gpa, status gpa)."""
        header = HEADER.pack(rtype, 0, sector)
        status = self.buffer(bytes([STATUS_UNWRITTEN]))
        data_in = self.buffer(read_len) if read_len else 0
        bufs: list[Buf]
        if layout == "2":  # header+payload in one, data-in+status in one
            hp = self.buffer(header + payload)
            both = self.buffer(read_len + 1)
            data_in, status = both, both + read_len
            bufs = [(hp, len(header) + len(payload), False), (both, read_len + 1, True)]
        else:
            bufs = [(self.buffer(header[:8]), 8, False), (self.buffer(header[8:]), 8, False)]
            if layout != "many":
                bufs = [(self.buffer(header), 16, False)]
            bufs += _pieces(self, payload, layout == "many", writable=False)
            if read_len:
                bufs += _pieces_in(data_in, read_len, layout == "many")
            bufs.append((status, 1, True))
        head = self.rings[queue].add(bufs, indirect=layout == "indirect")
        self.pending[(queue, head)] = status
        return head, data_in, status

    def run(self, queue: int = 0) -> dict[int, tuple[int, int]]:
        """Let the device serve the queue; returns head -> (status byte, used len)."""
        self.device.handle_queue(self.queues[queue])
        assert self.queues[queue].wait_idle(10), "requests still in flight"  # io_mode="thread"
        out = {}
        for head, used_len in self.rings[queue].take_used():
            status = self.pending.pop((queue, head))
            out[head] = (self.ram.read(status, 1)[0], used_len)
        return out

    def one(self, rtype: int, sector: int = 0, **kw: object) -> tuple[int, int, int]:
        """Submit, run; returns (status, used len, data-in gpa)."""
        head, data_in, _ = self.submit(rtype, sector, **kw)  # type: ignore[arg-type]
        status, used = self.run(kw.get("queue", 0))[head]  # type: ignore[arg-type]
        return status, used, data_in


def _pieces(drv: BlkDriver, payload: bytes, split: bool, writable: bool) -> list[Buf]:
    if not payload:
        return []
    if not split:
        return [(drv.buffer(payload), len(payload), writable)]
    cut = [0, 1, len(payload) // 2, len(payload)]
    return [
        (drv.buffer(payload[a:b]), b - a, writable) for a, b in itertools.pairwise(cut) if b > a
    ]


def _pieces_in(gpa: int, length: int, split: bool) -> list[Buf]:
    if not split:
        return [(gpa, length, True)]
    cut = [0, 7, length // 2, length]
    return [(gpa + a, b - a, True) for a, b in itertools.pairwise(cut) if b > a]


def segments(*segs: tuple[int, int, int]) -> bytes:
    return b"".join(SEGMENT.pack(*s) for s in segs)
