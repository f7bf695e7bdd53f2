"""vhost-user-blk (virtio 1.2 section 5.2) over a :class:`BlkBackend`.

I/O policy (measured with ``tests/vhostmem/devices/bench_blk.py``): by default requests are
served **inline** on the thread that handles the kick (``io_mode="inline"``), a batch of
available chains at a time (blk_inline.py). A request is one
``preadv``/``pwritev`` straight between the backend fd and guest memory; on a RAM disk or a
page-cached image that is a kernel memcpy of a few microseconds, while handing it to a pool
(queue, wake-up, GIL hand-over, completion under a lock) costs several times that: 4 KiB reads
from a RAM disk on one queue run at ~200k requests/s inline and ~50k through the pool. So inline
is the choice for RAM disks and cached images; its price is that a slow disk (cold reads,
fdatasync) holds the event loop for that long. ``io_mode="thread"`` is for images on slow
storage: chains are popped on the kick thread and served by ``io_threads`` worker threads (the
GIL is released during the syscalls), each completed with ``Virtqueue.complete`` (thread-safe
push_used + notify); ``Virtqueue.stop`` waits for requests in flight, so GET_VRING_BASE still
reports a settled ring.

Request layout (any descriptor split is accepted): 16 readable header bytes
(type u32, reserved u32, sector u64), then the payload, then one writable status byte at the very
end. A chain that has no writable byte at all is completed with length 0; every other malformed
request gets VIRTIO_BLK_S_IOERR. The used length is the number of bytes written into the chain.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from time import monotonic_ns
from typing import Any

from vhostmem.device import (
    RING_FEATURES,
    VHOST_USER_PROTOCOL_F_CONFIG,
    VHOST_USER_PROTOCOL_F_MQ,
    DeviceConfigError,
    VhostUserDevice,
)
from vhostmem.devices.blk_backend import BlkBackend, open_image, ram_disk
from vhostmem.signals import block_in_this_thread
from vhostmem.virtqueue import DescChain, Virtqueue

log = logging.getLogger(__name__)

# Feature bits (5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
# Request types (5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
# Status byte values.
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
# Discard / write-zeroes segment flags.
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

SECTOR_SIZE = 512
SECTOR_SHIFT = 9
VIRTIO_BLK_ID_BYTES = 20
REQ_HEADER = struct.Struct("<IIQ")
DWZ_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
MAX_QUEUES = 16
DEFAULT_QUEUE_SIZE = 1024
# Data segments per request (config seg_max). Linux builds indirect tables of seg_max + 2
# descriptors (header and status) whatever the queue size, so the queues accept indirect tables
# that long even when the frontend chose a smaller ring (QEMU's queue-size may be as low as 2).
DEFAULT_SEG_MAX = 126
DEFAULT_SIZE_MAX = 1 << 20
MAX_DWZ_SECTORS = 1 << 22  # 2 GiB per discard / write-zeroes request
MAX_DWZ_SEGMENTS = 16

# virtio_blk_config field offsets (5.2.4).
CFG_CAPACITY = 0
CFG_SIZE_MAX = 8
CFG_SEG_MAX = 12
CFG_BLK_SIZE = 20
CFG_PHYS_BLOCK_EXP = 24
CFG_MIN_IO_SIZE = 26
CFG_OPT_IO_SIZE = 28
CFG_WRITEBACK = 32
CFG_NUM_QUEUES = 34
CFG_MAX_DISCARD_SECTORS = 36
CFG_MAX_DISCARD_SEG = 40
CFG_DISCARD_ALIGNMENT = 44
CFG_MAX_WZ_SECTORS = 48
CFG_MAX_WZ_SEG = 52
CFG_WZ_MAY_UNMAP = 56
CONFIG_SIZE = 60  # up to (not including) the secure-erase fields
# Largest config space read answered (zeros past the layout).
CONFIG_SPACE_LIMIT = 256
IO_MODES = ("inline", "thread")
DEFAULT_IO_THREADS = 4
# A turn's statistics tally (serve's second argument): what the hot path (a read) leaves out.
TALLY_WRITE_BYTES = 0
TALLY_ERRORS = 1
TALLY_NO_STATUS = 2


# The turn functions of the asynchronous and inline paths live in modules that import this
# one, so they are bound on the first turn, not imported at the top. Once: an import
# statement in handle_queue costs about 1 us per kick (the import machinery's lookups).
ASYNC_TURN, INLINE_TURN = 0, 1
_TURNS: list[Callable[[BlkDevice, Virtqueue], None]] = []


def _bind_turns() -> list[Callable[[BlkDevice, Virtqueue], None]]:
    from vhostmem.devices.blk_async import handle_queue_async
    from vhostmem.devices.blk_inline import serve_turn

    _TURNS[:] = [handle_queue_async, serve_turn]
    return _TURNS


class BlkDevice(VhostUserDevice):
    """A virtio block device serving ``backend``."""

    # A request with a buffer outside guest memory fails with IOERR in its status byte.
    failed_request_status = bytes([VIRTIO_BLK_S_IOERR])

    def __init__(
        self,
        backend: BlkBackend,
        *,
        num_queues: int = 1,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        serial: str = "vhostmem",
        blk_size: int = SECTOR_SIZE,
        seg_max: int = DEFAULT_SEG_MAX,
        io_mode: str = "inline",
        io_threads: int = DEFAULT_IO_THREADS,
    ) -> None:
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ValueError(f"num_queues {num_queues} not in 1..{MAX_QUEUES}")
        if blk_size < SECTOR_SIZE or blk_size & (blk_size - 1):
            raise ValueError(f"blk_size {blk_size} is not a power of two >= {SECTOR_SIZE}")
        if io_mode not in IO_MODES:
            raise ValueError(f"io_mode {io_mode!r} not supported (choose from {IO_MODES})")
        serial_bytes = serial.encode()
        if len(serial_bytes) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {VIRTIO_BLK_ID_BYTES} bytes")
        self.backend = backend
        backend.users += 1
        self.num_queues = num_queues
        self.max_queue_size = queue_size
        self.blk_size = blk_size
        self.seg_max = seg_max
        self.max_chain = seg_max + 2  # header + segments + status
        self.io_mode = io_mode
        self.readonly = backend.readonly
        self.capacity = backend.size >> SECTOR_SHIFT  # in 512-byte sectors
        self.disk_bytes = self.capacity << SECTOR_SHIFT
        self.serial = serial_bytes.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        # The config space's writeback byte (5.2.4), as the guest sees it: QEMU reads it once at
        # realize and caches it, the guest changes it with SET_CONFIG, and QEMU never replays
        # that. So it changes only by SET_CONFIG (or 5.2.5.2's initial 0), survives device
        # resets and is restored after a backend restart (guest_state). ``writeback``, the
        # mode requests are served in, follows from it and the acked features (set_features).
        self.wce_config = 1
        self._wce_set = False  # the guest (or a restored state) chose wce_config
        self.writeback = True
        self.acked_features = 0
        self._pool: ThreadPoolExecutor | None = None
        if io_mode == "thread":
            # Its threads leave the process signals to the main thread (vhostmem/signals.py).
            self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="vhostmem-blk-io",
                                            initializer=block_in_this_thread)

    @classmethod
    def from_file(cls, path: str, *, readonly: bool = False, **options: Any) -> BlkDevice:
        """A device over a raw image file (O_RDWR, or O_RDONLY when ``readonly``)."""
        return cls(open_image(path, readonly=readonly), **options)

    @classmethod
    def from_ram(cls, size: int, *, readonly: bool = False, **options: Any) -> BlkDevice:
        """A device over a zero-filled RAM disk of ``size`` bytes."""
        return cls(ram_disk(size, readonly=readonly), **options)

    # -------------------------------------------------------- negotiation

    def features(self) -> int:
        bits = RING_FEATURES
        for bit in (
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
        ):
            bits |= 1 << bit
        if getattr(self.backend, "offers_write_zeroes", True):
            # A backend that cannot zero cheaply (NBD without WRITE_ZEROES) does not offer it.
            bits |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
        if self.readonly:
            bits |= 1 << VIRTIO_BLK_F_RO
        return bits

    def protocol_features(self) -> int:
        return (1 << VHOST_USER_PROTOCOL_F_CONFIG) | (1 << VHOST_USER_PROTOCOL_F_MQ)

    def set_features(self, acked: int) -> None:
        self.acked_features = acked
        wce = acked >> VIRTIO_BLK_F_CONFIG_WCE & 1
        flush = acked >> VIRTIO_BLK_F_FLUSH & 1
        if wce and not flush and not self._wce_set:
            self.wce_config = 0  # 5.2.5.2: a driver that cannot flush starts write-through
        self._update_mode()

    def _update_mode(self) -> None:
        """5.2.5: with CONFIG_WCE the guest's writeback byte decides; without it, FLUSH does
        (a driver that never flushes must get write-through)."""
        acked = self.acked_features
        if acked >> VIRTIO_BLK_F_CONFIG_WCE & 1:
            self.writeback = bool(self.wce_config)
        else:
            self.writeback = bool(acked >> VIRTIO_BLK_F_FLUSH & 1)

    def reset(self) -> None:
        self.acked_features = 0

    def forget_guest(self) -> None:
        self.reset()
        self.wce_config = 1
        self._wce_set = False
        self.writeback = True

    def guest_state(self) -> bytes:
        return bytes([self.wce_config | (int(self._wce_set) << 1)])

    def restore_guest_state(self, data: bytes) -> None:
        if len(data) != 1 or data[0] > 3:
            raise DeviceConfigError(f"saved blk state {data.hex()} is not one writeback byte")
        self.wce_config = data[0] & 1
        self._wce_set = bool(data[0] >> 1)
        self._update_mode()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.backend.users -= 1
        if self.backend.users <= 0:
            self.backend.close()

    def claim(self, who: str, busy: Callable[[], bool]) -> None:
        self.backend.claim(who, busy)

    def worker_settings(self) -> tuple[dict[str, Any], list[int]] | None:
        """A worker serves the same disk fd (its open file: O_DIRECT or not, as here) with
        inline I/O; an asynchronous backend (NBD) or a thread pool stays in this process."""
        if self.backend.asynchronous or self._pool is not None:
            return None
        fields = {"kind": "blk", "disk_size": self.backend.size, "readonly": self.readonly,
                  "name": self.backend.name, "num_queues": self.num_queues,
                  "max_queue_size": self.max_queue_size, "serial": self.serial.rstrip(b"\0")
                  .decode(), "blk_size": self.blk_size, "seg_max": self.seg_max}
        return fields, [self.backend.fd]

    # ------------------------------------------------------------- config

    def config_bytes(self) -> bytes:
        cfg = bytearray(CONFIG_SIZE)
        struct.pack_into("<Q", cfg, CFG_CAPACITY, self.capacity)
        struct.pack_into("<II", cfg, CFG_SIZE_MAX, DEFAULT_SIZE_MAX, self.seg_max)
        struct.pack_into("<I", cfg, CFG_BLK_SIZE, self.blk_size)
        cfg[CFG_WRITEBACK] = self.wce_config
        struct.pack_into("<H", cfg, CFG_NUM_QUEUES, self.num_queues)
        sectors_per_block = self.blk_size >> SECTOR_SHIFT
        struct.pack_into(
            "<IIIII",
            cfg,
            CFG_MAX_DISCARD_SECTORS,
            MAX_DWZ_SECTORS,
            MAX_DWZ_SEGMENTS,
            sectors_per_block,
            MAX_DWZ_SECTORS,
            MAX_DWZ_SEGMENTS,
        )
        cfg[CFG_WZ_MAY_UNMAP] = 1
        return bytes(cfg)

    def get_config(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > CONFIG_SPACE_LIMIT:
            raise DeviceConfigError(
                f"config read offset {offset} size {size} outside 0..{CONFIG_SPACE_LIMIT}"
            )
        return self.config_bytes().ljust(CONFIG_SPACE_LIMIT, b"\0")[offset : offset + size]

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """Only ``writeback`` (one byte at offset 32) is writable (5.2.5)."""
        if offset != CFG_WRITEBACK or len(data) != 1:
            raise DeviceConfigError(
                f"config write at offset {offset} ({len(data)} bytes): only the writeback "
                f"byte at offset {CFG_WRITEBACK} is writable"
            )
        if data[0] > 1:
            raise DeviceConfigError(f"writeback value {data[0]} is not 0 or 1")
        self.wce_config = data[0]
        self._wce_set = True
        self._update_mode()

    # ------------------------------------------------------------ requests

    def handle_queue(self, vq: Virtqueue) -> None:
        turns = _TURNS or _bind_turns()
        if self.backend.asynchronous:  # e.g. NBD: requests complete later (blk_async.py)
            turns[ASYNC_TURN](self, vq)
            return
        if self._pool is not None:
            self._dispatch(vq, self._pool)
            return
        turns[INLINE_TURN](self, vq)

    def _dispatch(self, vq: Virtqueue, pool: ThreadPoolExecutor) -> None:
        """Thread mode: hand every available chain to the pool."""
        started = monotonic_ns()  # one clock read per turn; each request is timed from it
        while (chain := vq.pop()) is not None:
            vq.hold()
            pool.submit(self._serve_in_thread, vq, chain, started)

    def _serve_in_thread(self, vq: Virtqueue, chain: DescChain, started: int) -> None:
        written = 0
        tally = [0, 0, 0]
        vq.begin()
        try:
            written = self.serve(chain, tally)
        except Exception:  # a bug must not lose the completion: the driver would hang
            log.exception("blk request %d failed", chain.head)
            tally[TALLY_ERRORS] += 1
        finally:
            # Counted before the completion is published: whoever sees it sees the count.
            vq.account_request(_data_in(written, 1, tally) if written else 0,
                               tally[TALLY_WRITE_BYTES], tally[TALLY_ERRORS] > 0, started)
            vq.complete(chain.head, written)

    def serve(self, chain: DescChain, tally: list[int]) -> int:
        """Execute one request; returns the used length (bytes written into the chain).
        Writes add their payload to ``tally[TALLY_WRITE_BYTES]``, failed requests count in
        ``tally[TALLY_ERRORS]``, a chain without a status byte in ``tally[TALLY_NO_STATUS]``."""
        writable = chain.writable
        if chain.writable_len == 0:
            log.warning("blk request %d has no status byte: completed empty", chain.head)
            tally[TALLY_NO_STATUS] += 1
            tally[TALLY_ERRORS] += 1
            return 0
        last = writable[-1]
        if len(last) == 1:
            status = writable.pop()
        else:
            status = last[-1:]
            writable[-1] = last[:-1]
        try:
            st, written = self._execute(chain, writable, chain.writable_len - 1, tally)
        except OSError as exc:
            log.error("blk request %d: %s", chain.head, exc)
            st, written = VIRTIO_BLK_S_IOERR, 0
        except Exception:  # a bug must fail one request, not the connection
            log.exception("blk request %d: unexpected error", chain.head)
            st, written = VIRTIO_BLK_S_IOERR, 0
        status[0] = st
        if st:
            tally[TALLY_ERRORS] += 1
        return written + 1

    def _execute(
        self, chain: DescChain, data_out: list[memoryview], out_len: int, tally: list[int]
    ) -> tuple[int, int]:
        """(status, data bytes written) for one request."""
        readable = chain.readable
        if chain.readable_len < REQ_HEADER.size:
            return VIRTIO_BLK_S_IOERR, 0
        first = readable[0]
        in_len = chain.readable_len - REQ_HEADER.size
        if len(first) == REQ_HEADER.size:
            rtype, _, sector = REQ_HEADER.unpack_from(first)
            if rtype == VIRTIO_BLK_T_IN and not in_len:
                # The hot path (a read with a header of its own): no list copies, and
                # _in_range inlined.
                offset = sector << SECTOR_SHIFT
                if out_len % SECTOR_SIZE or offset + out_len > self.disk_bytes:
                    return VIRTIO_BLK_S_IOERR, 0
                self.backend.readv(data_out, offset, out_len)
                return VIRTIO_BLK_S_OK, out_len
            data_in = readable[1:]
        else:
            header, data_in = _split(readable, REQ_HEADER.size)
            rtype, _, sector = REQ_HEADER.unpack(header)
        # Data in the wrong direction (a readable buffer for a read, a writable one for a
        # write) is a malformed request: fail it rather than silently move zero bytes.
        if rtype == VIRTIO_BLK_T_IN:
            if in_len or not self._in_range(sector, out_len):
                return VIRTIO_BLK_S_IOERR, 0
            self.backend.readv(data_out, sector << SECTOR_SHIFT, out_len)
            return VIRTIO_BLK_S_OK, out_len
        if rtype == VIRTIO_BLK_T_OUT:
            if self.readonly or out_len or not self._in_range(sector, in_len):
                return VIRTIO_BLK_S_IOERR, 0
            self.backend.writev(data_in, sector << SECTOR_SHIFT, in_len)
            tally[TALLY_WRITE_BYTES] += in_len
            return self._after_write(), 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            self.backend.flush()
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            return VIRTIO_BLK_S_OK, _copy_into(data_out, self.serial)
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            # The length is checked before the segments are copied out of guest memory: a chain
            # of huge readable buffers must not turn into a huge allocation.
            if self.readonly or not _segment_bytes_ok(in_len):
                return VIRTIO_BLK_S_IOERR, 0
            return self._discard_write_zeroes(rtype, b"".join(data_in)), 0
        return VIRTIO_BLK_S_UNSUPP, 0

    def _in_range(self, sector: int, nbytes: int) -> bool:
        """Whole sectors, inside the disk."""
        return nbytes % SECTOR_SIZE == 0 and (sector << SECTOR_SHIFT) + nbytes <= self.disk_bytes

    def _after_write(self) -> int:
        """Write-through mode (writeback off) makes every write durable before completing."""
        if not self.writeback:
            self.backend.flush()
        return VIRTIO_BLK_S_OK

    def dwz_segments(self, rtype: int, payload: bytes
                     ) -> tuple[int, list[tuple[int, int, int]]]:
        """The (sector, count, flags) segments of a DISCARD / WRITE_ZEROES payload, every one
        validated before any is applied (5.2.6.2): (VIRTIO_BLK_S_OK, segments), or the
        failure status and no segment."""
        is_discard = rtype == VIRTIO_BLK_T_DISCARD
        segments = list(DWZ_SEGMENT.iter_unpack(payload))
        for sector, count, flags in segments:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (
                is_discard and flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            ):
                return VIRTIO_BLK_S_UNSUPP, []
            if count > MAX_DWZ_SECTORS or not self._in_range(sector, count << SECTOR_SHIFT):
                return VIRTIO_BLK_S_IOERR, []
        return VIRTIO_BLK_S_OK, segments

    def _discard_write_zeroes(self, rtype: int, payload: bytes) -> int:
        """Validate every segment first (5.2.6.2), then apply them."""
        is_discard = rtype == VIRTIO_BLK_T_DISCARD
        status, segments = self.dwz_segments(rtype, payload)
        if status != VIRTIO_BLK_S_OK:
            return status
        for sector, count, flags in segments:
            offset, nbytes = sector << SECTOR_SHIFT, count << SECTOR_SHIFT
            if not nbytes:
                continue
            if is_discard:
                self.backend.discard(offset, nbytes)
            else:
                unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
                self.backend.write_zeroes(offset, nbytes, unmap)
        return self._after_write()


def _data_in(used_bytes: int, requests: int, tally: list[int]) -> int:
    """Data bytes written into the guest's buffers by ``requests`` requests whose used lengths
    add up to ``used_bytes``: every request wrote a status byte, but those in
    ``tally[TALLY_NO_STATUS]``."""
    return used_bytes - requests + tally[TALLY_NO_STATUS]


def _segment_bytes_ok(length: int) -> bool:
    """1..MAX_DWZ_SEGMENTS whole discard / write-zeroes segments."""
    seg = DWZ_SEGMENT.size
    return 0 < length <= MAX_DWZ_SEGMENTS * seg and length % seg == 0


def _split(views: list[memoryview], n: int) -> tuple[bytes, list[memoryview]]:
    """The first ``n`` bytes of ``views`` (copied: headers only) and the views after them."""
    head = bytearray()
    rest: list[memoryview] = []
    for v in views:
        need = n - len(head)
        if need <= 0:
            rest.append(v)
        elif len(v) <= need:
            head += v
        else:
            head += v[:need]
            rest.append(v[need:])
    return bytes(head), rest


def _copy_into(views: list[memoryview], data: bytes) -> int:
    """Copy as much of ``data`` as fits into ``views``; returns the bytes copied."""
    done = 0
    for v in views:
        n = min(len(v), len(data) - done)
        if n <= 0:
            break
        v[:n] = data[done : done + n]
        done += n
    return done
