"""Unit tests for vhostmem.memmap: registration rules, notify order, translations, rollback."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
import threading
from typing import Any

import numpy as np
import pytest

from vhostmem.memmap import MapOps, MemMap, MemMapError, MemRegistry, NotifyAction, _map

K4 = 4096
M2 = 2 << 20
G1 = 1 << 30
BASE = 0x7F00_0000_0000  # 1 GiB aligned
REG, UNREG = NotifyAction.REGISTER, NotifyAction.UNREGISTER


class Recorder:
    """A notify callback that records calls and keeps its map's translations = vaddr of chunk."""

    def __init__(self, log: list[tuple[Any, ...]], name: str, fail_on: Any = None) -> None:
        self.log, self.name, self.fail_on = log, name, fail_on

    def __call__(self, mem_map: MemMap, ctx: Any, action: NotifyAction, vaddr: int,
                 length: int) -> None:
        if self.fail_on is not None and self.fail_on(action, vaddr, length):
            raise RuntimeError(f"{self.name} refuses {action.name} {vaddr:#x}")
        self.log.append((self.name, action, vaddr, length))
        if action == REG:
            mem_map.set_translation(vaddr, length, vaddr)
        else:
            mem_map.clear_translation(vaddr, length)


def make(reg: MemRegistry, log: list[tuple[Any, ...]], name: str, **kw: Any) -> MemMap:
    return reg.alloc_map(0, MapOps(notify=Recorder(log, name, **kw)), ctx=name)


def expect_errno(code: int, fn: Any, *args: Any) -> MemMapError:
    with pytest.raises(MemMapError) as info:
        fn(*args)
    assert info.value.errno == code, info.value
    assert isinstance(info.value, OSError)
    return info.value


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(("vaddr", "length"), [
    (BASE + 1, K4), (BASE, K4 + 512), (1 << 48, K4), ((1 << 48) - K4, 2 * K4), (-K4, K4),
])
def test_register_rejects_bad_ranges(vaddr: int, length: int) -> None:
    reg = MemRegistry()
    err = expect_errno(errno.EINVAL, reg.register, vaddr, length)
    assert "register" in str(err)
    assert reg.chunks() == []


def test_bad_translation_values_and_addresses() -> None:
    mem_map = MemRegistry().alloc_map(0)
    expect_errno(errno.EINVAL, mem_map.set_translation, BASE, K4, -1)
    expect_errno(errno.EINVAL, mem_map.set_translation, BASE, K4, 1 << 64)
    expect_errno(errno.EINVAL, mem_map.set_translation, BASE + 8, K4, 1)
    expect_errno(errno.EINVAL, mem_map.clear_translation, BASE, 100)
    for bad in (1 << 48, (1 << 49) - 1, 1 << 60, -1, -(1 << 60)):
        expect_errno(errno.EINVAL, mem_map.translate, bad)
        expect_errno(errno.EINVAL, mem_map.lookup, bad)
    expect_errno(errno.EINVAL, mem_map.translate_many, [BASE, 1 << 48])
    expect_errno(errno.EINVAL, mem_map.translate_many, [-1])
    expect_errno(errno.EINVAL, mem_map.translate_many, np.array([-5], dtype=np.int64))


def test_zero_length_is_a_no_op() -> None:
    log: list[tuple[Any, ...]] = []
    reg = MemRegistry()
    make(reg, log, "a")
    reg.register(BASE, 0)
    reg.unregister(BASE, 0)
    reg.reserve(BASE, 0)
    assert log == [] and reg.chunks() == [] and reg.reservations() == []


# ---------------------------------------------------------------- registration rules


def test_overlap_is_ebusy_and_adjacent_is_fine() -> None:
    reg = MemRegistry()
    reg.register(BASE + M2, 2 * M2)
    for vaddr, length in [(BASE, 2 * M2), (BASE + 2 * M2, M2), (BASE + M2 + K4, K4),
                          (BASE, 8 * M2), (BASE + 3 * M2 - K4, 2 * K4)]:
        expect_errno(errno.EBUSY, reg.register, vaddr, length)
    reg.register(BASE, M2)
    reg.register(BASE + 3 * M2, K4)
    assert reg.chunks() == [(BASE, M2), (BASE + M2, 2 * M2), (BASE + 3 * M2, K4)]
    assert reg.is_registered(BASE + 3 * M2) and not reg.is_registered(BASE + 3 * M2 + K4)


