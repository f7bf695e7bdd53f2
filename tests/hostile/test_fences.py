"""The fences the hostile suite relies on are real: PROT_NONE around guest regions, canaries in
the memfds, and bounds checks that reject a view outside its region."""

from __future__ import annotations

import os

import pytest

from tests.hostile.env import guarded_ram
from tests.hostile.guarded import GUARD, GuardedRegion
from vhostmem import bounds
from vhostmem.guest_memory import GuestMemory
from vhostmem.memmap import MemRegistry
from vhostmem.virtqueue import DescChain, Virtqueue

REGION_SIZE = 1 << 20


def mapping_at(addr: int) -> str:
    """The permission string of the mapping holding ``addr`` in this process."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= addr < hi:
                return perms
    return ""


def test_guest_regions_sit_between_prot_none_guards() -> None:
    ram = guarded_ram()
    try:
        for r in ram.regions:
            assert isinstance(r, GuardedRegion)
            assert mapping_at(r.host_addr) == "rw-s"
            assert mapping_at(r.host_addr - 1) == "---p"
            assert mapping_at(r.host_addr + r.memory_size) == "---p"
            assert mapping_at(r.host_addr - GUARD) == "---p"
            assert mapping_at(r.host_addr + r.memory_size + GUARD - 1) == "---p"
    finally:
        ram.close()


def test_canaries_detect_a_write_outside_the_region() -> None:
    ram = guarded_ram()
    try:
        assert ram.damaged_guards() == []
        region = ram.regions[1]
        os.pwrite(region.fd, b"x", GUARD + region.memory_size)  # first byte after the region
        assert ram.damaged_guards() == [region.guest_phys_addr]
    finally:
        ram.close()


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory(MemRegistry())
    fd = os.memfd_create("bounds-test")
    os.ftruncate(fd, 2 * REGION_SIZE)
    # mmap_offset not at the mapping start: the slack below it is not guest memory
    mem.add_region(0x10000, REGION_SIZE, 0x7000_0000, 0x800, fd)
    return mem


def test_bounds_checks_pass_views_inside_a_region(memory: GuestMemory) -> None:
    assert bounds.enabled
    views = memory.translate(0x10000, REGION_SIZE)
    assert sum(len(v) for v in views) == REGION_SIZE
    assert len(memory.view(0x10000 + REGION_SIZE - 16, 16)) == 16
    memory.close()


def test_bounds_checks_reject_a_view_outside_its_region(memory: GuestMemory) -> None:
    region = memory.regions[0]
    assert region.view is not None
    slack = region.view[:16]  # the bytes below mmap_offset, mapped but not guest memory
    before = len(bounds.violations)
    with pytest.raises(AssertionError, match="outside"):
        bounds.check_views(memory, 0x10000, 16, [slack])
    with pytest.raises(AssertionError, match="not inside one region"):
        bounds.check_views(memory, 0x10000 + REGION_SIZE - 8, 16, [slack])
    with pytest.raises(AssertionError, match="cover"):
        bounds.check_views(memory, 0x10000, 32, memory.translate(0x10000, 16))
    assert len(bounds.violations) == before + 3
    del bounds.violations[before:]
    slack.release()
    memory.close()


def test_the_server_translates_through_the_checked_methods() -> None:
    assert hasattr(GuestMemory.translate, "__wrapped__")
    assert hasattr(GuestMemory.view, "__wrapped__")
    assert hasattr(Virtqueue._walk, "__wrapped__")  # chains, fast path included


def test_chain_check_rejects_a_buffer_in_the_slack(memory: GuestMemory) -> None:
    """The chain check sees views the walk sliced itself (its region-cache fast path)."""
    region = memory.regions[0]
    assert region.view is not None
    inside, slack = region.view[0x800:0x810], region.view[:16]
    vq = Virtqueue(3, memory)
    before = len(bounds.violations)
    bounds.check_chain(vq, DescChain(7, [inside], 16, [], 0))  # guest bytes: fine
    with pytest.raises(AssertionError, match="queue 3 chain 7 buffer 1"):
        bounds.check_chain(vq, DescChain(7, [inside], 16, [slack], 16))
    assert len(bounds.violations) == before + 1
    del bounds.violations[before:]
    inside.release()
    slack.release()
    vq.close()
    memory.close()
