"""virtio-blk for the fake guest: constants, config space, request bytes and descriptor layouts.

A request is device-readable bytes (16-byte header, then any out payload) followed by
device-writable bytes (any in payload, then the status byte).  A `Layout` says how those bytes are
cut into descriptors; `chain_pieces` turns it into (addr, len, flags) triples for a ring or an
indirect table.  Since a descriptor is either readable or writable, a legal chain has at least two
descriptors; `Layout(single=True)` builds the illegal one-descriptor form for negative tests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol.blk import BlkRequestType
from protocol.blk import BlkStatus as BlkStatus  # re-exported for frontend users
from vhostmem.frontend.ring import VIRTQ_DESC_F_WRITE

# The request types and status codes are the wire format's: one definition, in protocol.
BlkType = BlkRequestType

SECTOR_SIZE = 512
SECTOR_SHIFT = 9
HEADER_SIZE = 16
STATUS_SIZE = 1
BLK_ID_BYTES = 20
SEGMENT_SIZE = 16  # discard / write-zeroes segment
WRITE_ZEROES_UNMAP = 1
STATUS_UNSET = 0xFF  # written before submission so a missing status is visible

HEADER = struct.Struct("<IIQ")  # type, reserved, sector
SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags

# Which request types carry data in which direction.
OUT_TYPES = frozenset({BlkType.OUT, BlkType.DISCARD, BlkType.WRITE_ZEROES})
IN_TYPES = frozenset({BlkType.IN, BlkType.GET_ID, BlkType.GET_LIFETIME})


def blk_header(type_: int, sector: int = 0) -> bytes:
    return HEADER.pack(type_, 0, sector)


def discard_segment(sector: int, num_sectors: int, flags: int = 0) -> bytes:
    """One discard/write-zeroes range; `flags=WRITE_ZEROES_UNMAP` lets the device unmap."""
    return SEGMENT.pack(sector, num_sectors, flags)


# Config-space layout (virtio 1.2, 5.2.4): name -> (offset, struct format).
CONFIG_FIELDS: dict[str, tuple[int, str]] = {
    "capacity": (0, "<Q"),
    "size_max": (8, "<I"),
    "seg_max": (12, "<I"),
    "cylinders": (16, "<H"),
    "heads": (18, "<B"),
    "sectors": (19, "<B"),
    "blk_size": (20, "<I"),
    "physical_block_exp": (24, "<B"),
    "alignment_offset": (25, "<B"),
    "min_io_size": (26, "<H"),
    "opt_io_size": (28, "<I"),
    "writeback": (32, "<B"),
    "num_queues": (34, "<H"),
    "max_discard_sectors": (36, "<I"),
    "max_discard_seg": (40, "<I"),
    "discard_sector_alignment": (44, "<I"),
    "max_write_zeroes_sectors": (48, "<I"),
    "max_write_zeroes_seg": (52, "<I"),
    "write_zeroes_may_unmap": (56, "<B"),
}
CONFIG_SIZE = 60


def parse_blk_config(raw: bytes) -> dict[str, int]:
    """Decode the fields of a virtio-blk config space that `raw` is long enough to hold."""
    out = {}
    for name, (offset, fmt) in CONFIG_FIELDS.items():
        if offset + struct.calcsize(fmt) <= len(raw):
            out[name] = struct.unpack_from(fmt, raw, offset)[0]
    return out


@dataclass(frozen=True)
class Layout:
    """How a request's bytes are cut into descriptors.

    header_chunks: the 16-byte header over 1..16 descriptors.
    data_chunks:   each payload (out or in) over this many descriptors.
    merge_header:  header and out payload share a descriptor (needs them adjacent).
    merge_status:  in payload and status share a descriptor (needs them adjacent).
    single:        everything in one writable descriptor (illegal; for negative tests).
    indirect:      the chain lives in an indirect table behind one ring descriptor.
    """

    header_chunks: int = 1
    data_chunks: int = 1
    merge_header: bool = False
    merge_status: bool = False
    single: bool = False
    indirect: bool = False

    def with_indirect(self) -> Layout:
        return Layout(self.header_chunks, self.data_chunks, self.merge_header,
                      self.merge_status, self.single, True)


STANDARD = Layout()  # header | data | status (what QEMU's guests usually build)
MERGED = Layout(merge_header=True, merge_status=True)  # two descriptors
INDIRECT = Layout(indirect=True)


class LayoutError(ValueError):
    """A layout asked for a merge of non-adjacent buffers or an impossible split."""


def _split(addr: int, length: int, chunks: int, flags: int) -> list[list[int]]:
    if length == 0:
        return []
    n = max(1, min(chunks, length))
    base, extra = divmod(length, n)
    out, pos = [], addr
    for k in range(n):
        size = base + (1 if k < extra else 0)
        out.append([pos, size, flags])
        pos += size
    return out


def chain_pieces(layout: Layout, header_gpa: int, out_gpa: int, out_len: int,
                 in_gpa: int, in_len: int, status_gpa: int) -> list[tuple[int, int, int]]:
    """(addr, len, flags) for every descriptor of a request, in chain order."""
    if layout.single:
        total = HEADER_SIZE + out_len + in_len + STATUS_SIZE
        if not (out_gpa == header_gpa + HEADER_SIZE and in_gpa == out_gpa + out_len
                and status_gpa == in_gpa + in_len):
            raise LayoutError("single-descriptor layout needs header, data and status adjacent")
        return [(header_gpa, total, VIRTQ_DESC_F_WRITE)]
    readable = _split(header_gpa, HEADER_SIZE, layout.header_chunks, 0)
    out = _split(out_gpa, out_len, layout.data_chunks, 0)
    if layout.merge_header and out:
        if out_gpa != header_gpa + HEADER_SIZE:
            raise LayoutError("merge_header needs the out payload right after the header")
        readable[-1][1] += out[0][1]
        out = out[1:]
    writable = _split(in_gpa, in_len, layout.data_chunks, VIRTQ_DESC_F_WRITE)
    status = [[status_gpa, STATUS_SIZE, VIRTQ_DESC_F_WRITE]]
    if layout.merge_status and writable:
        if status_gpa != in_gpa + in_len:
            raise LayoutError("merge_status needs the status byte right after the in payload")
        writable[-1][1] += STATUS_SIZE
        status = []
    return [(a, n, f) for a, n, f in readable + out + writable + status]
