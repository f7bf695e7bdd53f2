"""Batch calls of vhostmem.memmap: register_many / unregister_many against the same calls made
one by one, all-or-nothing on every failure, and MemMap.set_translations / clear_translations
against successive set_translation calls."""

from __future__ import annotations

import errno
import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.vhostmem.test_memmap import FailingAllocations, Recorder, expect_errno
from vhostmem.memmap import MapOps, MemMap, MemMapError, MemRegistry, NotifyAction

K4 = 4096
M2 = 2 << 20
G1 = 1 << 30
PAGES_PER_2M = M2 // K4
WINDOW = G1 - 8 * M2  # the window straddles a 1 GiB table boundary
WINDOW_PAGES = 16 * PAGES_PER_2M
REG, UNREG = NotifyAction.REGISTER, NotifyAction.UNREGISTER
# Every 4 KiB page of the window and a 2 MiB margin each side; scalar translate on a sample.
PROBES = np.arange(WINDOW - M2, WINDOW + (WINDOW_PAGES + PAGES_PER_2M) * K4, K4,
                   dtype=np.uint64)
SCALAR_PROBES = PROBES[::61].tolist()
Log = list[tuple[Any, ...]]


class BatchRecorder(Recorder):
    """A Recorder (translations = chunk start, one log entry per range) that also has the
    batch form: one ``set_translations`` per batch, logged as one entry holding the ranges."""

    def many(self, mem_map: MemMap, ctx: Any, action: NotifyAction, vaddrs: np.ndarray,
             lengths: np.ndarray) -> None:
        assert vaddrs.dtype == np.uint64 and not vaddrs.flags.writeable
        ranges = list(zip(vaddrs.tolist(), lengths.tolist(), strict=True))
        for vaddr, length in ranges:
            if self.fail_on is not None and self.fail_on(action, vaddr, length):
                raise RuntimeError(f"{self.name} refuses {action.name} {vaddr:#x}")
        self.log.append((self.name, action, ranges))
        if action == REG:
            mem_map.set_translations(vaddrs, lengths, vaddrs)
        else:
            mem_map.clear_translations(vaddrs, lengths)


def make_maps(reg: MemRegistry, log: Log, kinds: str, **fail: Any) -> list[MemMap]:
    """One map per letter: ``s`` hears one notify per range, ``b`` has notify_many too."""
    maps = []
    for n, kind in enumerate(kinds):
        rec = BatchRecorder(log, f"{kind}{n}", **fail.get(f"{kind}{n}", {}))
        ops = MapOps(notify=rec, notify_many=rec.many if kind == "b" else None)
        maps.append(reg.alloc_map(0, ops, ctx=rec.name))
    return maps


def per_map(log: Log) -> dict[str, list[tuple[Any, ...]]]:
    """Each map's notifications, batch entries flattened into one entry per range."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for name, *entry in flatten(log):
        out.setdefault(name, []).append(tuple(entry))
    return out


def flatten(log: Log) -> Log:
    """The log with each batch entry replaced by one entry per range."""
    out: Log = []
    for name, action, *rest in log:
        ranges = rest[0] if isinstance(rest[0], list) else [tuple(rest)]
        out.extend((name, action, v, n) for v, n in ranges)
    return out


def state(reg: MemRegistry, maps: list[MemMap], tables: bool = True) -> tuple[Any, ...]:
    """Everything a caller can observe: chunks, every 4 KiB page of the window (and a margin)
    in every map, through both lookup paths, and the split entries. ``tables=False`` leaves
    out the count of 1 GiB tables: a rolled-back registration keeps the tables it allocated,
    as SPDK's does."""
    return (reg.chunks(), [m.translate_many(PROBES).tolist() for m in maps],
            [[m.translate(p) for p in SCALAR_PROBES] for m in maps],
            [m.stats() if tables else m.stats()["split_entries"] for m in maps])


pages = st.integers(0, WINDOW_PAGES - 1)
ranges_st = st.lists(st.tuples(pages, st.integers(0, 3 * PAGES_PER_2M),
                               st.sampled_from([1, PAGES_PER_2M])), max_size=12)


