"""virtio-blk wire formats (virtio 1.2, section 5.2): config space, request header, statuses.

These are for the control plane and for tests (building a config space, decoding a request in a
test). The data path of the blk device should unpack the 16-byte header with ``struct`` directly.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from construct import Array, Bytes, Container, Default, Int8ul, Int16ul, Int32ul, Int64ul, Struct

SECTOR_SIZE = 512  # capacity and request sectors are always in 512-byte units
SECTOR_SHIFT = 9
ID_BYTES = 20  # VIRTIO_BLK_T_GET_ID answer length
DISCARD_FLAG_UNMAP = 0x1  # write-zeroes segment flags bit 0


class BlkRequestType(IntEnum):
    """``VIRTIO_BLK_T_*``."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14
    ZONE_APPEND = 15
    ZONE_REPORT = 16
    ZONE_OPEN = 18
    ZONE_CLOSE = 20
    ZONE_FINISH = 22
    ZONE_RESET = 24
    ZONE_RESET_ALL = 26


class BlkStatus(IntEnum):
    """``VIRTIO_BLK_S_*``: the status byte the device writes last."""

    OK = 0
    IOERR = 1
    UNSUPP = 2
    ZONE_INVALID_CMD = 3
    ZONE_UNALIGNED_WP = 4
    ZONE_OPEN_RESOURCE = 5
    ZONE_ACTIVE_RESOURCE = 6


BlkGeometry = Struct(
    "cylinders" / Int16ul,
    "heads" / Int8ul,
    "sectors" / Int8ul,
)

BlkTopology = Struct(
    "physical_block_exp" / Int8ul,  # log2(logical blocks per physical block)
    "alignment_offset" / Int8ul,
    "min_io_size" / Int16ul,  # in logical blocks
    "opt_io_size" / Int32ul,
)

BlkZoned = Struct(
    "zone_sectors" / Int32ul,
    "max_open_zones" / Int32ul,
    "max_active_zones" / Int32ul,
    "max_append_sectors" / Int32ul,
    "write_granularity" / Int32ul,
    "model" / Int8ul,
    "unused2" / Default(Bytes(3), bytes(3)),
)

_ZERO_GEOMETRY = {"cylinders": 0, "heads": 0, "sectors": 0}
_ZERO_TOPOLOGY = {
    "physical_block_exp": 0,
    "alignment_offset": 0,
    "min_io_size": 0,
    "opt_io_size": 0,
}
_ZERO_ZONED = {
    "zone_sectors": 0,
    "max_open_zones": 0,
    "max_active_zones": 0,
    "max_append_sectors": 0,
    "write_granularity": 0,
    "model": 0,
}

BlkConfig = Struct(
    "capacity" / Default(Int64ul, 0),  # in 512-byte sectors
    "size_max" / Default(Int32ul, 0),
    "seg_max" / Default(Int32ul, 0),
    "geometry" / Default(BlkGeometry, _ZERO_GEOMETRY),
    "blk_size" / Default(Int32ul, 0),
    "topology" / Default(BlkTopology, _ZERO_TOPOLOGY),
    "writeback" / Default(Int8ul, 0),
    "unused0" / Default(Int8ul, 0),
    "num_queues" / Default(Int16ul, 0),
    "max_discard_sectors" / Default(Int32ul, 0),
    "max_discard_seg" / Default(Int32ul, 0),
    "discard_sector_alignment" / Default(Int32ul, 0),
    "max_write_zeroes_sectors" / Default(Int32ul, 0),
    "max_write_zeroes_seg" / Default(Int32ul, 0),
    "write_zeroes_may_unmap" / Default(Int8ul, 0),
    "unused1" / Default(Array(3, Int8ul), [0, 0, 0]),
    "max_secure_erase_sectors" / Default(Int32ul, 0),
    "max_secure_erase_seg" / Default(Int32ul, 0),
    "secure_erase_sector_alignment" / Default(Int32ul, 0),
    "zoned" / Default(BlkZoned, _ZERO_ZONED),
)
BLK_CONFIG_SIZE = BlkConfig.sizeof()  # 96
# QEMU 7.2's vhost-user-blk reads the config up to write_zeroes_may_unmap: 57 bytes.
BLK_CONFIG_SIZE_WRITE_ZEROES = 57

# The first descriptor of every request: type, reserved, sector.
BlkRequestHeader = Struct(
    "type" / Int32ul,
    "reserved" / Default(Int32ul, 0),
    "sector" / Int64ul,
)
BLK_REQUEST_HEADER_SIZE = BlkRequestHeader.sizeof()  # 16

# DISCARD / WRITE_ZEROES / SECURE_ERASE data: an array of these.
BlkDiscardSegment = Struct(
    "sector" / Int64ul,
    "num_sectors" / Int32ul,
    "flags" / Int32ul,  # bit 0 unmap (write zeroes only)
)
BLK_DISCARD_SEGMENT_SIZE = BlkDiscardSegment.sizeof()  # 16


def build_blk_config(**fields: Any) -> bytes:
    """The 96-byte config space; unnamed fields are 0. Nested fields take dicts.

    >>> len(build_blk_config(capacity=131072, blk_size=512))
    96
    """
    unknown = set(fields) - {sc.name for sc in BlkConfig.subcons}
    if unknown:
        raise ValueError(f"unknown virtio-blk config fields: {sorted(unknown)}")
    return bytes(BlkConfig.build(fields))


def parse_blk_config(data: bytes) -> Container:
    """Decode a config space, zero-extending a short read (QEMU 7.2 reads only 57 bytes)."""
    if len(data) > BLK_CONFIG_SIZE:
        raise ValueError(f"virtio-blk config is {BLK_CONFIG_SIZE} bytes, got {len(data)}")
    return BlkConfig.parse(bytes(data) + bytes(BLK_CONFIG_SIZE - len(data)))
