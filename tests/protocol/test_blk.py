"""virtio-blk layouts (virtio 1.2 section 5.2) and the bit numbers of every feature enum."""

from __future__ import annotations

import pytest

from protocol import BlkFeature, ProtocolFeature, VirtioFeature, feature_mask, feature_names
from protocol.blk import (
    BLK_CONFIG_SIZE,
    BLK_CONFIG_SIZE_WRITE_ZEROES,
    BLK_DISCARD_SEGMENT_SIZE,
    BLK_REQUEST_HEADER_SIZE,
    BlkConfig,
    BlkRequestHeader,
    BlkRequestType,
    BlkStatus,
    build_blk_config,
    parse_blk_config,
)

# (field, byte offset, width) from the virtio 1.2 struct virtio_blk_config
OFFSETS = [
    ("capacity", 0, 8),
    ("size_max", 8, 4),
    ("seg_max", 12, 4),
    ("blk_size", 20, 4),
    ("writeback", 32, 1),
    ("unused0", 33, 1),
    ("num_queues", 34, 2),
    ("max_discard_sectors", 36, 4),
    ("max_discard_seg", 40, 4),
    ("discard_sector_alignment", 44, 4),
    ("max_write_zeroes_sectors", 48, 4),
    ("max_write_zeroes_seg", 52, 4),
    ("write_zeroes_may_unmap", 56, 1),
    ("max_secure_erase_sectors", 60, 4),
    ("max_secure_erase_seg", 64, 4),
    ("secure_erase_sector_alignment", 68, 4),
]


@pytest.mark.parametrize(("field", "offset", "width"), OFFSETS)
def test_config_field_offsets(field: str, offset: int, width: int) -> None:
    value = int.from_bytes(bytes(range(1, width + 1)), "little")
    data = build_blk_config(**{field: value})
    assert len(data) == BLK_CONFIG_SIZE == 96
    assert data[offset : offset + width] == bytes(range(1, width + 1))
    assert data.count(0) == BLK_CONFIG_SIZE - width
    assert parse_blk_config(data)[field] == value


def test_nested_config_fields() -> None:
    data = build_blk_config(
        geometry={"cylinders": 0x0201, "heads": 3, "sectors": 4},
        topology={"physical_block_exp": 5, "alignment_offset": 6, "min_io_size": 0x0807,
                  "opt_io_size": 0x0C0B0A09},
        zoned={"zone_sectors": 1, "max_open_zones": 2, "max_active_zones": 3,
               "max_append_sectors": 4, "write_granularity": 5, "model": 2},
    )  # fmt: skip
    assert data[16:20] == bytes([1, 2, 3, 4])
    assert data[24:32] == bytes(range(5, 13))
    assert data[72:96] == bytes(
        [1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 5, 0, 0, 0, 2, 0, 0, 0]
    )
    with pytest.raises(ValueError, match="unknown virtio-blk config fields"):
        build_blk_config(capacitty=1)


def test_short_config_read_as_qemu_72_does() -> None:
    data = build_blk_config(capacity=1 << 17, seg_max=126, write_zeroes_may_unmap=1)
    config = parse_blk_config(data[:BLK_CONFIG_SIZE_WRITE_ZEROES])
    assert (config.capacity, config.seg_max, config.write_zeroes_may_unmap) == (1 << 17, 126, 1)
    with pytest.raises(ValueError):
        parse_blk_config(bytes(97))
    assert BlkConfig.sizeof() == BLK_CONFIG_SIZE


def test_request_layouts_and_codes() -> None:
    assert BLK_REQUEST_HEADER_SIZE == 16 and BLK_DISCARD_SEGMENT_SIZE == 16
    header = BlkRequestHeader.build({"type": BlkRequestType.OUT, "sector": 8})
    assert header == b"\x01\x00\x00\x00\x00\x00\x00\x00\x08" + bytes(7)
    assert [t.value for t in BlkRequestType][:8] == [0, 1, 4, 8, 10, 11, 13, 14]
    assert (BlkStatus.OK, BlkStatus.IOERR, BlkStatus.UNSUPP) == (0, 1, 2)


def test_feature_bit_numbers_from_the_specs() -> None:
    assert ProtocolFeature.REPLY_ACK == 3 and ProtocolFeature.CONFIGURE_MEM_SLOTS == 15
    assert ProtocolFeature.GPA_ADDRESSES == 21 and ProtocolFeature.SHMEM == 22
    assert ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN == 23
    assert [f.value for f in ProtocolFeature] == list(range(24))
    assert VirtioFeature.VERSION_1 == 32 and VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES == 30
    assert (VirtioFeature.INDIRECT_DESC, VirtioFeature.EVENT_IDX) == (28, 29)
    assert (VirtioFeature.ACCESS_PLATFORM, VirtioFeature.RING_PACKED) == (33, 34)
    assert (VirtioFeature.IN_ORDER, VirtioFeature.NOTIFY_ON_EMPTY, VirtioFeature.LOG_ALL) == (
        35,
        24,
        26,
    )
    assert (BlkFeature.FLUSH, BlkFeature.WRITE_ZEROES, BlkFeature.ZONED) == (9, 14, 17)


def test_feature_mask_and_names() -> None:
    mask = feature_mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG)
    assert mask == 0x209
    assert feature_names(0x8F2B, ProtocolFeature) == [
        "MQ", "LOG_SHMFD", "REPLY_ACK", "BACKEND_REQ", "PAGEFAULT", "CONFIG",
        "BACKEND_SEND_FD", "HOST_NOTIFIER", "CONFIGURE_MEM_SLOTS",
    ]  # fmt: skip


def test_protocol_feature_4_is_net_mtu() -> None:
    assert ProtocolFeature(4) is ProtocolFeature.NET_MTU
    assert ProtocolFeature(4).name == "NET_MTU"
    assert feature_names(1 << 4, ProtocolFeature) == ["NET_MTU"]