def to_range(page: int, count: int, align: int) -> tuple[int, int]:
    """A (vaddr, length) in the window, aligned to ``align`` pages (length 0 stays 0)."""
    first = page // align * align
    stop = min(WINDOW_PAGES, first + (count + align - 1) // align * align)
    return WINDOW + first * K4, (stop - first) * K4


def one_by_one(reg: MemRegistry, ranges: list[tuple[int, int]], method: str) -> int | None:
    """The calls made one at a time; the errno of the first that fails, else None."""
    for vaddr, length in ranges:
        try:
            getattr(reg, method)(vaddr, length)
        except MemMapError as exc:
            return exc.errno
    return None


# ---------------------------------------------------------------- equivalence


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=ranges_st, batch=ranges_st, kinds=st.sampled_from(["s", "b", "sbs", "bsb"]))
def test_register_many_equals_register_one_by_one(before: list[Any], batch: list[Any],
                                                  kinds: str) -> None:
    logs: tuple[Log, Log] = ([], [])
    regs = MemRegistry(), MemRegistry()
    maps = [make_maps(reg, log, kinds) for reg, log in zip(regs, logs, strict=True)]
    for reg in regs:  # the same earlier registrations, one by one (some may be EBUSY)
        one_by_one(reg, [to_range(*r) for r in before], "register")
    for log in logs:
        log.clear()
    ranges = [to_range(*r) for r in batch]
    seq_reg, many_reg = regs
    untouched = state(many_reg, maps[1])
    expected = one_by_one(seq_reg, ranges, "register")
    if expected is None:
        many_reg.register_many(ranges)
        assert state(many_reg, maps[1]) == state(seq_reg, maps[0])
        assert per_map(logs[1]) == per_map(logs[0])
        # Map by map in allocation order: no map hears anything before the previous one is done.
        names = [entry[0] for entry in logs[1]]
        assert names == sorted(names, key=lambda name: int(name[1:]))
    else:
        assert expected == errno.EBUSY
        expect_errno(errno.EBUSY, many_reg.register_many, ranges)
        assert state(many_reg, maps[1]) == untouched and logs[1] == []


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=ranges_st, picks=st.lists(st.integers(0, 11), max_size=6, unique=True),
       kinds=st.sampled_from(["s", "b", "sbs"]))
def test_unregister_many_equals_unregister_one_by_one(before: list[Any], picks: list[int],
                                                      kinds: str) -> None:
    logs: tuple[Log, Log] = ([], [])
    regs = MemRegistry(), MemRegistry()
    maps = [make_maps(reg, log, kinds) for reg, log in zip(regs, logs, strict=True)]
    for reg in regs:
        one_by_one(reg, [to_range(*r) for r in before], "register")
    chunks = regs[0].chunks()
    # Whole chunks, two neighbours merged into one range, and ranges cutting a chunk.
    candidates = [*chunks, *[(a[0], a[1] + b[1]) for a, b in itertools.pairwise(chunks)
                             if a[0] + a[1] == b[0]],
                  *[(v + K4, n - K4) for v, n in chunks if n > K4]]
    ranges = [candidates[i] for i in picks if i < len(candidates)]
    for log in logs:
        log.clear()
    seq_reg, many_reg = regs
    untouched = state(many_reg, maps[1])
    expected = one_by_one(seq_reg, ranges, "unregister")
    if expected is None:
        many_reg.unregister_many(ranges)
        assert state(many_reg, maps[1]) == state(seq_reg, maps[0])
        assert per_map(logs[1]) == per_map(logs[0])
        names = [entry[0] for entry in logs[1]]  # reverse allocation order, map by map
        assert names == sorted(names, key=lambda name: -int(name[1:]))
    else:
        expect_errno(expected, many_reg.unregister_many, ranges)
        assert state(many_reg, maps[1]) == untouched and logs[1] == []


def test_register_many_notifies_map_by_map_in_input_order() -> None:
    log: Log = []
    reg = MemRegistry()
    make_maps(reg, log, "sbs")
    ranges = [(WINDOW + 4 * M2, M2), (WINDOW, K4), (WINDOW + M2, 0), (WINDOW + K4, M2)]
    reg.register_many(ranges)
    nonzero = [r for r in ranges if r[1]]  # zero-length ranges are skipped, as register does
    assert log == [*[("s0", REG, v, n) for v, n in nonzero], ("b1", REG, nonzero),
                   *[("s2", REG, v, n) for v, n in nonzero]]
    assert reg.chunks() == sorted(nonzero)
    log.clear()
    reg.unregister_many([(WINDOW + K4, M2), (WINDOW, K4)])
    assert log == [("s2", UNREG, WINDOW + K4, M2), ("s2", UNREG, WINDOW, K4),
                   ("b1", UNREG, [(WINDOW + K4, M2), (WINDOW, K4)]),
                   ("s0", UNREG, WINDOW + K4, M2), ("s0", UNREG, WINDOW, K4)]
    assert reg.chunks() == [(WINDOW + 4 * M2, M2)]