def test_unregister_must_match_chunk_boundaries() -> None:
    reg = MemRegistry()
    reg.register(BASE, 4 * M2)
    reg.register(BASE + 4 * M2, 2 * M2)
    expect_errno(errno.ERANGE, reg.unregister, BASE + M2, M2)  # starts inside a chunk
    expect_errno(errno.ERANGE, reg.unregister, BASE, 2 * M2)  # ends inside a chunk
    expect_errno(errno.ERANGE, reg.unregister, BASE, 5 * M2)  # ends inside the second
    expect_errno(errno.EINVAL, reg.unregister, BASE - M2, M2)  # not registered
    expect_errno(errno.EINVAL, reg.unregister, BASE, 7 * M2)  # runs past registered memory
    expect_errno(errno.EINVAL, reg.unregister, BASE + 1, M2)  # misaligned
    assert reg.chunks() == [(BASE, 4 * M2), (BASE + 4 * M2, 2 * M2)]
    reg.unregister(BASE, 6 * M2)
    assert reg.chunks() == []


def test_unregister_over_a_gap_is_einval() -> None:
    reg = MemRegistry()
    reg.register(BASE, M2)
    reg.register(BASE + 2 * M2, M2)
    expect_errno(errno.EINVAL, reg.unregister, BASE, 3 * M2)
    assert len(reg.chunks()) == 2


# ---------------------------------------------------------------- notify order and chunks


def test_register_notifies_maps_in_order_and_unregister_in_reverse() -> None:
    log: list[tuple[Any, ...]] = []
    reg = MemRegistry()
    maps = [make(reg, log, name) for name in "abc"]
    reg.register(BASE, 3 * M2)
    assert log == [(n, REG, BASE, 3 * M2) for n in "abc"]
    assert all(m.translate(BASE + M2) == (BASE, M2) for m in maps)
    log.clear()
    reg.unregister(BASE, 3 * M2)
    assert log == [(n, UNREG, BASE, 3 * M2) for n in "cba"]
    assert all(m.translate(BASE + M2) == (0, M2) for m in maps)


def test_unregister_of_several_chunks_notifies_each_chunk() -> None:
    log: list[tuple[Any, ...]] = []
    reg = MemRegistry()
    make(reg, log, "a")
    make(reg, log, "b")
    chunks = [(BASE, M2), (BASE + M2, K4), (BASE + M2 + K4, 3 * M2 - K4)]
    for vaddr, length in chunks:
        reg.register(vaddr, length)
    log.clear()
    reg.unregister(BASE, 4 * M2)
    assert log == [(n, UNREG, v, n_) for v, n_ in chunks for n in "ba"]


def test_alloc_map_replays_each_chunk_in_address_order() -> None:
    log: list[tuple[Any, ...]] = []
    reg = MemRegistry()
    # Registered out of order; the first two are adjacent and must stay separate chunks.
    reg.register(BASE + 5 * G1, M2)
    reg.register(BASE + M2, M2)
    reg.register(BASE, M2)
    late = make(reg, log, "late")
    assert log == [("late", REG, BASE, M2), ("late", REG, BASE + M2, M2),
                   ("late", REG, BASE + 5 * G1, M2)]
    assert late.lookup(BASE + 5 * G1 + 12345) == BASE + 5 * G1
    assert reg.maps == [late]


def test_free_map_replays_unregister_and_detaches() -> None:
    log: list[tuple[Any, ...]] = []
    reg = MemRegistry()
    first = make(reg, log, "a")
    second = make(reg, log, "b")
    reg.register(BASE, M2)
    reg.register(BASE + M2, K4)
    log.clear()
    reg.free_map(first)
    assert log == [("a", UNREG, BASE, M2), ("a", UNREG, BASE + M2, K4)]
    assert reg.maps == [second]
    log.clear()
    reg.register(BASE + G1, M2)
    assert log == [("b", REG, BASE + G1, M2)]
    expect_errno(errno.EINVAL, reg.free_map, first)  # already freed
    expect_errno(errno.EINVAL, first.set_translation, BASE, K4, 1)
    expect_errno(errno.EINVAL, MemRegistry().free_map, second)  # not this registry's map


