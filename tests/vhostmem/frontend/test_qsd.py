"""The frontend against a real qemu-storage-daemon vhost-user-blk export."""

from __future__ import annotations

import os
import random

import pytest

from protocol import BlkFeature, ProtocolFeature, VirtioFeature
from tests.peers import QSD_SERIAL
from vhostmem.frontend.blk import (
    CONFIG_FIELDS,
    INDIRECT,
    MERGED,
    SECTOR_SIZE,
    STANDARD,
    BlkStatus,
    BlkType,
    Layout,
    blk_header,
)
from vhostmem.frontend.device import VhostUserBlk
from vhostmem.frontend.loadgen import random_reads
from vhostmem.frontend.memory import PAGE_SIZE, GuestRam
from vhostmem.frontend.ring import VIRTQ_DESC_F_WRITE

pytestmark = pytest.mark.qsd

MIB = 1 << 20
LAYOUTS = {
    "standard": STANDARD,
    "merged-2": MERGED,
    "data-split-4": Layout(data_chunks=4),
    "header-split": Layout(header_chunks=2, data_chunks=3),
    "merged-split": Layout(data_chunks=5, merge_header=True, merge_status=True),
    "indirect": INDIRECT,
    "indirect-merged": MERGED.with_indirect(),
    "indirect-split-8": Layout(data_chunks=8, header_chunks=2, indirect=True),
}


