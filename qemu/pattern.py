"""The data pattern the guest writes, rebuilt on the host to check the image byte by byte.

The guest program (qemu/guest/vmtest.c) implements MT19937 seeded exactly like
``random.Random(seed)`` for ``0 <= seed < 2**32`` and emits its 32-bit outputs little-endian,
which is what ``random.Random(seed).randbytes(n)`` returns. Both sides therefore agree on every
byte without shipping the pattern into the guest.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

MAX_SEED = (1 << 32) - 2  # the last sector uses seed + 1, which must stay a 32-bit value
MIB = 1 << 20


def pattern(seed: int, length: int) -> bytes:
    """The first ``length`` bytes of the stream for ``seed`` (length a multiple of 4)."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"pattern seed {seed} outside 0..{MAX_SEED}")
    if length % 4:
        raise ValueError(f"pattern length {length} is not a multiple of 4")
    return random.Random(seed).randbytes(length)


@dataclass(frozen=True)
class Range:
    """A byte range ``[offset, offset + length)`` of the disk."""

    offset: int
    length: int

    def arg(self) -> str:
        """The form the guest takes on its command line: ``OFF:LEN``."""
        return f"{self.offset}:{self.length}"


@dataclass(frozen=True)
class DiskLayout:
    """Where the guest's range operations land; all offsets are MiB-aligned."""

    size: int
    block_size: int
    discard: Range
    zeroout: Range

    @classmethod
    def for_size(cls, size: int, block_size: int = 512) -> DiskLayout:
        """Discard the second quarter's first MiB, zero the third quarter's first MiB."""
        if size < 8 * MIB or size % MIB:
            raise ValueError(f"disk size {size} must be a whole number of MiB, at least 8 MiB")
        quarter = size // 4 // MIB * MIB
        return cls(size, block_size, Range(quarter, MIB), Range(2 * quarter, MIB))


def expected_image(layout: DiskLayout, seed: int, *, discard_zeroes: bool) -> bytearray:
    """The bytes a read-write round of the guest program leaves on the disk.

    When the backend does not promise zeroes after a discard, the discarded range keeps
    whatever the backend left; the caller masks it with ``copy_range`` from the actual image.
    """
    image = bytearray(pattern(seed, layout.size))
    image[-layout.block_size :] = pattern(seed + 1, layout.block_size)
    zero_ranges = [layout.zeroout, layout.discard] if discard_zeroes else [layout.zeroout]
    for r in zero_ranges:
        image[r.offset : r.offset + r.length] = bytes(r.length)
    return image


def first_difference(actual: bytes, expected: bytes) -> int | None:
    """Offset of the first differing byte (length mismatch counts), or None when equal."""
    if actual == expected:
        return None
    step = MIB
    for off in range(0, min(len(actual), len(expected)), step):
        a, e = actual[off : off + step], expected[off : off + step]
        if a != e:
            return off + next(i for i, (x, y) in enumerate(zip(a, e, strict=False)) if x != y)
    return min(len(actual), len(expected))


def md5_hex(data: bytes) -> str:
    """The digest the guest prints for its buffered read of the whole disk."""
    return hashlib.md5(data).hexdigest()