def test_map_without_notify_is_not_notified_but_can_be_freed() -> None:
    reg = MemRegistry()
    plain = reg.alloc_map(9)
    reg.register(BASE, M2)
    assert plain.lookup(BASE) == 9 and reg.maps == []
    reg.free_map(plain)


# ---------------------------------------------------------------- rollback


def snapshot(reg: MemRegistry, maps: list[MemMap]) -> tuple[Any, ...]:
    probes = [BASE, BASE + K4, BASE + M2, BASE + 3 * M2 - K4, BASE + G1]
    # Tables allocated on the way stay allocated (as in SPDK); translations and splits must not.
    return (reg.chunks(), [[m.translate(p) for p in probes] for m in maps],
            [m.stats()["split_entries"] for m in maps])


def test_register_rollback_when_a_callback_raises() -> None:
    log: list[tuple[Any, ...]] = []
    reg = MemRegistry()
    reg.register(BASE + G1, M2)
    maps = [make(reg, log, "a"), make(reg, log, "b"),
            make(reg, log, "c", fail_on=lambda action, v, n: action == REG and v == BASE)]
    before = snapshot(reg, maps)
    log.clear()
    with pytest.raises(RuntimeError, match="c refuses REGISTER"):
        reg.register(BASE, 3 * M2 - K4)
    assert log == [("a", REG, BASE, 3 * M2 - K4), ("b", REG, BASE, 3 * M2 - K4),
                   ("b", UNREG, BASE, 3 * M2 - K4), ("a", UNREG, BASE, 3 * M2 - K4)]
    assert snapshot(reg, maps) == before
    # The registry is usable afterwards: the same range registers once the callback agrees.
    maps[2].ops.notify.fail_on = None  # type: ignore[union-attr]
    reg.register(BASE, 3 * M2 - K4)
    assert [m.lookup(BASE + M2) for m in maps] == [BASE] * 3


def test_unregister_rollback_restores_chunks_and_translations() -> None:
    log: list[tuple[Any, ...]] = []
    reg = MemRegistry()
    fail = {"on": False}
    maps = [make(reg, log, "a",
                 fail_on=lambda action, v, n: fail["on"] and action == UNREG and v == BASE + M2),
            make(reg, log, "b")]
    reg.register(BASE, M2)
    reg.register(BASE + M2, M2)
    before = snapshot(reg, maps)
    log.clear()
    fail["on"] = True
    with pytest.raises(RuntimeError, match="a refuses UNREGISTER"):
        reg.unregister(BASE, 2 * M2)
    assert log == [("b", UNREG, BASE, M2), ("a", UNREG, BASE, M2), ("b", UNREG, BASE + M2, M2),
                   ("b", REG, BASE + M2, M2), ("a", REG, BASE, M2), ("b", REG, BASE, M2)]
    assert snapshot(reg, maps) == before


def test_alloc_map_rollback_unregisters_the_chunks_it_reported() -> None:
    log: list[tuple[Any, ...]] = []
    reg = MemRegistry()
    reg.register(BASE, M2)
    reg.register(BASE + 4 * M2, M2)
    reg.register(BASE + G1, M2)
    with pytest.raises(RuntimeError):
        make(reg, log, "x", fail_on=lambda action, v, n: action == REG and v == BASE + G1)
    assert log == [("x", REG, BASE, M2), ("x", REG, BASE + 4 * M2, M2),
                   ("x", UNREG, BASE + 4 * M2, M2), ("x", UNREG, BASE, M2)]
    assert reg.maps == [] and len(reg.chunks()) == 3


def test_rollback_failures_are_attached_as_notes() -> None:
    log: list[tuple[Any, ...]] = []
    reg = MemRegistry()
    make(reg, log, "a", fail_on=lambda action, v, n: action == UNREG)
    make(reg, log, "b", fail_on=lambda action, v, n: action == REG)
    with pytest.raises(RuntimeError, match="b refuses") as info:
        reg.register(BASE, M2)
    assert any("rollback" in note for note in info.value.__notes__)
    assert reg.chunks() == []


