"""Property: build(parse(x)) == x for every request, reply shape and allowed fd count."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from enum import IntEnum

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    BACKEND_SPECS,
    FRONTEND_SPECS,
    MAX_FDS,
    Framer,
    build_message,
    parse_message,
    split_packed_base,
)
from protocol.codec import decode_payload
from protocol.messages import Shape
from protocol.spec import FdRule, RequestSpec
from protocol.vring import join_packed_base

HDR = struct.Struct("<III")
VERSION, REPLY, NEED_REPLY = 0x1, 0x4, 0x8


def raw(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


u32 = st.integers(0, 2**32 - 1)
vring_index = st.integers(0, 255)


@st.composite
def vring_file(draw: st.DrawFn) -> bytes:
    return struct.pack("<Q", draw(vring_index) | draw(st.sampled_from([0, 0x100])))


@st.composite
def index_then(draw: st.DrawFn, rest: int) -> bytes:
    return struct.pack("<I", draw(vring_index)) + draw(raw(rest))


@st.composite
def memory_table(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 8))
    return struct.pack("<II", n, draw(u32)) + draw(raw(32 * n))


@st.composite
def config(draw: st.DrawFn) -> bytes:
    data = draw(st.binary(max_size=256))
    return struct.pack("<III", draw(u32), len(data), draw(u32)) + data


@st.composite
def shmem_config(draw: st.DrawFn) -> bytes:
    return struct.pack("<I", draw(st.integers(0, 256))) + draw(raw(2052))


@st.composite
def vring_area(draw: st.DrawFn) -> bytes:
    return draw(vring_file()) + draw(raw(16))


PAYLOADS: dict[str, st.SearchStrategy[bytes]] = {
    "empty": st.just(b""),
    "u64": raw(8),
    "vring file": vring_file(),
    "vring state": index_then(4),
    "vring addr": index_then(36),
    "memory table": memory_table(),
    "single memory region": raw(40),
    "log": raw(16),
    "iotlb": raw(32),
    "config": config(),
    "vring area": vring_area(),
    "inflight": raw(24),
    "shared object": raw(16),
    "device state": raw(8),
    "shmem map": raw(40),
    "shmem config": shmem_config(),
    "crypto session": st.binary(max_size=600),
}


def cases() -> Iterator[tuple[str, RequestSpec, str, int, Shape, FdRule]]:
    """(id, spec, sender, flags, shape, fd rule) for every request and every reply shape."""
    for table, requester in ((FRONTEND_SPECS, "frontend"), (BACKEND_SPECS, "backend")):
        replier = "backend" if requester == "frontend" else "frontend"
        for spec in table.values():
            name = spec.request.name
            for flags in (VERSION, VERSION | NEED_REPLY):
                yield f"{name}-{flags}", spec, requester, flags, spec.payload, spec.fds
            for shape, rule in spec.reply_shapes():
                yield f"{name}-reply-{shape.name}", spec, replier, VERSION | REPLY, shape, rule


CASES = list(cases())


class FdPool:
    """Real eventfds reused across examples: valid messages never close them."""

    def __init__(self) -> None:
        self.fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(MAX_FDS)]

    def take(self, n: int) -> list[int]:
        return self.fds[:n]


POOL = FdPool()


def wire(request: IntEnum, flags: int, payload: bytes) -> bytes:
    return HDR.pack(int(request), flags, len(payload)) + payload


@pytest.mark.parametrize(("spec", "sender", "flags", "shape", "rule"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])  # fmt: skip
@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_build_of_parse_is_identity(
    spec: RequestSpec, sender: str, flags: int, shape: Shape, rule: FdRule, data: st.DataObject
) -> None:
    payload = data.draw(PAYLOADS[shape.name], label="payload")
    decoded = decode_payload(spec.request, shape, memoryview(payload))
    nfds = data.draw(st.sampled_from(rule.allowed(decoded)), label="nfds")
    message_bytes = wire(spec.request, flags, payload)
    fds = POOL.take(nfds)
    msg = parse_message(message_bytes, sender=sender, fds=fds)  # type: ignore[arg-type]
    assert msg.request is spec.request and msg.flags == flags and msg.fds == fds
    assert build_message(msg) == message_bytes
    # and the framer agrees with the one-shot parser, fed in two pieces
    cut = data.draw(st.integers(1, len(message_bytes)), label="cut")
    framer = Framer(sender)
    got = framer.feed(message_bytes[:cut], fds) + framer.feed(message_bytes[cut:])
    assert got == [msg]


def test_every_shape_has_a_strategy() -> None:
    assert {c[4].name for c in CASES} == set(PAYLOADS)


@given(st.integers(0, 0x7FFF), st.booleans(), st.integers(0, 0x7FFF), st.booleans())
def test_packed_ring_base_split_and_join(avail: int, aw: bool, used: int, uw: bool) -> None:
    num = join_packed_base(avail, aw, used, uw)
    assert num < 2**32
    assert split_packed_base(num) == (avail, aw, used, uw)


def test_packed_ring_base_bit_positions() -> None:
    assert join_packed_base(1, False, 0, False) == 1
    assert join_packed_base(0, True, 0, False) == 1 << 15
    assert join_packed_base(0, False, 1, False) == 1 << 16
    assert join_packed_base(0, False, 0, True) == 1 << 31
    with pytest.raises(ValueError, match="15 bits"):
        join_packed_base(0x8000, False, 0, False)
