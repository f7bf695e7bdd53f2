"""The session fuzz target's ring mode (tests/fuzz/fuzz_session.py, FUZZ_SESSION_RING): every
input reaches the ring of its layout, where the plain session target needs a whole valid
session in the input first. Run here without atheris, over the ring mode's seeds."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from vhostmem.descriptors import DescChain
from vhostmem.packed_ring import PackedRing
from vhostmem.split_ring import SplitRing

FUZZ_DIR = Path(__file__).resolve().parents[1] / "fuzz"


@pytest.fixture
def fuzz_session(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The target module; the logging it reconfigures is put back afterwards."""
    monkeypatch.syspath_prepend(str(FUZZ_DIR))
    import fuzz_session

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield fuzz_session
    logging.disable(logging.NOTSET)
    root.handlers, root.level = handlers, level


def count_pops(monkeypatch: pytest.MonkeyPatch, layout: str) -> list[int]:
    """Heads (buffer ids) of the chains the layout's ``pop`` (and the split ``pop_batch``)
    hands out from now on."""
    cls = PackedRing if layout == "packed" else SplitRing
    heads: list[int] = []
    pop: Callable[[object], DescChain | None] = cls.pop

    def counted(self: object) -> DescChain | None:
        chain = pop(self)
        if chain is not None:
            heads.append(chain.head)
        return chain

    monkeypatch.setattr(cls, "pop", counted)
    if cls is SplitRing:  # inline turns take split chains a batch at a time
        pop_batch: Callable[[object], list[DescChain]] = SplitRing.pop_batch

        def counted_batch(self: object) -> list[DescChain]:
            batch = pop_batch(self)
            heads.extend(chain.head for chain in batch)
            return batch

        monkeypatch.setattr(SplitRing, "pop_batch", counted_batch)
    return heads


@pytest.mark.parametrize("layout", ["packed", "split"])
def test_every_ring_mode_seed_pops_its_chain(fuzz_session: ModuleType,
                                             monkeypatch: pytest.MonkeyPatch,
                                             layout: str) -> None:
    heads = count_pops(monkeypatch, layout)
    seeds = fuzz_session.ring_seeds(layout)
    # One target at a time: each checks the process's fds against those at its building.
    session_mode = fuzz_session.build_target()
    for data in seeds.values():
        session_mode(data)  # no session in the input: the ring never starts
    assert heads == []
    ring_mode = fuzz_session.build_target(ring=layout)
    for name, data in seeds.items():
        heads.clear()
        ring_mode(data)
        assert heads[:1] == [0], name  # the seed's chain, before any mutator write


def test_an_unknown_layout_is_refused(fuzz_session: ModuleType) -> None:
    with pytest.raises(ValueError, match="FUZZ_SESSION_RING='spilt'"):
        fuzz_session.build_target(ring="spilt")