def test_callback_calling_back_into_the_registry_gets_edeadlk() -> None:
    reg = MemRegistry()
    seen: list[int] = []

    def reentrant(mem_map: MemMap, ctx: Any, action: NotifyAction, v: int, n: int) -> None:
        try:
            reg.register(v + G1, n)
        except MemMapError as exc:
            seen.append(exc.errno)
            raise

    reg.alloc_map(0, MapOps(notify=reentrant))
    with pytest.raises(MemMapError):
        reg.register(BASE, M2)
    assert seen == [errno.EDEADLK] and reg.chunks() == []


# ---------------------------------------------------------------- translations


def test_default_translation_and_lazy_tables() -> None:
    mem_map = MemRegistry().alloc_map(default_translation=0xDEAD)
    assert mem_map.translate(BASE + 5) == (0xDEAD, M2 - 5)
    assert mem_map.stats() == {"tables": 0, "split_entries": 0}
    mem_map.set_translation(BASE + G1 - M2, 2 * M2, 42)  # straddles two 1 GiB tables
    assert mem_map.stats() == {"tables": 2, "split_entries": 0}
    assert mem_map.lookup(BASE + G1 - 1) == 42 and mem_map.lookup(BASE + G1 + M2 - 1) == 42
    assert mem_map.lookup(BASE + G1 + M2) == 0xDEAD
    mem_map.clear_translation(BASE + G1 - M2, 2 * M2)
    assert mem_map.lookup(BASE + G1) == 0xDEAD


def test_4k_entries_split_only_where_unaligned_and_fold_back() -> None:
    mem_map = MemRegistry().alloc_map(0)
    mem_map.set_translation(BASE, 4 * M2, 1)
    assert mem_map.stats()["split_entries"] == 0
    mem_map.set_translation(BASE + M2 - K4, 2 * K4, 2)  # one page each side of a boundary
    assert mem_map.stats()["split_entries"] == 2
    assert mem_map.translate(BASE + M2 - K4 + 10) == (2, K4 - 10)
    assert mem_map.translate(BASE + M2 - 2 * K4) == (1, K4)
    assert mem_map.translate(BASE + M2 + K4) == (1, K4)
    assert mem_map.translate(BASE + 2 * M2) == (1, M2)  # neighbour entry is not split
    mem_map.set_translation(BASE + M2 - K4, K4, 1)  # entry uniform again: folds back
    assert mem_map.stats()["split_entries"] == 1
    assert mem_map.translate(BASE + M2 - K4) == (1, M2 - (M2 - K4))
    mem_map.set_translation(BASE, 4 * M2, 3)  # whole-entry write drops the split
    assert mem_map.stats()["split_entries"] == 0
    assert mem_map.translate(BASE + M2 + K4) == (3, M2 - K4)
    mem_map.set_translation(BASE + 5 * K4, 3 * K4, 3)  # same value: no split needed
    assert mem_map.stats()["split_entries"] == 0


def test_a_few_entries_on_each_side_of_a_table_boundary() -> None:
    mem_map = MemRegistry().alloc_map(0)
    mem_map.translate_many([BASE])  # with a mirror to keep in step
    mem_map.set_translation(BASE, 2 * G1, 1)
    mem_map.set_translation(BASE + G1 - M2, 2 * M2, 2)  # one entry in each existing table
    addresses = [BASE + G1 - 2 * M2, BASE + G1 - M2, BASE + G1, BASE + G1 + M2]
    assert [mem_map.lookup(a) for a in addresses] == [1, 2, 2, 1]
    assert mem_map.translate_many(addresses).tolist() == [1, 2, 2, 1]
    mem_map.set_translation(BASE + G1 - 100 * M2, 200 * M2, 3)  # many entries: table copies
    assert [mem_map.lookup(a) for a in addresses] == [3, 3, 3, 3]
    assert mem_map.lookup(BASE + G1 - 101 * M2) == 1 and mem_map.lookup(BASE + G1 + 100 * M2) == 1
    assert mem_map.translate_many(addresses).tolist() == [3, 3, 3, 3]
    assert mem_map.stats() == {"tables": 2, "split_entries": 0}


