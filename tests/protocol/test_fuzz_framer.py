"""Fuzz the framer with random and mutated streams and fd counts (hypothesis).

Only ProtocolError may escape, and no fd opened by the test may stay open (/proc/self/fd).
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import ProtocolError, parse_message
from tests.protocol.captures import open_fd_count
from tests.protocol.fuzzing import SEEDS, run_framer

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS))[0])
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(max_size=8))
    return bytes(data)


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    return [stream[a:b] for a, b in itertools.pairwise(bounds)] or [b""]


chunk_fds = st.integers(0, 3)


@FUZZ
@given(st.lists(st.tuples(st.binary(max_size=64), chunk_fds), max_size=8))
def test_random_bytes(chunks: list[tuple[bytes, int]]) -> None:
    before = open_fd_count()
    run_framer(chunks)
    assert open_fd_count() == before


MUTATED_STREAMS = (
    st.lists(mutated(), min_size=1, max_size=6),
    st.lists(st.integers(0, 5000), max_size=6),
    st.lists(chunk_fds, min_size=1, max_size=12),
    st.sampled_from(["frontend", "backend"]),
)


@FUZZ
@given(*MUTATED_STREAMS)
def test_mutated_streams(
    messages: list[bytes], cuts: list[int], fds: list[int], sender: str
) -> None:
    before = open_fd_count()
    pieces = split(b"".join(messages), cuts)
    run_framer([(p, fds[i % len(fds)]) for i, p in enumerate(pieces)], sender)
    assert open_fd_count() == before


@FUZZ
@given(st.lists(st.sampled_from(SEEDS), min_size=1, max_size=10))
def test_valid_streams_never_fail(seeds: list[tuple[bytes, int]]) -> None:
    before = open_fd_count()
    assert run_framer(seeds) == len(seeds)
    assert open_fd_count() == before


@FUZZ
@given(mutated(), st.integers(0, 9))
def test_parse_message_raises_only_protocol_error(data: bytes, nfds: int) -> None:
    try:
        msg = parse_message(data, nfds)
    except ProtocolError as exc:
        assert exc.reason and str(exc).endswith(exc.reason)
    else:
        assert msg.fds == []
