"""atheris fuzz target for the message handler: Framer + Session + virtqueues + blk, in-process.

    .venv/bin/python tests/fuzz/fuzz_session.py -runs=200000 [corpus_dir ...]

Input: ``u16 image length``, that many bytes of guest-memory image (copied to offset 0 of every
memfd sent), then chunks: ``control byte, length byte, data``. Control bits 0-1: fds sent with the
chunk (real memfds of MEMFD_SIZE bytes when bit 2 is set, else eventfds); bit 3: after the chunk
fire every watched kick (the rings then run over the fuzzed guest memory).

A ProtocolError or SessionError is the server's "disconnect": framer closed, session reset. Any
other exception is a finding, as are (checked after every input) a registration left in the
MemRegistry, an mmap still pending, a fd more than at start, a guest memfd still mapped (every
MAPS_EVERY runs) and, with VHOSTMEM_DEBUG_BOUNDS on, any view outside its region.
Without corpus arguments a seed corpus (a full valid session doing one read) is written to a
temporary directory and used.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

FD_BITS = 0x3
MEMFD_BIT = 0x4
KICK_BIT = 0x8
MEMFD_SIZE = 64 << 10
IMAGE_LEN = struct.Struct("<H")
MAPS_EVERY = 1000
RAM_DISK = 1 << 20
NUM_QUEUES = 2


class Watcher:
    """KickWatcher over a dict: the fuzzer fires the callbacks itself."""

    def __init__(self) -> None:
        self.callbacks: dict[int, Callable[[], None]] = {}

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self.callbacks[fd] = callback

    def unwatch(self, fd: int) -> None:
        self.callbacks.pop(fd, None)


def parse(data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    if len(data) < IMAGE_LEN.size:
        return b"", []
    (n,) = IMAGE_LEN.unpack_from(data)
    image = data[2 : 2 + min(n, MEMFD_SIZE)]
    pos = 2 + len(image)
    chunks = []
    while pos + 2 <= len(data):
        control, length = data[pos], data[pos + 1]
        chunks.append((control, data[pos + 2 : pos + 2 + length]))
        pos += 2 + length
    return image, chunks


def make_fds(control: int, image: bytes) -> list[int]:
    fds = []
    for _ in range(control & FD_BITS):
        if control & MEMFD_BIT:
            fd = os.memfd_create("fuzz-guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(fd, MEMFD_SIZE)
            os.pwrite(fd, image, 0)
        else:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        fds.append(fd)
    return fds


def memfd_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("fuzz-guest-ram" in line for line in f)


# ------------------------------------------------------------------------------ seeds

U = 0x7000_0000_0000
NUM = 8
DESC_GPA, AVAIL_GPA, USED_GPA = 0x0, 0x80, 0x100
HEADER_GPA, DATA_GPA, STATUS_GPA = 0x200, 0x400, 0x600


def seed_image() -> bytes:
    img = bytearray(STATUS_GPA + 1)
    desc = struct.Struct("<QIHH")
    desc.pack_into(img, DESC_GPA, HEADER_GPA, 16, 1, 1)
    desc.pack_into(img, DESC_GPA + 16, DATA_GPA, 512, 3, 2)
    desc.pack_into(img, DESC_GPA + 32, STATUS_GPA, 1, 2, 0)
    struct.pack_into("<HHH", img, AVAIL_GPA, 0, 1, 0)  # flags, idx 1, ring[0] = head 0
    struct.pack_into("<IIQ", img, HEADER_GPA, 0, 0, 0)  # read sector 0
    img[STATUS_GPA] = 0xFF
    return bytes(img)


def seed_session(indirect_table: bool = False) -> bytes:
    from protocol import FrontendRequest as R
    from protocol import encode_request

    features = (1 << 32) | (1 << 30) | (1 << 28) | (1 << 29)
    region = {"guest_phys_addr": 0, "memory_size": MEMFD_SIZE, "userspace_addr": U,
              "mmap_offset": 0}
    msgs: list[tuple[bytes, int, int]] = [  # bytes, fd count, control extra bits
        (encode_request(R.SET_OWNER), 0, 0),
        (encode_request(R.SET_FEATURES, features), 0, 0),
        (encode_request(R.SET_PROTOCOL_FEATURES, (1 << 3) | (1 << 15)), 0, 0),
        (encode_request(R.SET_MEM_TABLE, {"regions": [region]}, need_reply=True, fds_count=1),
         1, MEMFD_BIT),
        (encode_request(R.SET_VRING_NUM, {"index": 0, "num": NUM}, need_reply=True), 0, 0),
        (encode_request(R.SET_VRING_ADDR, {"index": 0, "flags": 0, "desc_user_addr": U,
                                           "used_user_addr": U + USED_GPA,
                                           "avail_user_addr": U + AVAIL_GPA,
                                           "log_guest_addr": 0}, need_reply=True), 0, 0),
        (encode_request(R.SET_VRING_CALL, {"index": 0, "nofd": False}, fds_count=1), 1, 0),
        (encode_request(R.SET_VRING_KICK, {"index": 0, "nofd": False}, fds_count=1), 1, 0),
        (encode_request(R.SET_VRING_ENABLE, {"index": 0, "num": 1}), 0, KICK_BIT),
    ]
    image = seed_image()
    out = bytearray(IMAGE_LEN.pack(len(image)) + image)
    for data, nfds, extra in msgs:
        out += bytes([nfds | extra, len(data)]) + data
    return bytes(out)


def seed_corpus() -> str:
    path = tempfile.mkdtemp(prefix="fuzz-session-seeds-")
    Path(path, "session").write_bytes(seed_session())
    return path


# ------------------------------------------------------------------------------- main


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ["VHOSTMEM_DEBUG_BOUNDS"] = "1"
    import logging

    import atheris

    logging.disable(logging.CRITICAL)  # rejections are expected; findings raise
    with atheris.instrument_imports():
        from protocol import Framer, ProtocolError
        from vhostmem.devices.blk import BlkDevice
        from vhostmem.memmap import MemRegistry
        from vhostmem.session import Session, SessionError

    registry = MemRegistry()
    device = BlkDevice.from_ram(RAM_DISK, num_queues=NUM_QUEUES)
    watcher = Watcher()
    session = Session(device, registry, watcher, name="fuzz")
    baseline_fds = len(os.listdir("/proc/self/fd"))
    runs = 0

    def disconnect(framer: Framer) -> None:
        framer.close()
        session.reset()
        watcher.callbacks.clear()

    def one_input(data: bytes) -> None:
        nonlocal runs
        image, chunks = parse(data)
        framer = Framer(sender="frontend")
        try:
            for control, chunk in chunks:
                try:
                    for msg in framer.feed(chunk, make_fds(control, image)):
                        session.handle(msg)
                except (ProtocolError, SessionError):
                    disconnect(framer)
                    framer = Framer(sender="frontend")
                    continue
                if control & KICK_BIT:
                    for callback in list(watcher.callbacks.values()):
                        callback()
        finally:
            disconnect(framer)
        runs += 1
        assert registry.chunks() == [], f"registrations left: {registry.chunks()}"
        assert session.memory.pending_unmaps == 0, "guest mmaps still pinned after reset"
        now = len(os.listdir("/proc/self/fd"))
        assert now == baseline_fds, f"fd leak: {now - baseline_fds} fds"
        if runs % MAPS_EVERY == 0:
            assert memfd_mappings() == 0, "guest memfds still mapped"

    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        argv.append(seed_corpus())
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