def test_register_many_takes_an_array_or_any_iterable_of_pairs() -> None:
    ranges = [(WINDOW + i * M2, M2) for i in range(0, 20, 2)]
    got = []
    for given_ranges in (np.array(ranges, dtype=np.uint64), np.array(ranges, dtype=np.int64),
                         iter(ranges), tuple(ranges), [list(r) for r in ranges]):
        reg = MemRegistry()
        reg.register_many(given_ranges)
        got.append(reg.chunks())
    assert got == [ranges] * 5


# ---------------------------------------------------------------- all or nothing


@pytest.mark.parametrize(("kinds", "failing", "at"), [
    ("sss", "s2", 3),  # the last map, in the middle of the batch
    ("sss", "s0", 0),  # the first map, on the first range
    ("sbs", "b1", 2),  # a notify_many map
    ("bbs", "s2", 4),  # after two notify_many maps
])
def test_register_many_rolls_back_everything_when_a_callback_raises(
        kinds: str, failing: str, at: int) -> None:
    log: Log = []
    reg = MemRegistry()
    ranges = [(WINDOW + i * M2 + K4, M2 - 2 * K4) for i in range(6)]  # split entries too
    fail_vaddr = ranges[at][0]
    maps = make_maps(reg, log, kinds, **{failing: {
        "fail_on": lambda action, v, n: action == REG and v == fail_vaddr}})
    reg.register(WINDOW + 12 * M2, M2)
    before = state(reg, maps, tables=False)
    log.clear()
    with pytest.raises(RuntimeError, match=f"{failing} refuses REGISTER"):
        reg.register_many(ranges)
    assert state(reg, maps, tables=False) == before
    # Everything heard is heard again with the opposite action, in exactly reverse order (a
    # notify_many map hears its batch reversed, in one call).
    flat = flatten(log)
    heard = [e for e in flat if e[1] == REG]
    undone = [e for e in flat if e[1] == UNREG]
    assert flat == heard + undone
    assert [(e[0], e[2:]) for e in undone] == [(e[0], e[2:]) for e in reversed(heard)]
    assert (failing, REG, fail_vaddr, ranges[at][1]) not in log  # the raiser is not undone
    # The same batch registers once nobody refuses.
    for mem_map in maps:
        mem_map.ops.notify.fail_on = None  # type: ignore[union-attr]
    reg.register_many(ranges)
    assert [m.lookup(ranges[at][0]) for m in maps] == [fail_vaddr] * 3


def test_unregister_many_rolls_back_when_a_callback_raises() -> None:
    log: Log = []
    reg = MemRegistry()
    ranges = [(WINDOW + i * M2, M2) for i in range(4)]
    fail = {"on": False}
    maps = make_maps(reg, log, "sb", b1={
        "fail_on": lambda action, v, n: fail["on"] and action == UNREG})
    reg.register_many(ranges)
    before = state(reg, maps)
    log.clear()
    fail["on"] = True
    with pytest.raises(RuntimeError, match="b1 refuses UNREGISTER"):
        reg.unregister_many(ranges)
    assert state(reg, maps) == before
    assert log == []  # the notify_many map is notified first (reverse order) and refused


@pytest.mark.parametrize(("batch", "code"), [
    ([(WINDOW + M2, M2)], errno.EBUSY),  # exactly a registered chunk
    ([(WINDOW + 3 * M2, M2), (WINDOW + 2 * M2 - K4, 2 * K4)], errno.EBUSY),  # tail of one
    ([(WINDOW + 5 * M2, M2), (WINDOW + 5 * M2 + K4, K4)], errno.EBUSY),  # inside the batch
    ([(WINDOW + 6 * M2, 2 * M2), (WINDOW + 5 * M2, 2 * M2)], errno.EBUSY),  # inside the batch
    ([(WINDOW + 3 * M2, M2), (WINDOW + 1, K4)], errno.EINVAL),  # unaligned
    ([(WINDOW, M2 + 5)], errno.EINVAL),
    ([(WINDOW, -K4)], errno.EINVAL),
    ([(-K4, K4)], errno.EINVAL),
    ([((1 << 48) - K4, 2 * K4)], errno.EINVAL),  # past the address space
    ([(1 << 48, K4)], errno.EINVAL),
    ([(1 << 64, K4)], errno.EINVAL),
    ([(1 << 70, K4)], errno.EINVAL),
    ([(float(WINDOW), K4)], errno.EINVAL),  # not an integer: refused, not truncated
    ([(WINDOW, K4, 1)], errno.EINVAL),  # not a pair
    ([(WINDOW,)], errno.EINVAL),
    (np.zeros((2, 3), dtype=np.int64), errno.EINVAL),
    (np.array([[WINDOW, 0.5]]), errno.EINVAL),
    ([("0x1000", K4)], errno.EINVAL),
])
def test_register_many_refuses_bad_batches_without_changing_anything(batch: Any,
                                                                     code: int) -> None:
    log: Log = []
    reg = MemRegistry()
    maps = make_maps(reg, log, "sb")
    reg.register(WINDOW + M2, M2)
    before = state(reg, maps)
    log.clear()
    expect_errno(code, reg.register_many, batch)
    assert state(reg, maps) == before and log == []


