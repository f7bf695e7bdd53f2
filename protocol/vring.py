"""The ``num`` of SET_VRING_BASE / GET_VRING_BASE for packed rings (vhost-user.rst).

Split rings use only bits 0-15 (the next available index). Packed rings pack four fields:
bits 0-14 next available index, bit 15 driver wrap counter, bits 16-30 next used index,
bit 31 device wrap counter.
"""

from __future__ import annotations

from typing import NamedTuple

from protocol.constants import (
    PACKED_AVAIL_IDX_MASK,
    PACKED_AVAIL_WRAP_SHIFT,
    PACKED_USED_IDX_SHIFT,
    PACKED_USED_WRAP_SHIFT,
)


class PackedBase(NamedTuple):
    avail_idx: int
    avail_wrap: bool
    used_idx: int
    used_wrap: bool


def split_packed_base(num: int) -> PackedBase:
    """Unpack a packed-ring vring state ``num`` into its four fields."""
    return PackedBase(
        num & PACKED_AVAIL_IDX_MASK,
        bool(num >> PACKED_AVAIL_WRAP_SHIFT & 1),
        num >> PACKED_USED_IDX_SHIFT & PACKED_AVAIL_IDX_MASK,
        bool(num >> PACKED_USED_WRAP_SHIFT & 1),
    )


def join_packed_base(avail_idx: int, avail_wrap: bool, used_idx: int, used_wrap: bool) -> int:
    """Pack the four fields into a vring state ``num``; indices must fit in 15 bits."""
    for name, idx in (("avail_idx", avail_idx), ("used_idx", used_idx)):
        if not 0 <= idx <= PACKED_AVAIL_IDX_MASK:
            raise ValueError(f"{name} {idx} does not fit in 15 bits")
    return (
        avail_idx
        | int(avail_wrap) << PACKED_AVAIL_WRAP_SHIFT
        | used_idx << PACKED_USED_IDX_SHIFT
        | int(used_wrap) << PACKED_USED_WRAP_SHIFT
    )
