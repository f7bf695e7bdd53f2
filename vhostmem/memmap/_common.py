"""Constants, errors and small value types shared by the memory-map modules."""

from __future__ import annotations

import errno
import operator
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vhostmem.memmap._map import MemMap

# Address layout (x86-64 user space, as SPDK assumes): 48 usable VA bits.
VA_BITS = 48
SHIFT_4K = 12
SHIFT_2M = 21
SHIFT_1G = 30
PAGE_4K = 1 << SHIFT_4K
PAGE_2M = 1 << SHIFT_2M
MASK_4K = PAGE_4K - 1
MASK_2M = PAGE_2M - 1
# Entries per level: 512 2 MiB entries in a 1 GiB table, 512 4 KiB entries in a split 2 MiB entry.
ENTRIES = 1 << (SHIFT_1G - SHIFT_2M)
ENTRY_MASK = ENTRIES - 1
SUB_ENTRIES = 1 << (SHIFT_2M - SHIFT_4K)
SUB_MASK = SUB_ENTRIES - 1
# Number of 1 GiB tables that cover the 48-bit address space (2^18).
L1_ENTRIES = 1 << (VA_BITS - SHIFT_1G)
VA_LIMIT = 1 << VA_BITS
# Translations are stored as unsigned 64-bit values, as in SPDK (and in the numpy mirror).
TRANSLATION_LIMIT = 1 << 64


class MemMapError(OSError):
    """A memory-map operation was refused; ``errno`` says why (EINVAL, EBUSY, ERANGE, ENOMEM)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)


class NotifyAction(IntEnum):
    """What a notify callback is told about a chunk of registered memory."""

    REGISTER = 0
    UNREGISTER = 1


NotifyCallback = Callable[["MemMap", Any, NotifyAction, int, int], None]
# notify_many(map, ctx, action, vaddrs, lengths): numpy uint64 arrays, read-only.
NotifyManyCallback = Callable[["MemMap", Any, NotifyAction, Any, Any], None]
ContiguityCallback = Callable[[int, int], bool]


@dataclass(frozen=True, slots=True)
class MapOps:
    """Callbacks of a map.

    ``notify(map, ctx, action, vaddr, length)`` is called for every registration change; it
    signals failure by raising. ``are_contiguous(prev, cur)`` tells ``translate(..., size=N)``
    whether the translation of the next page continues the previous one.

    ``notify_many(map, ctx, action, vaddrs, lengths)`` is optional and only used with
    ``notify``: ``register_many`` / ``unregister_many`` call it once per batch instead of
    calling ``notify`` once per range. ``vaddrs`` and ``lengths`` are read-only numpy uint64
    arrays in the order ``notify`` would have heard the ranges, and the call must have the
    effect of those ``notify`` calls (e.g. one ``MemMap.set_translations``). Like ``notify``
    it signals failure by raising, after leaving its own map as it found it.
    """

    notify: NotifyCallback | None = None
    are_contiguous: ContiguityCallback | None = None
    notify_many: NotifyManyCallback | None = None


def check_range(what: str, vaddr: int, length: int) -> tuple[int, int]:
    """Validate a (vaddr, length) pair: 4 KiB aligned, inside the 48-bit space. Return ints."""
    vaddr = operator.index(vaddr)
    length = operator.index(length)
    if vaddr < 0 or length < 0 or vaddr + length > VA_LIMIT:
        raise MemMapError(
            errno.EINVAL,
            f"{what}: vaddr={vaddr:#x} length={length:#x} is outside the 48-bit address space",
        )
    if (vaddr | length) & MASK_4K:
        raise MemMapError(
            errno.EINVAL,
            f"{what}: vaddr={vaddr:#x} and length={length:#x} must be 4 KiB multiples",
        )
    return vaddr, length


def check_translation(translation: int) -> int:
    """Translations are unsigned 64-bit integers."""
    translation = operator.index(translation)
    if not 0 <= translation < TRANSLATION_LIMIT:
        raise MemMapError(
            errno.EINVAL, f"translation {translation:#x} is not an unsigned 64-bit value"
        )
    return translation


def bad_vaddr(vaddr: int) -> MemMapError:
    return MemMapError(errno.EINVAL, f"vaddr {vaddr:#x} is outside the 48-bit address space")
