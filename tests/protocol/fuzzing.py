"""Shared by the hypothesis fuzz test and the atheris target: drive a Framer with hostile input.

``run_framer(chunks)`` feeds (bytes, fd count) pairs, creating real eventfds for each chunk. Only
ProtocolError may escape a feed; afterwards every fd the run created must be closed again, either
by the framer (rejections, ``close``) or by the caller (fds handed out in messages).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from protocol import Framer, ProtocolError, build_message

HDR = struct.Struct("<III")

# Valid messages to mutate: one of each common request, and some replies.
SEEDS: list[tuple[bytes, int]] = [
    (HDR.pack(1, 1, 0), 0),
    (HDR.pack(2, 1, 8) + (0x140000046).to_bytes(8, "little"), 0),
    (HDR.pack(5, 9, 40) + struct.pack("<II4Q", 1, 0, 0, 1 << 29, 1 << 40, 0), 1),
    (HDR.pack(8, 1, 8) + struct.pack("<II", 0, 128), 0),
    (HDR.pack(9, 1, 40) + struct.pack("<II4Q", 0, 0, 1, 2, 3, 4), 0),
    (HDR.pack(12, 1, 8) + struct.pack("<Q", 0), 1),
    (HDR.pack(13, 1, 8) + struct.pack("<Q", 0x100), 0),
    (HDR.pack(21, 9, 0), 1),
    (HDR.pack(24, 1, 69) + struct.pack("<III", 0, 57, 0) + bytes(57), 0),
    (HDR.pack(37, 9, 40) + struct.pack("<5Q", 0, 0, 1 << 29, 1 << 40, 0), 1),
    (HDR.pack(38, 9, 40) + struct.pack("<5Q", 0, 0, 1 << 29, 1 << 40, 0), 0),
]


def run_framer(chunks: Sequence[tuple[bytes, int]], sender: str = "frontend") -> int:
    """Feed the chunks; return how many messages came out. Raises only on a real bug."""
    framer = Framer(sender)
    delivered = 0
    try:
        for data, nfds in chunks:
            fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
            try:
                messages = framer.feed(data, fds)
            except ProtocolError:
                return delivered
            for msg in messages:
                # what came out must encode back to a decodable message
                assert build_message(msg)
                delivered += 1
                for fd in msg.fds:
                    os.close(fd)
    finally:
        framer.close()
    return delivered
