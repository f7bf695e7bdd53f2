"""Stateful test: random register/unregister/set/clear/translate sequences against a model.

The model is a dict per map from 4 KiB page number to translation, plus a dict of registered
pages and the set of chunk-start pages (SPDK's REGISTERED / NOTIFY_START flags). The window of
addresses straddles a 1 GiB table boundary, and ranges come with 4 KiB or 2 MiB alignment.
"""

from __future__ import annotations

import errno
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vhostmem.memmap import MapOps, MemMap, MemMapError, MemRegistry, NotifyAction

K4 = 4096
M2 = 2 << 20
PAGES_PER_2M = M2 // K4
WINDOW = (1 << 30) - 4 * M2  # 2 MiB aligned; the window crosses the 1 GiB boundary
PAGES = 4 * PAGES_PER_2M * 2  # 8 MiB window
B_DEFAULT = 7

starts = st.integers(0, PAGES - 1)
lengths = st.integers(1, 3 * PAGES_PER_2M)
aligns = st.sampled_from([1, PAGES_PER_2M])


def page_range(start: int, length: int, align: int) -> tuple[int, int]:
    """A range of pages [first, stop) inside the window, aligned to ``align`` pages."""
    first = start // align * align
    stop = min(PAGES, first + max(align, (length + align - 1) // align * align))
    return first, stop


def addr(page: int) -> int:
    return WINDOW + page * K4


class Model:
    """Translations of one map: page -> value, everything else the default."""

    def __init__(self, default: int, contiguous: bool) -> None:
        self.pages: dict[int, int] = {}
        self.default, self.contiguous = default, contiguous

    def value(self, page: int) -> int:
        """Translation of a page (pages outside the window are never set: default)."""
        return self.pages.get(page, self.default)

    def store(self, first: int, stop: int, value: int | None) -> None:
        for page in range(first, stop):
            if value is None or value == self.default:
                self.pages.pop(page, None)
            else:
                self.pages[page] = value

    def translate(self, vaddr: int, size: int | None) -> tuple[int, int]:
        page = (vaddr - WINDOW) // K4
        value = self.value(page)
        frame = page // PAGES_PER_2M * PAGES_PER_2M
        uniform = all(self.value(p) == value for p in range(frame, frame + PAGES_PER_2M))
        rest = M2 - vaddr % M2 if uniform else K4 - vaddr % K4
        if size is None:
            return value, rest
        if size <= rest or not self.contiguous or value == self.default:
            return value, min(size, rest)
        nxt = (vaddr + rest - WINDOW) // K4
        while rest < size and self.value(nxt) == value:
            rest += K4
            nxt += 1
        return value, min(size, rest)


class MemMapMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.reg = MemRegistry()
        self.fail = False
        # A: translation = start address of the chunk, kept by its notify callback.
        self.a = self.reg.alloc_map(0, MapOps(notify=self.notify,
                                              are_contiguous=lambda x, y: x == y))
        # F: notified last; raises while ``fail`` is set, to exercise the rollback.
        self.reg.alloc_map(0, MapOps(notify=self.failing))
        # B: no notify; driven by set/clear directly.
        self.b = self.reg.alloc_map(B_DEFAULT)
        self.late: MemMap | None = None
        self.model_a = Model(0, contiguous=True)
        self.model_b = Model(B_DEFAULT, contiguous=False)
        self.registered: dict[int, int] = {}  # page -> chunk start page
        self.chunk_starts: set[int] = set()

    @staticmethod
    def notify(mem_map: MemMap, ctx: Any, action: NotifyAction, vaddr: int, n: int) -> None:
        if action == NotifyAction.REGISTER:
            mem_map.set_translation(vaddr, n, vaddr)
        else:
            mem_map.clear_translation(vaddr, n)

    def failing(self, mem_map: MemMap, ctx: Any, action: NotifyAction, vaddr: int,
                n: int) -> None:
        if self.fail:
            raise RuntimeError("refused")

    # ---------------------------------------------------------------- rules

    @rule(start=starts, length=lengths, align=aligns, fail=st.booleans())
    def register(self, start: int, length: int, align: int, fail: bool) -> None:
        first, stop = page_range(start, length, align)
        busy = any(p in self.registered for p in range(first, stop))
        self.fail = fail
        try:
            self.reg.register(addr(first), (stop - first) * K4)
        except MemMapError as exc:
            assert busy and exc.errno == errno.EBUSY
            return
        except RuntimeError:
            assert fail and not busy
            return
        finally:
            self.fail = False
        assert not busy and not fail
        for page in range(first, stop):
            self.registered[page] = first
        self.chunk_starts.add(first)
        self.model_a.store(first, stop, addr(first))

    @rule(start=starts, length=lengths, align=aligns, fail=st.booleans())
    def unregister(self, start: int, length: int, align: int, fail: bool) -> None:
        first, stop = page_range(start, length, align)
        expected = self.unregister_errno(first, stop)
        self.fail = fail
        try:
            self.reg.unregister(addr(first), (stop - first) * K4)
        except MemMapError as exc:
            assert exc.errno == expected, (exc, expected)
            return
        except RuntimeError:
            assert fail and expected is None
            return
        finally:
            self.fail = False
        assert expected is None and not fail
        for page in range(first, stop):
            del self.registered[page]
            self.chunk_starts.discard(page)
        self.model_a.store(first, stop, None)

    def unregister_errno(self, first: int, stop: int) -> int | None:
        """SPDK's checks, page by page."""
        if first in self.registered and first not in self.chunk_starts:
            return errno.ERANGE
        if any(p not in self.registered for p in range(first, stop)):
            return errno.EINVAL
        if stop in self.registered and stop not in self.chunk_starts:
            return errno.ERANGE
        return None

    @rule(start=starts, length=lengths, align=aligns, value=st.sampled_from([0, 1, 2, 7]))
    def set_b(self, start: int, length: int, align: int, value: int) -> None:
        first, stop = page_range(start, length, align)
        self.b.set_translation(addr(first), (stop - first) * K4, value)
        self.model_b.store(first, stop, value)

    @rule(start=starts, length=lengths, align=aligns)
    def clear_b(self, start: int, length: int, align: int) -> None:
        first, stop = page_range(start, length, align)
        self.b.clear_translation(addr(first), (stop - first) * K4)
        self.model_b.store(first, stop, None)

    @precondition(lambda self: self.late is None)
    @rule()
    def alloc_late_map(self) -> None:
        self.late = self.reg.alloc_map(0, MapOps(notify=self.notify,
                                                 are_contiguous=lambda x, y: x == y))

    @precondition(lambda self: self.late is not None)
    @rule()
    def free_late_map(self) -> None:
        assert self.late is not None
        self.reg.free_map(self.late)
        self.late = None

    @rule(page=st.integers(-4, PAGES + 4), offset=st.integers(0, K4 - 1),
          size=st.none() | st.integers(0, 3 * M2))
    def translate(self, page: int, offset: int, size: int | None) -> None:
        vaddr = addr(page) + offset
        pairs = [(self.a, self.model_a), (self.b, self.model_b)]
        if self.late is not None:
            pairs.append((self.late, self.model_a))
        for mem_map, model in pairs:
            assert mem_map.translate(vaddr, size) == model.translate(vaddr, size)
            assert mem_map.lookup(vaddr) == model.translate(vaddr, None)[0]

    @rule(stride=st.sampled_from([K4, 3 * K4 + 17, 64 * K4 + 5]))
    def translate_many(self, stride: int) -> None:
        addresses = np.arange(WINDOW - M2, WINDOW + PAGES * K4 + M2, stride, dtype=np.uint64)
        for mem_map, model in ((self.a, self.model_a), (self.b, self.model_b)):
            got = mem_map.translate_many(addresses).tolist()
            assert got == [model.value((int(a) - WINDOW) // K4) for a in addresses]

    # ---------------------------------------------------------------- invariants

    @invariant()
    def chunks_match(self) -> None:
        chunks = []
        for first in sorted(self.chunk_starts):
            stop = first
            while self.registered.get(stop) == first:
                stop += 1
            chunks.append((addr(first), (stop - first) * K4))
        assert self.reg.chunks() == chunks


MemMapMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestMemMapStateMachine = MemMapMachine.TestCase