def test_translate_size_without_are_contiguous_is_page_remainder() -> None:
    mem_map = MemRegistry().alloc_map(0)
    mem_map.set_translation(BASE, 8 * M2, 5)
    assert mem_map.translate(BASE + 100, size=10 * M2) == (5, M2 - 100)
    assert mem_map.translate(BASE + 100, size=50) == (5, 50)


def test_translate_size_extends_while_contiguous() -> None:
    mem_map = MemRegistry().alloc_map(0, MapOps(are_contiguous=lambda a, b: a == b))
    mem_map.set_translation(BASE + K4, 3 * M2, 7)  # region id 7, unaligned at both ends
    mem_map.set_translation(BASE + K4 + 3 * M2, M2, 8)
    assert mem_map.translate(BASE + K4, size=1 << 40) == (7, 3 * M2)
    assert mem_map.translate(BASE + M2, size=1 << 40) == (7, 2 * M2 + K4)
    assert mem_map.translate(BASE + K4, size=M2 + 3) == (7, M2 + 3)  # capped
    assert mem_map.translate(BASE + K4) == (7, K4)  # no size: no extension; entry 0 is split
    assert mem_map.translate(BASE + M2 + 5) == (7, M2 - 5)
    # The default translation is never extended.
    assert mem_map.translate(BASE + 10 * M2, size=5 * M2) == (0, M2)


def test_translate_size_with_physically_contiguous_pages() -> None:
    # SPDK vtophys style: each page stores its own address; contiguous if the next follows.
    mem_map = MemRegistry().alloc_map(0, MapOps(are_contiguous=lambda a, b: b == a + M2))
    phys = 0x1_0000_0000
    for page in range(4):
        mem_map.set_translation(BASE + page * M2, M2, phys + page * M2)
    mem_map.set_translation(BASE + 4 * M2, M2, 0x9_0000_0000)
    assert mem_map.translate(BASE + M2 + 5, size=1 << 30) == (phys + M2, 3 * M2 - 5)