def _image(handle, offset: int, length: int) -> bytes:
    with open(handle.image_path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _bit(value: int, bit: int) -> bool:
    return bool(value >> bit & 1)


def test_negotiation_matches_what_qsd_offers(qsd) -> None:
    peer = qsd(num_queues=2)
    with VhostUserBlk.open(peer.socket_path) as dev:
        offered, acked = dev.offer.features, dev.client.features
        for bit in (VirtioFeature.VERSION_1, VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES,
                    BlkFeature.FLUSH, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES,
                    BlkFeature.MQ, VirtioFeature.EVENT_IDX, VirtioFeature.INDIRECT_DESC):
            assert _bit(offered, bit) and _bit(acked, bit), bit
        assert acked & ~offered == 0
        proto = dev.client.protocol_features
        assert _bit(proto, ProtocolFeature.CONFIG) and _bit(proto, ProtocolFeature.REPLY_ACK)
        assert _bit(proto, ProtocolFeature.CONFIGURE_MEM_SLOTS)
        assert proto & ~dev.offer.protocol_features == 0
        assert dev.offer.queue_num == 2
        assert dev.offer.max_mem_slots >= len(dev.ram.regions)


def test_config_capacity_matches_image(qsd) -> None:
    peer = qsd(size=24 * MIB, num_queues=2)
    with VhostUserBlk.open(peer.socket_path) as dev:
        cfg = dev.config()
        assert cfg["capacity"] == os.path.getsize(peer.image_path) // SECTOR_SIZE
        assert cfg["num_queues"] == 2 and cfg["blk_size"] == SECTOR_SIZE


@pytest.mark.parametrize("mem", ["table", "slots"])
def test_read_write_byte_for_byte(qsd, mem: str) -> None:
    peer = qsd()
    rng = random.Random(7)
    with VhostUserBlk.open(peer.socket_path, mem=mem) as dev:
        q = dev.start_queue(0)
        for _ in range(8):
            sector, length = rng.randrange(0, 30000), SECTOR_SIZE * rng.randrange(1, 64)
            assert q.read(sector, length) == peer.initial[sector * 512:sector * 512 + length]
        data = rng.randbytes(64 * 1024)
        q.write(100, data)
        q.flush()
        assert _image(peer, 100 * SECTOR_SIZE, len(data)) == data
        assert q.read(100, len(data)) == data


def test_get_id_returns_qsd_serial(qsd) -> None:
    with VhostUserBlk.open(qsd().socket_path) as dev:
        assert dev.start_queue(0).get_id() == QSD_SERIAL


def test_discard_and_write_zeroes(qsd) -> None:
    peer = qsd()
    with VhostUserBlk.open(peer.socket_path) as dev:
        q = dev.start_queue(0)
        q.write_zeroes(64, 8)
        assert _image(peer, 64 * 512, 8 * 512) == bytes(8 * 512)
        assert _image(peer, 72 * 512, 512) == peer.initial[72 * 512:73 * 512]
        q.write_zeroes(200, 16, unmap=True)
        assert q.read(200, 16 * 512) == bytes(16 * 512)
        q.discard(1024, 2048)  # 1 MiB, aligned: punched as a hole in the image
        assert _image(peer, 1024 * 512, MIB) == bytes(MIB)
        assert _image(peer, 3072 * 512, 512) == peer.initial[3072 * 512:3073 * 512]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_descriptor_layout(qsd, name: str) -> None:
    peer, layout = qsd(), LAYOUTS[name]
    with VhostUserBlk.open(peer.socket_path) as dev:
        q = dev.start_queue(0)
        assert q.read(8, 4096, layout) == peer.initial[8 * 512:8 * 512 + 4096]
        data = os.urandom(8192)
        q.write(40, data, layout)
        assert _image(peer, 40 * 512, 8192) == data
        q.flush(layout)
        assert q.get_id(layout) == QSD_SERIAL


def test_single_descriptor_request_is_not_completed_ok(qsd) -> None:
    """Header and status in one descriptor is illegal; qsd must not report success."""
    peer = qsd()
    with VhostUserBlk.open(peer.socket_path) as dev:
        q = dev.start_queue(0)
        req = q.submit(BlkType.IN, 0, in_len=512, layout=Layout(single=True))
        with pytest.raises(TimeoutError):
            q.wait_for(req, timeout=0.5)
        assert req.status != BlkStatus.OK


@pytest.mark.parametrize("event_idx", [True, False])
def test_event_idx_on_and_off(qsd, event_idx: bool) -> None:
    peer = qsd()
    with VhostUserBlk.open(peer.socket_path, event_idx=event_idx) as dev:
        assert dev.has_feature(VirtioFeature.EVENT_IDX) is event_idx
        q = dev.start_queue(0)
        assert q.ring.event_idx is event_idx
        for rounds in range(1, 4):
            reqs = [q.prepare(BlkType.IN, 8 * k, in_len=4096) for k in range(16)]
            q.notify()
            for req in reqs:
                q.wait_for(req)
                assert req.status == BlkStatus.OK
            assert q.ring.last_used == 16 * rounds
        if event_idx:  # the device announces where it wants the next kick
            assert q.ring.avail_event == q.ring.published
        else:
            assert q.ring.avail_event == 0 and q.kicks == 3


def test_two_queues_in_parallel(qsd) -> None:
    peer = qsd(num_queues=2)
    with VhostUserBlk.open(peer.socket_path) as dev:
        q0, q1 = dev.start_queue(0), dev.start_queue(1)
        a = [q0.prepare(BlkType.IN, 16 * k, in_len=4096) for k in range(8)]
        b = [q1.prepare(BlkType.IN, 16 * k + 4096, in_len=4096) for k in range(8)]
        q0.notify()
        q1.notify()
        for k, (ra, rb) in enumerate(zip(a, b, strict=True)):
            q0.wait_for(ra)
            q1.wait_for(rb)
            off_a, off_b = 16 * k * 512, (16 * k + 4096) * 512
            assert dev.ram.read(ra.in_gpa, 4096) == peer.initial[off_a:off_a + 4096]
            assert dev.ram.read(rb.in_gpa, 4096) == peer.initial[off_b:off_b + 4096]


@pytest.mark.parametrize("mem", ["table", "slots"])
def test_buffer_crossing_two_regions_with_synthetic_addresses(qsd, mem: str) -> None:
    """Two gpa-contiguous regions whose userspace_addr values are made up and far apart (and the
    second mapped at a nonzero memfd offset); one descriptor spans the boundary."""
    peer = qsd()
    ram = GuestRam()
    ram.add_region(0, 4 * MIB, userspace_addr=0x5550_0000_0000)
    ram.add_region(4 * MIB, 4 * MIB, userspace_addr=0x7770_0000_0000, mmap_offset=PAGE_SIZE)
    with ram, VhostUserBlk.open(peer.socket_path, ram=ram, mem=mem) as dev:
        q = dev.start_queue(0, depth=4)
        data_gpa = ram.reserve(4 * MIB - 3000, 8192)
        hdr, status = ram.alloc(16), ram.alloc(1, region=ram.regions[1])
        ram.write(hdr, blk_header(BlkType.IN, 24))
        req = q.prepare_chain([(hdr, 16, 0), (data_gpa, 8192, VIRTQ_DESC_F_WRITE),
                               (status, 1, VIRTQ_DESC_F_WRITE)], status_gpa=status)
        q.notify()
        q.wait_for(req)
        assert req.status == BlkStatus.OK and req.used_len >= 8193 - 1
        assert ram.read(data_gpa, 8192) == peer.initial[24 * 512:24 * 512 + 8192]
        new = os.urandom(8192)
        ram.write(data_gpa, new)
        ram.write(hdr, blk_header(BlkType.OUT, 24))
        # Direct chain: QEMU 7.2's libvhost-user counts iovecs against an indirect table's
        # length, so a region-crossing buffer inside an indirect table panics it.
        req = q.prepare_chain([(hdr, 16, 0), (data_gpa, 5000, 0), (data_gpa + 5000, 3192, 0),
                               (status, 1, VIRTQ_DESC_F_WRITE)], status_gpa=status)
        q.notify()
        q.wait_for(req)
        assert req.status == BlkStatus.OK and _image(peer, 24 * 512, 8192) == new


def test_stop_with_get_vring_base_and_resume(qsd) -> None:
    peer = qsd()
    with VhostUserBlk.open(peer.socket_path) as dev:
        q = dev.start_queue(0)
        for k in range(5):
            q.read(k, 512)
        base = dev.stop_queue(0)
        assert base == 5 == q.ring.published
        dev.resume_queue(0, base)
        assert q.read(3, 512) == peer.initial[3 * 512:4 * 512]
        assert dev.stop_queue(0) == 6


def test_add_and_remove_memory_region(qsd) -> None:
    peer = qsd()
    with VhostUserBlk.open(peer.socket_path, mem="slots") as dev:
        q = dev.start_queue(0)
        extra = dev.ram.add_region(256 * MIB, MIB, userspace_addr=0x6660_0000_0000)
        dev.add_region(extra)
        buf = dev.ram.alloc(4096, region=extra)
        hdr, status = dev.ram.alloc(16), dev.ram.alloc(1)
        dev.ram.write(hdr, blk_header(BlkType.IN, 0))
        req = q.prepare_chain([(hdr, 16, 0), (buf, 4096, VIRTQ_DESC_F_WRITE),
                               (status, 1, VIRTQ_DESC_F_WRITE)], status_gpa=status)
        q.notify()
        assert q.wait_for(req).status == BlkStatus.OK
        assert dev.ram.read(buf, 4096) == peer.initial[:4096]
        dev.remove_region(extra)  # REPLY_ACK 0 or VhostUserError
        assert q.read(0, 512) == peer.initial[:512]


def test_reconnect_after_disconnect(qsd) -> None:
    peer = qsd()
    data = os.urandom(4096)
    with VhostUserBlk.open(peer.socket_path) as dev:
        dev.start_queue(0).write(8, data)
    for _ in range(2):
        with VhostUserBlk.open(peer.socket_path, mem="slots") as dev:
            assert dev.start_queue(0).read(8, 4096) == data
    assert peer.alive()


def test_read_past_capacity_is_an_io_error(qsd) -> None:
    peer = qsd(size=MIB)
    with VhostUserBlk.open(peer.socket_path) as dev:
        status, _ = dev.start_queue(0).run(BlkType.IN, MIB // 512, in_len=512)
        assert status == BlkStatus.IOERR


async def test_async_wait(qsd) -> None:
    peer = qsd()
    with VhostUserBlk.open(peer.socket_path) as dev:
        q = dev.start_queue(0)
        req = q.submit(BlkType.IN, 2, in_len=1024)
        done = []
        while not req.done:
            done += await q.wait_async(5.0)
        assert req in done and dev.ram.read(req.in_gpa, 1024) == peer.initial[1024:2048]


def test_set_config_writeback(qsd) -> None:
    with VhostUserBlk.open(qsd().socket_path) as dev:
        offset = CONFIG_FIELDS["writeback"][0]
        for value in (1, 0):
            dev.client.set_config(offset, bytes([value]))
            assert dev.config()["writeback"] == value


def test_open_close_leaks_no_fd_and_returns_shared_ram(qsd) -> None:
    peer = qsd()
    with GuestRam() as ram:
        ram.add_region(0, 32 * MIB)
        before_fds = len(os.listdir("/proc/self/fd"))
        free_before = ram.free_bytes()
        for mem in ("table", "slots"):
            with VhostUserBlk.open(peer.socket_path, ram=ram, mem=mem) as dev:
                dev.start_queue(0, depth=8).read(0, 512)
        assert len(os.listdir("/proc/self/fd")) == before_fds
        assert ram.free_bytes() == free_before


@pytest.mark.parametrize(("size", "qd", "layout"), [(256, 32, STANDARD), (128, 128, INDIRECT)])
def test_load_generator_batches_kicks(qsd, size: int, qd: int, layout: Layout) -> None:
    """A full ring with EVENT_IDX is where a missing store-load barrier loses a wakeup."""
    peer = qsd()
    with VhostUserBlk.open(peer.socket_path) as dev:
        q = dev.start_queue(0, size=size, depth=qd, max_data=4096)
        result = random_reads(q, dev.config()["capacity"], qd=qd, seconds=1.0, layout=layout)
        assert result.ops > qd and result.kicks < result.ops
        assert q.in_flight == 0 and q.read(0, 512) == peer.initial[:512]
