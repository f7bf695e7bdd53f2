"""GuestMemory with real memfds, a real MemRegistry and leak checks on /proc/self."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostmem.guest_memory import GuestMemory, GuestMemoryError, shrink_sealed
from vhostmem.memmap import MemRegistry

MIB = 1 << 20
PAGE = 4096
GPA_A = 0x1000_0000
GPA_B = GPA_A + MIB  # directly after A: buffers can cross from A into B
UVA_A = 0x7F00_0000_0000
UVA_B = 0x7F10_0000_0000


def memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("test-region")
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def map_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def registry() -> MemRegistry:
    return MemRegistry()


@pytest.fixture
def two_regions(registry: MemRegistry) -> Iterator[tuple[GuestMemory, int, int]]:
    """Regions A and B back to back; returns the memory and the test's own fds."""
    a, b = memfd(MIB, b"A" * MIB), memfd(MIB, b"B" * MIB)
    mem = GuestMemory(registry)
    mem.add_region(GPA_A, MIB, UVA_A, 0, os.dup(a))
    mem.add_region(GPA_B, MIB, UVA_B, 0, os.dup(b))
    yield mem, a, b
    mem.close()
    os.close(a)
    os.close(b)


def test_translate_within_region_is_zero_copy(two_regions: tuple[GuestMemory, int, int]) -> None:
    mem, a, _ = two_regions
    (view,) = mem.translate(GPA_A + 100, 10)
    assert bytes(view) == b"A" * 10
    view[:] = b"0123456789"
    assert os.pread(a, 10, 100) == b"0123456789"  # the view is the shared memory itself


def test_translate_across_regions_splits(two_regions: tuple[GuestMemory, int, int]) -> None:
    mem, _, _ = two_regions
    views = mem.translate(GPA_B - 3, 7)
    assert [bytes(v) for v in views] == [b"AAA", b"BBBB"]


def test_zero_length_is_empty(two_regions: tuple[GuestMemory, int, int]) -> None:
    mem, _, _ = two_regions
    assert mem.translate(GPA_A, 0) == []
    assert mem.translate(0xDEAD_0000, 0) == []


@pytest.mark.parametrize(
    ("gpa", "length", "words"),
    [
        (0x2000, 16, "0x2000 is not in guest memory"),  # below every region
        (GPA_B + MIB - 8, 16, f"{GPA_B + MIB:#x} is not in guest memory"),  # straddles the end
        ((1 << 64) - 8, 16, "wraps past 2\\^64"),
        ((1 << 48) - 8, 16, "beyond 2\\^48"),
        (-4096, 16, "wraps"),
    ],
)
def test_translate_errors(
    two_regions: tuple[GuestMemory, int, int], gpa: int, length: int, words: str
) -> None:
    mem, _, _ = two_regions
    with pytest.raises(GuestMemoryError, match=words):
        mem.translate(gpa, length)


def test_view_is_single_region_only(two_regions: tuple[GuestMemory, int, int]) -> None:
    mem, _, _ = two_regions
    assert bytes(mem.view(GPA_B, 4)) == b"BBBB"
    with pytest.raises(GuestMemoryError, match="not inside one"):
        mem.view(GPA_B - 2, 4)


def test_uva_to_gpa(two_regions: tuple[GuestMemory, int, int]) -> None:
    mem, _, _ = two_regions
    assert mem.uva_to_gpa(UVA_B + 0x123) == GPA_B + 0x123
    with pytest.raises(GuestMemoryError, match=f"{UVA_A + MIB:#x}"):
        mem.uva_to_gpa(UVA_A + MIB)


def test_unaligned_mmap_offset(registry: MemRegistry) -> None:
    data = bytes(range(256)) * 64
    fd = memfd(4 * 4096, data)
    mem = GuestMemory(registry)
    try:
        mem.add_region(GPA_A, 4096, UVA_A, 4096 + 100, os.dup(fd))
        assert bytes(mem.translate(GPA_A, 16)[0]) == data[4196 : 4196 + 16]
        assert bytes(mem.translate(GPA_A + 4090, 6)[0]) == data[4096 + 100 + 4090 :][:6]
        with pytest.raises(GuestMemoryError):
            mem.translate(GPA_A + 4090, 7)
    finally:
        mem.close()
        os.close(fd)
    assert registry.chunks() == []


@pytest.mark.parametrize(
    ("gpa", "size", "words"),
    [
        (GPA_A + 1, MIB, "aligned"),
        (GPA_A, MIB - 1, "aligned"),
        (GPA_A, 0, "positive"),
        ((1 << 48) - 4096, 8192, "48-bit"),
        (GPA_A, 2 * MIB, "mmap of fd"),  # larger than the 1 MiB file
    ],
)
def test_bad_region_is_rejected_and_fd_closed(
    registry: MemRegistry, gpa: int, size: int, words: str
) -> None:
    fd = memfd(MIB)
    mem = GuestMemory(registry)
    try:
        dup = os.dup(fd)
        with pytest.raises(GuestMemoryError, match=words):
            mem.add_region(gpa, size, UVA_A, 0, dup)
        assert not fd_is_open(dup)
        assert mem.regions == [] and registry.chunks() == []
    finally:
        mem.close()
        os.close(fd)