def test_translate_many_matches_scalar_lookups() -> None:
    mem_map = MemRegistry().alloc_map(3)
    mem_map.set_translation(BASE, 3 * G1, 11)
    mem_map.set_translation(BASE + M2 + K4, 5 * K4, 12)
    mem_map.set_translation(BASE + G1 - K4, 2 * K4, (1 << 64) - 1)
    rng = np.random.default_rng(7)
    addresses = np.concatenate([
        rng.integers(BASE - G1, BASE + 4 * G1, 50_000, dtype=np.uint64),
        np.arange(BASE + M2, BASE + 2 * M2, 997, dtype=np.uint64),
        np.array([0, (1 << 48) - 1, BASE + G1 - 1, BASE + G1], dtype=np.uint64)])
    got = mem_map.translate_many(addresses)
    assert got.dtype == np.uint64 and got.shape == addresses.shape
    assert [int(v) for v in got] == [mem_map.lookup(int(a)) for a in addresses]
    # Changes after the first batch are seen by the next one, including a fold-back.
    mem_map.set_translation(BASE + M2, M2, 13)
    mem_map.clear_translation(BASE + G1 - K4, 2 * K4)
    again = mem_map.translate_many(addresses.reshape(2, -1))
    assert again.shape == (2, addresses.size // 2)
    assert [int(v) for v in again.ravel()] == [mem_map.lookup(int(a)) for a in addresses]
    assert list(mem_map.translate_many([BASE + M2 + K4])) == [13]


def test_lookup_equals_translate() -> None:
    mem_map = MemRegistry().alloc_map(1)
    mem_map.set_translation(BASE + K4, K4, 2)
    for vaddr in (BASE, BASE + K4, BASE + 2 * K4, 0, (1 << 48) - 1):
        assert mem_map.lookup(vaddr) == mem_map.translate(vaddr)[0]


# ---------------------------------------------------------------- reserve


def test_reserve_preallocates_tables_and_allows_registration() -> None:
    log: list[tuple[Any, ...]] = []
    reg = MemRegistry()
    early = make(reg, log, "early")
    reg.reserve(BASE + G1 - M2, 2 * M2)
    reg.reserve(BASE + G1, 4 * M2)  # overlapping reservations merge
    assert reg.reservations() == [(BASE + G1 - M2, 5 * M2)]
    late = reg.alloc_map(0)
    assert early.stats()["tables"] == 2 and late.stats()["tables"] == 2
    assert early.lookup(BASE + G1) == 0  # reserving sets no translation
    reg.register(BASE + G1, M2)
    assert early.lookup(BASE + G1) == BASE + G1
    expect_errno(errno.EBUSY, reg.reserve, BASE + G1 - M2, 2 * M2)
    expect_errno(errno.EINVAL, reg.reserve, BASE + 3, M2)


# ---------------------------------------------------------------- resources and threads


def test_enomem_leaves_the_map_unchanged() -> None:
    # A real allocation failure: the child process caps its address space, then asks for a
    # translation over 2^46 bytes (65536 tables of 4 KiB each, far over the cap).
    script = textwrap.dedent("""
        import errno, os, resource
        from vhostmem.memmap import MemMapError, MemRegistry
        mem_map = MemRegistry().alloc_map(0)
        mem_map.set_translation(0, 1 << 21, 9)
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (used + (64 << 20), resource.RLIM_INFINITY))
        try:
            mem_map.set_translation(1 << 30, 1 << 46, 5)
        except MemMapError as exc:
            print(exc.errno == errno.ENOMEM, mem_map.stats()["tables"], mem_map.lookup(1 << 30),
                  mem_map.lookup(0))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split() == ["True", "1", "0", "9"], out.stderr


class FailingAllocations:
    """Makes the Nth list a write allocates raise MemoryError (all of a write's large
    allocations go through ``_map._filled`` and ``_map._copied``); counts the calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None) -> None:
        self.calls, self.fail_at = 0, fail_at
        for name in ("_filled", "_copied"):
            monkeypatch.setattr(_map, name, self._wrap(getattr(_map, name)))

    def _wrap(self, real: Any) -> Any:
        def allocate(*args: Any) -> Any:
            self.calls += 1
            if self.calls == self.fail_at:
                raise MemoryError
            return real(*args)
        return allocate


def map_state(mem_map: MemMap, addresses: np.ndarray) -> tuple[Any, ...]:
    return (mem_map.stats(), [mem_map.translate(int(a)) for a in addresses],
            mem_map.translate_many(addresses).tolist())


ENOMEM_WRITES = {
    # new tables, whole frames, a split head and tail, one whole table in the middle
    "new-tables": (BASE + G1 - M2 - 3 * K4, G1 + 2 * M2 + 5 * K4, 5),
    # an existing table partly covered: new splits at both ends, two splits overwritten
    "over-splits": (BASE + M2 - K4, 2 * M2 + 2 * K4, 4),
    "fold-back": (BASE + M2, K4, 2),
    "change-a-split": (BASE + 2 * M2 + 8 * K4, 2 * K4, 7),
    "clear": (BASE, 3 * G1, None),
}


@pytest.mark.parametrize(("vaddr", "size", "value"), ENOMEM_WRITES.values(),
                         ids=ENOMEM_WRITES.keys())
def test_enomem_at_any_allocation_leaves_the_map_unchanged(
    monkeypatch: pytest.MonkeyPatch, vaddr: int, size: int, value: int | None
) -> None:
    rng = np.random.default_rng(3)
    addresses = np.concatenate([
        rng.integers(BASE - M2, BASE + 3 * G1, 3000, dtype=np.uint64),
        np.arange(BASE + M2 - 8 * K4, BASE + 2 * M2 + 8 * K4, K4, dtype=np.uint64),
        np.arange(BASE + G1 - 2 * M2, BASE + G1 + 2 * M2, K4, dtype=np.uint64)])

    def build() -> MemMap:
        mem_map = MemRegistry().alloc_map(0, MapOps(are_contiguous=lambda a, b: a == b))
        mem_map.set_translation(BASE, M2 * 3, 2)
        mem_map.set_translation(BASE + M2, K4, 3)  # frame 1 split: 3, then 2 for the rest
        mem_map.set_translation(BASE + 2 * M2 + 8 * K4, K4, 9)  # frame 2 split
        mem_map.translate_many(addresses[:1])  # the numpy mirror must stay in step too
        return mem_map

    def write(mem_map: MemMap) -> None:
        if value is None:
            mem_map.clear_translation(vaddr, size)
        else:
            mem_map.set_translation(vaddr, size, value)

    counter = FailingAllocations(monkeypatch, None)
    expected = build()
    counter.calls = 0
    write(expected)
    allocations = counter.calls
    assert allocations >= 2
    for fail_at in range(1, allocations + 1):
        mem_map = build()
        before = map_state(mem_map, addresses)
        counter.calls, counter.fail_at = 0, fail_at
        err = expect_errno(errno.ENOMEM, write, mem_map)
        assert isinstance(err.__cause__, MemoryError)
        assert map_state(mem_map, addresses) == before, f"changed by a failure at {fail_at}"
        counter.fail_at = None
        write(mem_map)  # the same write succeeds afterwards
        assert map_state(mem_map, addresses) == map_state(expected, addresses)


def test_translate_rejects_a_negative_or_non_integer_size() -> None:
    mem_map = MemRegistry().alloc_map(0)
    mem_map.set_translation(BASE, M2, 1)
    for bad in (-5, -1, 1.5, "4096"):
        err = expect_errno(errno.EINVAL, mem_map.translate, BASE, bad)
        assert "size" in str(err)
    assert mem_map.translate(BASE, 0) == (1, 0)
    assert mem_map.translate(BASE, np.uint64(4096)) == (1, 4096)
    assert mem_map.translate(BASE, True) == (1, 1)


def test_concurrent_registrations_and_translations() -> None:
    reg = MemRegistry()
    mem_map = reg.alloc_map(0, MapOps(notify=Recorder([], "m")))
    errors: list[BaseException] = []

    def worker(slot: int) -> None:
        try:
            for i in range(200):
                vaddr = BASE + (slot * 1000 + i) * M2
                reg.register(vaddr, M2)
                assert mem_map.lookup(vaddr + K4) == vaddr
                if i % 2:
                    reg.unregister(vaddr, M2)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(reg.chunks()) == 4 * 100
    for vaddr, length in reg.chunks():
        assert mem_map.translate(vaddr) == (vaddr, length)


def test_translate_many_into_an_out_array() -> None:
    mem_map = MemRegistry().alloc_map(3)
    mem_map.set_translation(BASE, 2 * G1, 11)
    mem_map.set_translation(BASE + M2 + K4, 5 * K4, 12)  # a split entry
    rng = np.random.default_rng(5)
    addresses = np.concatenate([
        rng.integers(BASE - G1, BASE + 3 * G1, 40_000, dtype=np.uint64),
        np.arange(BASE + M2, BASE + 2 * M2, K4, dtype=np.uint64)])
    expected = mem_map.translate_many(addresses)
    out = np.full(addresses.size, 99, dtype=np.uint64)
    assert mem_map.translate_many(addresses, out=out) is out
    assert np.array_equal(out, expected)
    grid = np.zeros((2, addresses.size // 2), dtype=np.uint64)  # any shape of the right size
    assert mem_map.translate_many(list(addresses), out=grid) is grid
    assert np.array_equal(grid.ravel(), expected)
    in_place = addresses.copy()  # out may be the addresses themselves
    assert mem_map.translate_many(in_place, out=in_place) is in_place
    assert np.array_equal(in_place, expected)
    for bad in (np.zeros(addresses.size, dtype=np.int64), np.zeros(addresses.size - 1,
                dtype=np.uint64), np.zeros(2 * addresses.size, dtype=np.uint64)[::2],
                [0] * addresses.size):
        expect_errno(errno.EINVAL, mem_map.translate_many, addresses, bad)
    frozen = np.zeros(addresses.size, dtype=np.uint64)
    frozen.flags.writeable = False
    expect_errno(errno.EINVAL, mem_map.translate_many, addresses, frozen)
