"""vhost-user-blk requests through a real ring, against a real image file or RAM disk."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vhostmem.devices.blkenv import LAYOUTS, STATUS_UNWRITTEN, BlkDriver, segments
from tests.vhostmem.ringhelpers import eventfd_count
from vhostmem.device import DeviceConfigError
from vhostmem.devices import BlkDevice, open_image, ram_disk
from vhostmem.devices.blk import (
    CFG_BLK_SIZE,
    CFG_CAPACITY,
    CFG_NUM_QUEUES,
    CFG_SEG_MAX,
    CFG_WRITEBACK,
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
)
from vhostmem.devices.blk_backend import BlkBackend
from vhostmem.virtqueue import VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT

DISK = 1 << 20
SECTORS = DISK // 512
VIRTIO_BLK_T_GET_LIFETIME = 10


def pattern(size: int, seed: int = 7) -> bytes:
    return bytes((i * 31 + seed + (i >> 9)) & 0xFF for i in range(size))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(DISK))
    return path


@pytest.fixture(params=["inline", "thread"])
def drv(image: Path, request: pytest.FixtureRequest) -> Iterator[BlkDriver]:
    d = BlkDriver(BlkDevice(open_image(str(image)), io_mode=request.param))
    yield d
    d.close()
    d.device.close()


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_matches_image(drv: BlkDriver, image: Path, layout: str) -> None:
    status, used, data = drv.one(VIRTIO_BLK_T_IN, 8, read_len=4096, layout=layout)
    assert (status, used) == (VIRTIO_BLK_S_OK, 4097)
    assert drv.ram.read(data, 4096) == file_bytes(image, 8 * 512, 4096)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_write_reaches_image(drv: BlkDriver, image: Path, layout: str) -> None:
    payload = pattern(3 * 512, seed=99)
    status, used, _ = drv.one(VIRTIO_BLK_T_OUT, 5, payload=payload, layout=layout)
    assert (status, used) == (VIRTIO_BLK_S_OK, 1)
    assert file_bytes(image, 5 * 512, 3 * 512) == payload
    assert file_bytes(image, 4 * 512, 512) == pattern(DISK)[4 * 512 : 5 * 512]  # untouched


def test_read_last_sector_and_out_of_range(drv: BlkDriver, image: Path) -> None:
    status, _, data = drv.one(VIRTIO_BLK_T_IN, SECTORS - 1, read_len=512)
    assert status == VIRTIO_BLK_S_OK
    assert drv.ram.read(data, 512) == file_bytes(image, DISK - 512, 512)
    assert drv.one(VIRTIO_BLK_T_IN, SECTORS - 1, read_len=1024)[:2] == (VIRTIO_BLK_S_IOERR, 1)
    assert drv.one(VIRTIO_BLK_T_IN, 1 << 62, read_len=512)[0] == VIRTIO_BLK_S_IOERR
    assert drv.one(VIRTIO_BLK_T_OUT, SECTORS, payload=bytes(512))[0] == VIRTIO_BLK_S_IOERR


def test_partial_sector_is_ioerr(drv: BlkDriver, image: Path) -> None:
    assert drv.one(VIRTIO_BLK_T_IN, 0, read_len=100)[0] == VIRTIO_BLK_S_IOERR
    assert drv.one(VIRTIO_BLK_T_OUT, 0, payload=b"x" * 100)[0] == VIRTIO_BLK_S_IOERR
    assert file_bytes(image, 0, 100) == pattern(DISK)[:100]


def test_flush(drv: BlkDriver) -> None:
    assert drv.one(VIRTIO_BLK_T_FLUSH)[:2] == (VIRTIO_BLK_S_OK, 1)


def test_get_id_default_and_custom(drv: BlkDriver, image: Path) -> None:
    status, used, data = drv.one(VIRTIO_BLK_T_GET_ID, read_len=20)
    assert (status, used) == (VIRTIO_BLK_S_OK, 21)
    assert drv.ram.read(data, 20) == b"vhostmem".ljust(20, b"\0")
    d = BlkDriver(BlkDevice(open_image(str(image)), serial="S" * 20))
    try:
        _, _, data = d.one(VIRTIO_BLK_T_GET_ID, read_len=20)
        assert d.ram.read(data, 20) == b"S" * 20
    finally:
        d.close()
        d.device.close()
    with pytest.raises(ValueError, match="longer than 20"):
        BlkDevice(ram_disk(4096), serial="x" * 21)


@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_GET_LIFETIME, 99, 0xFFFFFFFF])
def test_unknown_type_is_unsupp(drv: BlkDriver, rtype: int) -> None:
    assert drv.one(rtype, read_len=512)[:2] == (VIRTIO_BLK_S_UNSUPP, 1)


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes_file(drv: BlkDriver, image: Path, unmap: bool) -> None:
    flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
    payload = segments((16, 8, flags), (100, 1, 0))
    assert drv.one(VIRTIO_BLK_T_WRITE_ZEROES, payload=payload)[:2] == (VIRTIO_BLK_S_OK, 1)
    assert file_bytes(image, 16 * 512, 8 * 512) == bytes(8 * 512)
    assert file_bytes(image, 100 * 512, 512) == bytes(512)
    assert file_bytes(image, 24 * 512, 512) == pattern(DISK)[24 * 512 : 25 * 512]
    assert os.path.getsize(image) == DISK


def test_discard(drv: BlkDriver, image: Path) -> None:
    assert drv.one(VIRTIO_BLK_T_DISCARD, payload=segments((0, 64, 0)))[0] == VIRTIO_BLK_S_OK
    assert os.path.getsize(image) == DISK
    # 5.2.6.2: UNMAP (or any unknown flag) on discard is unsupported.
    unmap = segments((0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
    assert drv.one(VIRTIO_BLK_T_DISCARD, payload=unmap)[0] == VIRTIO_BLK_S_UNSUPP


@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES])
def test_discard_write_zeroes_errors(drv: BlkDriver, image: Path, rtype: int) -> None:
    assert drv.one(rtype, payload=segments((0, 8, 0x80)))[0] == VIRTIO_BLK_S_UNSUPP
    assert drv.one(rtype, payload=segments((SECTORS - 1, 2, 0)))[0] == VIRTIO_BLK_S_IOERR
    assert drv.one(rtype, payload=segments((0, 8, 0))[:-1])[0] == VIRTIO_BLK_S_IOERR
    too_many = segments(*[(i, 1, 0) for i in range(17)])
    assert drv.one(rtype, payload=too_many)[0] == VIRTIO_BLK_S_IOERR
    # A bad segment fails the whole request before anything is changed.
    mixed = segments((0, 8, 0), (SECTORS, 1, 0))
    assert drv.one(rtype, payload=mixed)[0] == VIRTIO_BLK_S_IOERR
    assert file_bytes(image, 0, 4096) == pattern(DISK)[:4096]


def test_ram_backend_write_read_zero() -> None:
    d = BlkDriver(BlkDevice(ram_disk(DISK)))
    try:
        data = pattern(8192, seed=3)
        assert d.one(VIRTIO_BLK_T_OUT, 10, payload=data)[0] == VIRTIO_BLK_S_OK
        status, _, got = d.one(VIRTIO_BLK_T_IN, 10, read_len=8192, layout="many")
        assert status == VIRTIO_BLK_S_OK and d.ram.read(got, 8192) == data
        for flags in (0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP):
            d.one(VIRTIO_BLK_T_OUT, 10, payload=data)
            zero = segments((11, 2, flags))
            assert d.one(VIRTIO_BLK_T_WRITE_ZEROES, payload=zero)[0] == VIRTIO_BLK_S_OK
            _, _, got = d.one(VIRTIO_BLK_T_IN, 10, read_len=8192)
            assert d.ram.read(got, 8192) == data[:512] + bytes(1024) + data[1536:]
    finally:
        d.close()
        d.device.close()


def test_readonly(image: Path) -> None:
    d = BlkDriver(BlkDevice(open_image(str(image), readonly=True)))
    try:
        assert d.device.features() >> VIRTIO_BLK_F_RO & 1
        assert d.one(VIRTIO_BLK_T_OUT, 0, payload=bytes(512))[0] == VIRTIO_BLK_S_IOERR
        for rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            assert d.one(rtype, payload=segments((0, 8, 0)))[0] == VIRTIO_BLK_S_IOERR
        status, _, data = d.one(VIRTIO_BLK_T_IN, 0, read_len=512)
        assert status == VIRTIO_BLK_S_OK and d.ram.read(data, 512) == pattern(DISK)[:512]
        assert file_bytes(image, 0, 4096) == pattern(DISK)[:4096]
    finally:
        d.close()
        d.device.close()


# ---------------------------------------------------------------- malformed layouts


def test_short_header_is_ioerr(drv: BlkDriver) -> None:
    hdr = drv.buffer(struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)[:12])
    status = drv.buffer(bytes([STATUS_UNWRITTEN]))
    head = drv.rings[0].add([(hdr, 12, False), (status, 1, True)])
    drv.device.handle_queue(drv.queues[0])
    drv.queues[0].wait_idle(10)
    assert drv.rings[0].take_used() == [(head, 1)]
    assert drv.ram.read(status, 1)[0] == VIRTIO_BLK_S_IOERR


def test_no_writable_byte_completes_empty(drv: BlkDriver) -> None:
    hdr = drv.buffer(struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0))
    head = drv.rings[0].add([(hdr, 16, False)])
    drv.device.handle_queue(drv.queues[0])
    drv.queues[0].wait_idle(10)
    assert drv.rings[0].take_used() == [(head, 0)]


def test_status_at_end_of_larger_writable(drv: BlkDriver, image: Path) -> None:
    hdr = drv.buffer(struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 2))
    buf = drv.buffer(b"\xee" * 1025)
    head = drv.rings[0].add([(hdr, 16, False), (buf, 1025, True)])
    drv.device.handle_queue(drv.queues[0])
    drv.queues[0].wait_idle(10)
    assert drv.rings[0].take_used() == [(head, 1025)]
    assert drv.ram.read(buf, 1024) == file_bytes(image, 1024, 1024)
    assert drv.ram.read(buf + 1024, 1)[0] == VIRTIO_BLK_S_OK


def test_short_read_loops_then_fails_at_eof(image: Path) -> None:
    # The backend claims more bytes than the file has: preadv comes back short, the loop
    # asks again, gets EOF and the request fails instead of returning stale memory.
    fd = os.open(image, os.O_RDWR)
    d = BlkDriver(BlkDevice(BlkBackend(fd, 2 * DISK, False, "short")))
    try:
        assert d.one(VIRTIO_BLK_T_IN, SECTORS - 1, read_len=1024)[:2] == (VIRTIO_BLK_S_IOERR, 1)
    finally:
        d.close()
        d.device.close()


def test_more_segments_than_iov_max(image: Path) -> None:
    d = BlkDriver(BlkDevice(open_image(str(image))), num=2048, ram_size=16 << 20)
    try:
        ring = d.rings[0]
        hdr = d.buffer(struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
        data = d.buffer(1100 * 512)
        status = d.buffer(b"\xee")
        bufs = [(hdr, 16, False)] + [(data + i * 512, 512, True) for i in range(1100)]
        head = ring.add([*bufs, (status, 1, True)], indirect=True)
        d.device.handle_queue(d.queues[0])
        assert ring.take_used() == [(head, 1100 * 512 + 1)]
        assert d.ram.read(status, 1)[0] == VIRTIO_BLK_S_OK
        assert d.ram.read(data, 1100 * 512) == file_bytes(image, 0, 1100 * 512)
    finally:
        d.close()
        d.device.close()


# ------------------------------------------------------------- queues and signals


def test_batch_signals_once_and_event_idx_suppresses(drv: BlkDriver) -> None:
    heads = [drv.submit(VIRTIO_BLK_T_IN, i, read_len=4096)[0] for i in range(8)]
    results = drv.run()
    assert sorted(results) == sorted(heads)
    assert all(r == (VIRTIO_BLK_S_OK, 4097) for r in results.values())
    assert eventfd_count(drv.call) == 1
    drv.rings[0].set_used_event(8 + 5)  # no call until used idx passes 13
    for _ in range(3):
        drv.submit(VIRTIO_BLK_T_FLUSH)
        drv.run()
    assert eventfd_count(drv.call) == 0
    for _ in range(3):
        drv.submit(VIRTIO_BLK_T_FLUSH)
        drv.run()
    assert eventfd_count(drv.call) == 1


def test_no_event_idx_no_interrupt(image: Path) -> None:
    d = BlkDriver(BlkDevice(open_image(str(image))), features=0)
    try:
        d.rings[0].set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
        d.submit(VIRTIO_BLK_T_FLUSH)
        assert list(d.run().values()) == [(VIRTIO_BLK_S_OK, 1)]
        assert eventfd_count(d.call) == 0
        d.rings[0].set_avail_flags(0)
        d.submit(VIRTIO_BLK_T_FLUSH)
        d.run()
        assert eventfd_count(d.call) == 1
        assert not d.queues[0].event_idx and d.device.features() >> VIRTIO_RING_F_EVENT_IDX & 1
    finally:
        d.close()
        d.device.close()


def test_wraparound(image: Path) -> None:
    d = BlkDriver(BlkDevice(open_image(str(image))), num=8)
    try:
        vq, ring = d.queues[0], d.rings[0]
        vq.stop()
        base = 0xFFFD
        ring.avail_idx = base
        ring.set_avail_idx(base)
        ring.set_used_idx(base)
        vq.set_base(base)
        vq.start()
        for round_ in range(3):
            heads = [
                d.submit(VIRTIO_BLK_T_IN, i + round_, read_len=512, layout="indirect")[0]
                for i in range(6)
            ]
            results = d.run()
            assert sorted(results) == sorted(heads)
            assert all(st == VIRTIO_BLK_S_OK for st, _ in results.values())
        assert vq.get_base() == (base + 18) & 0xFFFF
        assert ring.used_idx() == (base + 18) & 0xFFFF
    finally:
        d.close()
        d.device.close()


def test_multiqueue(image: Path) -> None:
    d = BlkDriver(BlkDevice(open_image(str(image)), num_queues=4))
    try:
        for q in range(4):
            status, _, data = d.one(VIRTIO_BLK_T_IN, q, read_len=512, queue=q)
            assert status == VIRTIO_BLK_S_OK
            assert d.ram.read(data, 512) == file_bytes(image, q * 512, 512)
    finally:
        d.close()
        d.device.close()
    with pytest.raises(ValueError, match="num_queues"):
        BlkDevice(ram_disk(4096), num_queues=17)


def test_broken_queue_does_not_crash_device(drv: BlkDriver) -> None:
    hdr = drv.buffer(struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0))
    ring = drv.rings[0]
    ring.write_desc(0, hdr, 16, 1, 1)  # NEXT -> 1
    ring.write_desc(1, hdr, 16, 1, 0)  # NEXT -> 0: a loop
    ring.publish(0)
    drv.device.handle_queue(drv.queues[0])
    drv.queues[0].wait_idle(10)
    assert drv.queues[0].broken and "loops" in drv.queues[0].broken_reason
    assert ring.used_idx() == 0


# ---------------------------------------------------------------- config, features


def test_features(drv: BlkDriver) -> None:
    f = drv.device.features()
    for bit in (32, 28, 29, 1, 2, 6, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_CONFIG_WCE,
                VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES):
        assert f >> bit & 1, bit
    assert not f >> VIRTIO_BLK_F_RO & 1
    assert drv.device.protocol_features() == (1 << 9) | 1


def test_config_space(image: Path) -> None:
    dev = BlkDevice(open_image(str(image)), num_queues=3, blk_size=4096)
    try:
        cfg = dev.get_config(0, 60)
        assert struct.unpack_from("<Q", cfg, CFG_CAPACITY)[0] == SECTORS
        assert struct.unpack_from("<I", cfg, CFG_BLK_SIZE)[0] == 4096
        assert struct.unpack_from("<I", cfg, CFG_SEG_MAX)[0] == 126
        assert struct.unpack_from("<H", cfg, CFG_NUM_QUEUES)[0] == 3
        assert cfg[CFG_WRITEBACK] == 1
        assert dev.get_config(CFG_NUM_QUEUES, 2) == b"\x03\x00"
        assert dev.get_config(60, 12) == bytes(12)
        dev.set_config(CFG_WRITEBACK, b"\x00", 0)
        assert dev.get_config(CFG_WRITEBACK, 1) == b"\x00"
        with pytest.raises(DeviceConfigError, match="only the writeback"):
            dev.set_config(CFG_CAPACITY, b"\xff" * 8, 0)
        with pytest.raises(DeviceConfigError):
            dev.get_config(250, 10)
        # Without CONFIG_WCE the cache mode follows FLUSH (the config byte, meaningful only
        # with CONFIG_WCE, stays what the guest set: QEMU caches it).
        dev.set_features(1 << VIRTIO_BLK_F_FLUSH)
        assert dev.writeback
        dev.set_features(0)
        assert not dev.writeback
        assert dev.get_config(CFG_WRITEBACK, 1) == b"\x00"
    finally:
        dev.close()


def test_writethrough_write_still_lands(drv: BlkDriver, image: Path) -> None:
    drv.device.set_config(CFG_WRITEBACK, b"\x00", 0)
    payload = pattern(512, seed=5)
    assert drv.one(VIRTIO_BLK_T_OUT, 1, payload=payload)[0] == VIRTIO_BLK_S_OK
    assert file_bytes(image, 512, 512) == payload


def test_thread_mode_stop_reports_inflight_without_waiting(image: Path) -> None:
    """stop() never blocks the caller (the event loop); it says whether requests are still in
    flight, and once idle() every completion is in the ring (what GET_VRING_BASE awaits)."""
    d = BlkDriver(BlkDevice(open_image(str(image)), io_mode="thread", io_threads=2), num=256)
    try:
        heads = [
            d.submit(VIRTIO_BLK_T_IN, 8 * i, read_len=4096, layout="indirect")[0]
            for i in range(200)
        ]
        d.device.handle_queue(d.queues[0])
        idle = d.queues[0].stop()  # what GET_VRING_BASE does
        assert idle == d.queues[0].idle()
        assert d.queues[0].wait_idle(timeout=10.0)
        assert d.queues[0].idle() and d.queues[0].inflight == 0
        assert d.rings[0].used_idx() == 200  # every completion is in the ring already
        assert d.queues[0].get_base() == 200
        used = dict(d.rings[0].take_used())
        assert sorted(used) == sorted(heads) and set(used.values()) == {4097}
    finally:
        d.close()
        d.device.close()


def test_unknown_io_mode() -> None:
    with pytest.raises(ValueError, match="io_mode"):
        BlkDevice(ram_disk(4096), io_mode="aio")


def test_constructors(image: Path) -> None:
    dev = BlkDevice.from_file(str(image), readonly=True, num_queues=2, serial="abc")
    try:
        assert dev.readonly and dev.num_queues == 2 and dev.capacity == SECTORS
        assert dev.serial.rstrip(b"\0") == b"abc"
    finally:
        dev.close()
    dev = BlkDevice.from_ram(8 * DISK)
    try:
        assert not dev.readonly and dev.capacity == 8 * SECTORS
    finally:
        dev.close()
    with pytest.raises(FileNotFoundError):
        BlkDevice.from_file(str(image) + ".missing")
