"""A backend killed at any instant of packed inflight tracking leaves a region that recovery
accepts and resolves correctly (vhost-user.rst, "Inflight I/O tracking", packed procedure).

The ring runs for real (PackedVirtqueue, guest RAM, a memfd region); the tracker's views of the
region are wrapped so that every store it makes is preceded and followed by an image of the
region and of the ring: each image is what a SIGKILL at that instant leaves behind (stores are
whole aligned words, seen whole). Each image is recovered in a fresh region and judged against
the ring as the guest sees it: every completion whose used flags the guest can see is not
resubmitted and counts in the used position; every other buffer is either resubmitted with its
own descriptors or still available in the ring, in order, from the recovered avail position.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.vhostmem.ringhelpers import PDESC
from tests.vhostmem.test_inflight_packed import NUM, Guest, start_backend
from vhostmem.inflight import InflightRegion, create_inflight_fd
from vhostmem.inflight_packed import (
    PACKED_LAYOUT,
    RING_DESC,
    WRAP_FLAGS,
    PackedInflightQueue,
    available_flags,
)
from vhostmem.packed_ring import BASE_USED_SHIFT, WRAP_SHIFT

# Where the test ring starts: two descriptors before the end of lap 1, so chains wrap.
START_POS, START_WRAP = NUM - 2, 1


@dataclass
class Image:
    region: bytes
    ring: bytes
    at: str


class Recording:
    """A view of the region whose every store is bracketed by images (region and ring)."""

    def __init__(self, view: memoryview, snap: Any) -> None:
        self._view, self._snap = view, snap

    def __getitem__(self, key: Any) -> Any:
        return self._view[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._snap(f"before store [{key}]")
        self._view[key] = value
        self._snap(f"after store [{key}]")


def run_and_record(g: Guest, chains: dict[int, int],
                   phases: list[list[int]]) -> list[Image]:
    """Make ``chains`` (buffer id -> descriptors) available, then per phase fetch as many as
    it names and complete them in its order: the images around every region store."""
    g.drv.pos, g.drv.wrap = START_POS, START_WRAP
    g.drv.used_pos, g.drv.used_wrap = START_POS, START_WRAP
    base = START_POS | START_WRAP << WRAP_SHIFT
    b = start_backend(g, base | base << BASE_USED_SHIFT)
    images: list[Image] = []

    def snap(at: str) -> None:
        images.append(Image(os.pread(g.region_fd, g.region_size, 0),
                             g.ram.read(g.drv.ring, 16 * NUM), at))

    tracker = b.tracker
    views = {name: getattr(tracker, name) for name in ("_u64", "_u32", "_u16", "_bytes")}
    for name, view in views.items():
        setattr(tracker, name, Recording(view, snap))
    for buffer_id, n in chains.items():
        g.add(buffer_id, n)
    snap("all available")
    for order in phases:
        popped = {}
        for _ in order:
            chain = b.vq.pop()
            assert chain is not None
            popped[chain.head] = chain
        assert sorted(popped) == sorted(order)
        for buffer_id in order:
            b.complete(popped[buffer_id])
    snap("all completed")
    for name, view in views.items():
        setattr(tracker, name, view)
    b.crash()
    return images


def guest_view(ring: bytes, counts: dict[int, int]) -> tuple[list[int], int, int]:
    """The used descriptors the guest sees from the start position (id order), and the used
    position and wrap counter after them."""
    pos, wrap, seen = START_POS, START_WRAP, []
    while True:
        _, _, buffer_id, flags = PDESC.unpack_from(ring, 16 * pos)
        used_flags = WRAP_FLAGS if wrap else 0
        if flags & WRAP_FLAGS != used_flags or buffer_id in seen or buffer_id not in counts:
            return seen, pos, wrap
        seen.append(buffer_id)
        pos += counts[buffer_id]
        if pos >= NUM:
            pos, wrap = pos - NUM, wrap ^ 1


def judge(image: Image, g: Guest, original: dict[int, list[tuple[int, int, int]]]) -> None:
    """Recover ``image`` in a fresh region and check the outcome against the ring."""
    fd, _ = create_inflight_fd(1, NUM, layout=PACKED_LAYOUT)  # sealed, the image's size
    try:
        os.pwrite(fd, image.region, 0)
        region = InflightRegion.attach(os.dup(fd), g.region_size, 0, 1, NUM,
                                       layout=PACKED_LAYOUT)
        tracker = region.queue(0)
        assert isinstance(tracker, PackedInflightQueue)
        ring = image.ring

        def ring_flags(i: int) -> int:
            return int(PDESC.unpack_from(ring, 16 * i)[3])

        plan = tracker.recover(NUM, 0, 1, ring_flags)  # QEMU 7.2's stale base after a crash
        region.close()
    finally:
        os.close(fd)
    assert plan is not None, image.at
    counts = {k: len(v) for k, v in original.items()}
    seen, used_pos, used_wrap = guest_view(ring, counts)
    assert (plan.used_pos, plan.used_wrap) == (used_pos, used_wrap), image.at
    resubmitted = [r.buffer_id for r in plan.resubmits]
    assert not set(resubmitted) & set(seen), f"{image.at}: a completion the guest saw resubmitted"
    for r in plan.resubmits:
        descs = [RING_DESC.unpack_from(r.descs, 16 * k)[:3] for k in range(r.count)]
        assert descs == original[r.buffer_id], image.at
    # Every other buffer is available in the ring, in order, from the avail position.
    rest = [b for b in original if b not in seen and b not in resubmitted]
    pos, wrap = plan.avail_pos, plan.avail_wrap
    assert (pos - used_pos) % NUM == sum(r.count for r in plan.resubmits) % NUM, image.at
    for buffer_id in rest:
        for addr, length, desc_id in original[buffer_id]:
            a, n, i, flags = PDESC.unpack_from(ring, 16 * pos)
            assert (a, n, i) == (addr, length, desc_id), \
                f"{image.at}: buffer {buffer_id} is neither resubmitted nor in the ring"
            assert flags & WRAP_FLAGS == available_flags(wrap), image.at
            pos += 1
            if pos == NUM:
                pos, wrap = 0, wrap ^ 1


def originals(ring: bytes, chains: dict[int, int]) -> dict[int, list[tuple[int, int, int]]]:
    """(addr, len, id) of every descriptor of every chain in a ring image taken before
    anything was used."""
    out, pos = {}, START_POS
    for buffer_id, n in chains.items():
        descs = []
        for _ in range(n):
            a, length, i, _ = PDESC.unpack_from(ring, 16 * pos)
            descs.append((a, length, i))
            pos = (pos + 1) % NUM
        out[buffer_id] = descs
    return out


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def test_a_kill_at_every_store_leaves_a_region_recovery_resolves(guest: Guest) -> None:
    # Chains wrapping the ring's end. Three are fetched; the second completes first (its used
    # descriptor overwrites the first chain's slots), then the third, then the first; then
    # two of other lengths reuse the entries the first three returned, out of order.
    chains = {0: 3, 1: 2, 2: 1, 3: 2, 4: 3}
    images = run_and_record(guest, chains, [[1, 2, 0], [4, 3]])
    assert images[0].at == "all available"  # no store before the first fetch
    original = originals(images[0].ring, chains)
    stores = sum(1 for im in images if im.at.startswith("after store"))
    # Fetches store 3 words per chain plus 2 per descriptor; completions at least 4 each.
    assert stores >= 5 * 3 + 2 * 11 + 5 * 4, stores
    for image in images:
        judge(image, guest, original)


def test_a_chain_longer_than_the_free_entries_is_not_tracked_and_changes_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    """Cannot happen while the ring bounds what is in flight; if it did, the fetch is refused
    whole: the header and flags as before, and the private free list still right."""
    fd, p = create_inflight_fd(1, NUM, layout=PACKED_LAYOUT)
    region = InflightRegion.attach(fd, p["mmap_size"], 0, 1, NUM, layout=PACKED_LAYOUT)
    try:
        tracker = region.queue(0)
        assert isinstance(tracker, PackedInflightQueue)
        assert tracker.recover(NUM, 0, 1, lambda i: 0) is None  # fresh
        tracker.fetched(0, [(0x1000 + k, 8, 0, 0) for k in range(NUM - 1)])
        before = bytes(region_bytes(tracker))
        tracker.fetched(1, [(0x9000, 8, 1, 0), (0x9100, 8, 1, 0)])
        assert "buffer 1 (2 descriptors) not tracked" in caplog.text
        after = region_bytes(tracker)
        assert after[:32] == before[:32]  # header: no fetch committed
        flags = after[32::32]
        assert flags[:NUM] == before[32::32][:NUM] and flags[0] == 1 and sum(flags[:NUM]) == 1
        # The refused buffer was not taken: once buffer 0 is back it is tracked normally.
        tracker.completed(tracker.completing(0, NUM - 1, 1))
        tracker.fetched(1, [(0x9000, 8, 1, 0), (0x9100, 8, 1, 0)])
        head = tracker.completing(1, 0, 0)
        assert head >= 0
        tracker.completed(head)
    finally:
        region.close()


def region_bytes(tracker: PackedInflightQueue) -> bytes:
    return bytes(tracker._bytes)