def test_empty_and_zero_length_batches_are_no_ops() -> None:
    log: Log = []
    reg = MemRegistry()
    make_maps(reg, log, "sb")
    for batch in ([], (), np.zeros((0, 2), dtype=np.uint64), [(WINDOW, 0), (WINDOW + M2, 0)]):
        reg.register_many(batch)
        reg.unregister_many(batch)
    assert log == [] and reg.chunks() == []


@pytest.mark.parametrize(("batch", "code"), [
    ([(WINDOW, M2), (WINDOW, M2)], errno.EINVAL),  # the same chunk twice
    ([(WINDOW, 2 * M2), (WINDOW + M2, M2)], errno.EINVAL),  # covered twice
    ([(WINDOW, K4)], errno.ERANGE),  # ends inside a chunk
    ([(WINDOW + M2, M2), (WINDOW + K4, K4)], errno.ERANGE),  # starts inside one
    ([(WINDOW + 4 * M2, M2)], errno.EINVAL),  # not registered
    ([(WINDOW, 4 * M2)], errno.EINVAL),  # runs over a gap
    ([(WINDOW + 3, M2)], errno.EINVAL),
])
def test_unregister_many_refuses_bad_batches_without_changing_anything(batch: Any,
                                                                       code: int) -> None:
    log: Log = []
    reg = MemRegistry()
    maps = make_maps(reg, log, "sb")
    reg.register_many([(WINDOW, M2), (WINDOW + M2, M2), (WINDOW + 3 * M2, M2)])
    before = state(reg, maps)
    log.clear()
    expect_errno(code, reg.unregister_many, batch)
    assert state(reg, maps) == before and log == []


def test_notify_many_calling_back_into_the_registry_gets_edeadlk() -> None:
    reg = MemRegistry()
    seen: list[int] = []

    def reentrant(mem_map: MemMap, ctx: Any, action: NotifyAction, vaddrs: Any,
                  lengths: Any) -> None:
        try:
            reg.register_many([(int(vaddrs[0]) + G1, M2)])
        except MemMapError as exc:
            seen.append(exc.errno)
            raise

    reg.alloc_map(0, MapOps(notify=Recorder([], "x"), notify_many=reentrant))
    with pytest.raises(MemMapError):
        reg.register_many([(WINDOW, M2)])
    assert seen == [errno.EDEADLK] and reg.chunks() == []


# ---------------------------------------------------------------- set_translations


def map_state(mem_map: MemMap) -> tuple[Any, ...]:
    return (mem_map.stats(), mem_map.translate_many(PROBES).tolist(),
            [mem_map.translate(p) for p in SCALAR_PROBES])


def seeded_map() -> MemMap:
    """A map with whole frames, split frames and a numpy mirror to keep in step."""
    mem_map = MemRegistry().alloc_map(0, MapOps(are_contiguous=lambda a, b: a == b))
    mem_map.set_translation(WINDOW, 6 * M2, 2)
    mem_map.set_translation(WINDOW + M2 + 5 * K4, K4, 3)
    mem_map.set_translation(WINDOW + 9 * M2 - K4, 2 * K4, 4)
    mem_map.translate_many([WINDOW])
    return mem_map


writes_st = st.lists(st.tuples(pages, st.integers(0, 3 * PAGES_PER_2M),
                               st.sampled_from([1, PAGES_PER_2M]),
                               st.sampled_from([0, 1, 2, 5, (1 << 64) - 1])), max_size=10)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes=writes_st, clear=st.booleans())
