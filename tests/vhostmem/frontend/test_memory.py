"""Guest RAM: memfd regions, byte access across regions, the allocator."""

import fcntl
import mmap
import os

import pytest

from vhostmem.frontend.memory import PAGE_SIZE, GuestRam, GuestRamError

MIB = 1 << 20


def test_region_is_shared_memfd_visible_through_its_fd() -> None:
    with GuestRam() as ram:
        region = ram.add_region(0x100000, MIB)
        ram.write(0x100010, b"hello")
        other = mmap.mmap(region.fd, MIB)
        try:
            assert other[0x10:0x15] == b"hello"
        finally:
            other.close()
        assert region.userspace_addr == region.host_addr != 0


def test_mmap_offset_maps_the_tail_of_the_memfd() -> None:
    with GuestRam() as ram:
        region = ram.add_region(0, 2 * PAGE_SIZE, mmap_offset=PAGE_SIZE, userspace_addr=0xDEAD000)
        ram.write(5, b"x")
        assert os.pread(region.fd, 1, PAGE_SIZE + 5) == b"x"
        assert os.fstat(region.fd).st_size == 3 * PAGE_SIZE
        assert ram.host_address(16) == 0xDEAD000 + 16


def test_read_write_cross_touching_regions() -> None:
    with GuestRam() as ram:
        ram.add_region(0, PAGE_SIZE)
        ram.add_region(PAGE_SIZE, PAGE_SIZE)
        data = bytes(range(200))
        ram.write(PAGE_SIZE - 100, data)
        assert ram.read(PAGE_SIZE - 100, 200) == data
        with pytest.raises(GuestRamError, match="not inside one guest region"):
            ram.locate(PAGE_SIZE - 100, 200)


def test_bad_regions_are_rejected_and_leak_no_fd() -> None:
    before = len(os.listdir("/proc/self/fd"))
    with GuestRam() as ram:
        ram.add_region(0, PAGE_SIZE)
        with pytest.raises(GuestRamError, match="overlaps"):
            ram.add_region(0, 2 * PAGE_SIZE)
        with pytest.raises(GuestRamError, match="multiple"):
            ram.add_region(8 * PAGE_SIZE, 100)
        with pytest.raises(GuestRamError, match="page aligned"):
            ram.add_region(8 * PAGE_SIZE + 1, PAGE_SIZE)
    assert len(os.listdir("/proc/self/fd")) == before


def test_allocator_aligns_reuses_and_never_spans_regions() -> None:
    with GuestRam() as ram:
        ram.add_region(0, PAGE_SIZE)
        ram.add_region(PAGE_SIZE, PAGE_SIZE)
        a = ram.alloc(PAGE_SIZE - 64)
        b = ram.alloc(128, 64)  # does not fit in region 0's tail: goes to region 1
        assert a == 0 and b == PAGE_SIZE
        ram.free(a)
        assert ram.alloc(PAGE_SIZE) == 0  # coalesced back into one extent
        with pytest.raises(GuestRamError, match="no free guest memory"):
            ram.alloc(PAGE_SIZE)
        with pytest.raises(GuestRamError, match="not allocated"):
            ram.free(123)


def test_reserve_across_regions_and_release_splits_at_boundary() -> None:
    with GuestRam() as ram:
        ram.add_region(0, PAGE_SIZE)
        ram.add_region(PAGE_SIZE, PAGE_SIZE)
        gpa = ram.reserve(PAGE_SIZE - 512, 1024)
        with pytest.raises(GuestRamError, match="not free"):
            ram.reserve(PAGE_SIZE - 16, 8)
        ram.free(gpa)
        assert ram.alloc(PAGE_SIZE) == 0 and ram.alloc(PAGE_SIZE) == PAGE_SIZE


def test_remove_region_unmaps_and_forgets_allocations() -> None:
    with GuestRam() as ram:
        region = ram.add_region(0, PAGE_SIZE)
        ram.alloc(64)
        ram.remove_region(0)
        assert region.fd == -1 and ram.regions == []
        with pytest.raises(GuestRamError):
            ram.read(0, 1)


@pytest.mark.parametrize("sealed", [True, False])
def test_regions_are_size_sealed_like_qemu_memfds(sealed: bool) -> None:
    with GuestRam(sealed=sealed) as ram:
        region = ram.add_region(0, MIB)
        seals = fcntl.fcntl(region.fd, fcntl.F_GET_SEALS)
        assert bool(seals & fcntl.F_SEAL_SHRINK) is sealed
        assert bool(seals & fcntl.F_SEAL_GROW) is sealed
        if sealed:
            with pytest.raises(PermissionError):
                os.ftruncate(region.fd, PAGE_SIZE)
        assert os.fstat(region.fd).st_size == MIB
