"""Inline blk turns served a batch at a time (vhostmem/devices/blk_inline.py): the read fast path
gives what the general path gives, anything it cannot decide goes the general way, the used
idx is stored once per batch, and the queue's statistics count every request."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.vhostmem.devices.blkenv import BlkDriver
from tests.vhostmem.ringhelpers import CountingView
from vhostmem.devices import BlkDevice, ram_disk
from vhostmem.devices.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from vhostmem.split_ring import IDX

DISK = 1 << 20
PATTERN = bytes(range(256)) * (DISK // 256)


@pytest.fixture
def drv() -> Iterator[BlkDriver]:
    dev = BlkDevice(ram_disk(DISK))
    os.pwrite(dev.backend.fd, PATTERN, 0)
    driver = BlkDriver(dev)
    yield driver
    driver.close()
    dev.close()


def test_a_batch_of_mixed_requests_gets_what_each_asks_for(drv) -> None:  # type: ignore[no-untyped-def]
    reads = [drv.submit(VIRTIO_BLK_T_IN, sector, read_len=4096) for sector in (0, 8, 2040)]
    write = drv.submit(VIRTIO_BLK_T_OUT, 16, payload=b"\x5a" * 512)
    split = drv.submit(VIRTIO_BLK_T_IN, 1, read_len=512, layout="2")  # the general path
    past_end = drv.submit(VIRTIO_BLK_T_IN, DISK // 512 - 1, read_len=1024)
    partial = drv.submit(VIRTIO_BLK_T_IN, 0, read_len=100)  # not whole sectors
    out = drv.run()
    for (head, data_in, _), sector in zip(reads, (0, 8, 2040), strict=True):
        assert out[head] == (VIRTIO_BLK_S_OK, 4097)
        assert drv.ram.read(data_in, 4096) == PATTERN[sector * 512 : sector * 512 + 4096]
    assert out[write[0]] == (VIRTIO_BLK_S_OK, 1)
    assert out[split[0]] == (VIRTIO_BLK_S_OK, 513)
    assert drv.ram.read(split[1], 512) == PATTERN[512:1024]
    assert out[past_end[0]] == (VIRTIO_BLK_S_IOERR, 1)
    assert out[partial[0]] == (VIRTIO_BLK_S_IOERR, 1)
    stats = drv.queues[0].stats()
    assert stats["requests"] == 7 and stats["errors"] == 2
    assert stats["read_bytes"] == 3 * 4096 + 512 and stats["write_bytes"] == 512


def test_a_short_read_goes_the_general_way_and_fails(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The image shrinks under the device: the fast path's preadv comes back short, and the
    general path reads again, hits the end and fails the request (it never reports OK for
    bytes it did not read)."""
    image = tmp_path / "disk.img"
    image.write_bytes(PATTERN)
    dev = BlkDevice.from_file(str(image))
    drv = BlkDriver(dev)
    try:
        os.truncate(image, DISK - 2048)
        head, _, _ = drv.submit(VIRTIO_BLK_T_IN, DISK // 512 - 8, read_len=4096)
        ok, _, _ = drv.submit(VIRTIO_BLK_T_IN, 0, read_len=4096)
        out = drv.run()
        assert out[head] == (VIRTIO_BLK_S_IOERR, 1)
        assert out[ok] == (VIRTIO_BLK_S_OK, 4097)
    finally:
        drv.close()
        dev.close()


def test_a_turn_stores_the_used_idx_once_per_batch(drv) -> None:  # type: ignore[no-untyped-def]
    heads = [drv.submit(VIRTIO_BLK_T_IN, 8 * n, read_len=4096)[0] for n in range(10)]
    vq = drv.queues[0]
    hdr = CountingView(vq._used_hdr)  # type: ignore[arg-type]
    vq._used_hdr = hdr  # type: ignore[assignment]
    try:
        vq.new_turn()
        out = drv.run()
    finally:
        vq._used_hdr = hdr.view
    assert sorted(out) == sorted(heads)
    assert [e for e in hdr.events if e[0] == "store" and e[1] == IDX] == [("store", IDX, 10)]