def test_overlap_is_rejected(two_regions: tuple[GuestMemory, int, int]) -> None:
    mem, a, _ = two_regions
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add_region(GPA_A + 4096, 4096, UVA_A, 0, os.dup(a))


def test_remove_region(two_regions: tuple[GuestMemory, int, int], registry: MemRegistry) -> None:
    mem, _, _ = two_regions
    mem.remove_region(GPA_A, MIB, UVA_A)
    with pytest.raises(GuestMemoryError):
        mem.translate(GPA_A, 1)
    assert bytes(mem.translate(GPA_B, 1)[0]) == b"B"
    assert len(registry.chunks()) == 1
    with pytest.raises(GuestMemoryError, match="no region"):
        mem.remove_region(GPA_A, MIB, UVA_A)
    mem.remove_region(GPA_B, MIB, UVA_B)
    assert registry.chunks() == []


def test_set_table_replaces(
    two_regions: tuple[GuestMemory, int, int], registry: MemRegistry
) -> None:
    mem, _, b = two_regions
    mem.set_table([(0x8000_0000, MIB, UVA_A, 0, os.dup(b))])
    assert [r.guest_phys_addr for r in mem.regions] == [0x8000_0000]
    assert bytes(mem.translate(0x8000_0000, 2)[0]) == b"BB"
    with pytest.raises(GuestMemoryError):
        mem.translate(GPA_A, 1)
    assert len(registry.chunks()) == 1
    mem.clear()
    assert registry.chunks() == [] and mem.regions == []


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ((GPA_B + 1, MIB, UVA_B, 0), "aligned"),
        ((0x4000_0000 + MIB // 2, MIB, UVA_B, 0), "overlaps"),  # the table's first region
        ((0x8000_0000, MIB, UVA_B, 2 * MIB), "mmap of fd"),  # offset beyond the fd's size
    ],
)
def test_a_bad_table_keeps_the_old_one_and_closes_fds(
    two_regions: tuple[GuestMemory, int, int], registry: MemRegistry,
    bad: tuple[int, int, int, int], match: str,
) -> None:
    mem, _, _ = two_regions
    before_regions, before_chunks = mem.regions, registry.chunks()
    old = mem.translate(GPA_A, 16)[0].tobytes()
    fd = memfd(MIB)
    dups = [os.dup(fd) for _ in range(3)]
    maps = map_count()
    try:
        with pytest.raises(GuestMemoryError, match=match):
            mem.set_table([(0x4000_0000, MIB, UVA_A, 0, dups[0]), (*bad, dups[1]),
                           (0x9000_0000, MIB, UVA_B + MIB, 0, dups[2])])
        assert not any(fd_is_open(d) for d in dups)
        assert mem.regions == before_regions and registry.chunks() == before_chunks
        assert mem.translate(GPA_A, 16)[0].tobytes() == old  # still served
        assert map_count() == maps  # the new regions mapped before the error are gone
    finally:
        os.close(fd)


def test_connections_share_registry_but_not_translations(registry: MemRegistry) -> None:
    a, b = memfd(MIB, b"a" * 16), memfd(MIB, b"b" * 16)
    first = GuestMemory(registry)
    first.add_region(GPA_A, MIB, UVA_A, 0, os.dup(a))
    second = GuestMemory(registry)  # hears first's existing registration and ignores it
    second.add_region(GPA_A, MIB, UVA_A, 0, os.dup(b))  # same GPA, different memory
    try:
        assert bytes(first.translate(GPA_A, 4)[0]) == b"aaaa"
        assert bytes(second.translate(GPA_A, 4)[0]) == b"bbbb"
        assert len(registry.chunks()) == 2
        first.close()
        assert bytes(second.translate(GPA_A, 4)[0]) == b"bbbb"
    finally:
        first.close()
        second.close()
        os.close(a)
        os.close(b)
    assert registry.chunks() == []


def test_unmap_waits_for_views(registry: MemRegistry) -> None:
    fd = memfd(MIB, b"x" * 8)
    mem = GuestMemory(registry)
    mem.add_region(GPA_A, MIB, UVA_A, 0, os.dup(fd))
    maps_with = map_count()
    (view,) = mem.translate(GPA_A, 8)
    mem.remove_region(GPA_A, MIB, UVA_A)
    assert registry.chunks() == []  # unregistered at once: nothing translates into it
    assert mem.pending_unmaps == 1
    assert bytes(view) == b"x" * 8  # the view is still valid memory
    assert map_count() == maps_with
    del view
    assert mem.reap() == 0
    assert map_count() < maps_with
    mem.close()
    os.close(fd)