def test_set_translations_equals_successive_set_translation(writes: list[Any],
                                                            clear: bool) -> None:
    one, many = seeded_map(), seeded_map()
    ranges = [to_range(page, count, align) for page, count, align, _ in writes]
    values = [value for *_, value in writes]
    for (vaddr, length), value in zip(ranges, values, strict=True):
        if clear:
            one.clear_translation(vaddr, length)
        else:
            one.set_translation(vaddr, length, value)
    vaddrs = [v for v, _ in ranges]
    lengths = [n for _, n in ranges]
    if clear:
        many.clear_translations(vaddrs, lengths)
    else:
        many.set_translations(np.array(vaddrs, dtype=np.uint64), lengths, values)
    assert map_state(many) == map_state(one)


def test_set_translations_takes_one_value_for_all_ranges() -> None:
    mem_map = MemRegistry().alloc_map(0)
    mem_map.set_translations([WINDOW, WINDOW + 4 * M2], [M2, M2 + K4], 9)
    assert [mem_map.lookup(a) for a in (WINDOW, WINDOW + M2, WINDOW + 5 * M2,
                                        WINDOW + 5 * M2 + K4)] == [9, 0, 9, 0]


@pytest.mark.parametrize(("vaddrs", "lengths", "values"), [
    ([WINDOW], [M2, M2], 1),  # lengths do not match
    ([WINDOW], [M2], [1, 2]),  # values do not match
    ([WINDOW], [M2], -1),
    ([WINDOW], [M2], 1 << 64),
    ([WINDOW], [M2], 1.5),
    ([WINDOW + 8], [M2], 1),
    ([(1 << 48) - M2], [2 * M2], 1),
    ([WINDOW, -M2], [M2, M2], 1),
])
def test_set_translations_refuses_bad_input_without_changing_anything(
        vaddrs: Any, lengths: Any, values: Any) -> None:
    mem_map = seeded_map()
    before = map_state(mem_map)
    expect_errno(errno.EINVAL, mem_map.set_translations, vaddrs, lengths, values)
    assert map_state(mem_map) == before


BATCH_WRITES = {
    # whole 2 MiB frames over split entries, across the 1 GiB boundary, overlapping
    "frames": ([WINDOW, WINDOW + 8 * M2, WINDOW + 2 * M2], [4 * M2, 2 * M2, M2], [7, 8, 9]),
    # 4 KiB pieces: splits, a fold back, a write over a table boundary
    "pages": ([WINDOW + M2 + 5 * K4, WINDOW + 3 * K4, WINDOW + 7 * M2, WINDOW + 9 * M2 - K4],
              [K4, 4 * K4, 2 * M2 + 8 * K4, K4], [2, 6, 7, 2]),
}


@pytest.mark.parametrize(("vaddrs", "lengths", "values"), BATCH_WRITES.values(),
                         ids=BATCH_WRITES.keys())
def test_set_translations_enomem_at_any_allocation_leaves_the_map_unchanged(
        monkeypatch: pytest.MonkeyPatch, vaddrs: list[int], lengths: list[int],
        values: list[int]) -> None:
    counter = FailingAllocations(monkeypatch, None)
    expected = seeded_map()
    counter.calls = 0
    expected.set_translations(vaddrs, lengths, values)
    allocations = counter.calls
    assert allocations >= 2
    for fail_at in range(1, allocations + 1):
        mem_map = seeded_map()
        before = map_state(mem_map)
        counter.calls, counter.fail_at = 0, fail_at
        err = expect_errno(errno.ENOMEM, mem_map.set_translations, vaddrs, lengths, values)
        assert isinstance(err.__cause__, MemoryError)
        assert map_state(mem_map) == before, f"changed by a failure at {fail_at}"
        counter.fail_at = None
        mem_map.set_translations(vaddrs, lengths, values)
        assert map_state(mem_map) == map_state(expected)


def test_large_batches_of_whole_frames_fill_whole_tables() -> None:
    mem_map = MemRegistry().alloc_map(0)
    base = 5 * G1 - M2
    vaddrs = np.arange(base, base + 3 * G1, M2, dtype=np.uint64)
    mem_map.set_translations(vaddrs, np.full(vaddrs.size, M2), vaddrs)
    assert mem_map.stats() == {"tables": 4, "split_entries": 0}
    probes = vaddrs[::7] + np.uint64(12345)
    assert mem_map.translate_many(probes).tolist() == vaddrs[::7].tolist()
    mem_map.clear_translations(vaddrs[::2], np.full(vaddrs[::2].size, M2))
    assert [mem_map.lookup(int(a)) for a in vaddrs[:4]] == [0, int(vaddrs[1]), 0,
                                                            int(vaddrs[3])]