def test_no_fd_or_mapping_leak(registry: MemRegistry) -> None:
    fd = memfd(MIB)
    fds_before, maps_before = fd_count(), map_count()
    for _ in range(3):
        mem = GuestMemory(registry)
        mem.set_table([(GPA_A, MIB, UVA_A, 0, os.dup(fd)), (GPA_B, MIB, UVA_B, 0, os.dup(fd))])
        mem.translate(GPA_A, MIB + 4096)
        mem.add_region(0x8000_0000, MIB, UVA_A + 2 * MIB, 0, os.dup(fd))
        mem.remove_region(GPA_A, MIB, UVA_A)
        mem.set_table([(GPA_A, MIB, UVA_A, 0, os.dup(fd))])
        mem.clear()
        mem.add_region(GPA_A, MIB, UVA_A, 0, os.dup(fd))
        mem.close()
        assert mem.pending_unmaps == 0
    assert (fd_count(), map_count()) == (fds_before, maps_before)
    assert registry.chunks() == []
    os.close(fd)


def sealed_memfd(size: int) -> int:
    fd = os.memfd_create("test-sealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def test_shrink_sealed_tells_sealed_memfds_from_other_fds(tmp_path: Path) -> None:
    sealed, plain = sealed_memfd(MIB), memfd(MIB)
    with open(tmp_path / "ram.img", "wb") as f:
        f.truncate(MIB)
    file_fd = os.open(tmp_path / "ram.img", os.O_RDWR)
    try:
        assert shrink_sealed(sealed)
        assert not shrink_sealed(plain)
        assert not shrink_sealed(file_fd)  # a regular file cannot carry seals at all
        with pytest.raises(PermissionError):
            os.ftruncate(sealed, PAGE)  # the kernel refuses: no SIGBUS for whoever maps it
    finally:
        for fd in (sealed, plain, file_fd):
            os.close(fd)


def test_required_seal_refuses_a_shrinkable_fd_and_closes_it(registry: MemRegistry) -> None:
    mem = GuestMemory(registry, require_sealed=True)
    before = fd_count(), map_count()
    fd = memfd(MIB)
    with pytest.raises(GuestMemoryError, match=r"gpa=0x10000000: fd is not sealed against shrink"):
        mem.add_region(GPA_A, MIB, UVA_A, 0, fd)
    assert not fd_is_open(fd)
    assert mem.regions == []
    assert (fd_count(), map_count()) == before
    mem.add_region(GPA_A, MIB, UVA_A, 0, sealed_memfd(MIB))  # a sealed memfd is served
    assert [r.guest_phys_addr for r in mem.regions] == [GPA_A]
    mem.close()


def test_unsealed_fds_are_served_with_one_warning(
    registry: MemRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    mem = GuestMemory(registry)
    with caplog.at_level(logging.WARNING, logger="vhostmem.guest_memory"):
        mem.add_region(GPA_A, MIB, UVA_A, 0, memfd(MIB))
        mem.add_region(GPA_B, MIB, UVA_B, 0, memfd(MIB))
        mem.add_region(GPA_B + MIB, MIB, UVA_B + MIB, 0, sealed_memfd(MIB))
    warnings = [r.getMessage() for r in caplog.records if "not sealed" in r.getMessage()]
    assert len(warnings) == 1 and "gpa=0x10000000" in warnings[0]
    assert len(mem.regions) == 3
    mem.close()


def hugetlb_pool() -> tuple[int, int]:
    """(free huge pages, huge page size) of the default pool."""
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["HugePages_Free"]), int(info["Hugepagesize"].split()[0]) << 10


def test_hugetlb_memory_the_pool_cannot_back_is_refused_at_mmap(registry: MemRegistry) -> None:
    """Mapped with MAP_NORESERVE, a hugetlb page the pool lacks would SIGBUS on first touch;
    hugetlbfs regions are mapped with a reservation, so the shortfall is a clean error."""
    free, page = hugetlb_pool()
    size = (free + 1) * page  # one page more than the pool has
    before = fd_count(), map_count()
    fd = os.memfd_create("test-huge", os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    mem = GuestMemory(registry, require_sealed=True)  # sealed, so the seal check passes
    with pytest.raises(GuestMemoryError, match=r"mmap of fd .* Cannot allocate memory"):
        mem.add_region(GPA_A, size, UVA_A, 0, fd)
    assert not fd_is_open(fd)
    assert mem.regions == [] and registry.chunks() == []
    assert (fd_count(), map_count()) == before
    mem.close()
