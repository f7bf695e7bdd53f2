"""Every message of the recorded QEMU 7.2 sessions decodes right and re-encodes byte-identical."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from protocol import (
    BackendRequest,
    BlkFeature,
    Framer,
    FrontendRequest,
    Message,
    ProtocolError,
    ProtocolFeature,
    VirtioFeature,
    build_message,
    feature_names,
    parse_message,
)
from protocol.blk import parse_blk_config
from tests.protocol.captures import (
    CAPTURES_DIR,
    Record,
    capture_files,
    capture_ids,
    close_all,
    fd_is_open,
    load_records,
    make_fds,
    no_fd_leak,
)

# The capture's independent decoder names some virtio bits differently.
CAPTURE_FEATURE_NAMES = {
    "LOG_ALL": "VHOST_F_LOG_ALL",
    "INDIRECT_DESC": "RING_INDIRECT_DESC",
    "EVENT_IDX": "RING_EVENT_IDX",
}
# Requests seen in the captures that take a u64 feature mask (request or reply).
FEATURE_REQUESTS = {FrontendRequest.GET_FEATURES, FrontendRequest.SET_FEATURES}
PROTOCOL_FEATURE_REQUESTS = {
    FrontendRequest.GET_PROTOCOL_FEATURES,
    FrontendRequest.SET_PROTOCOL_FEATURES,
}


def as_int(value: Any) -> int:
    return int(value, 0) if isinstance(value, str) else int(value)


def virtio_feature_names(value: int) -> set[str]:
    names = {"BLK_" + n for n in feature_names(value, BlkFeature) if n not in ("BARRIER", "SCSI")}
    for name in feature_names(value, VirtioFeature):
        names.add(CAPTURE_FEATURE_NAMES.get(name, name))
    return names


def check_against_decoded(msg: Message, rec: Record) -> int:
    """Compare our decoding with the capture's independent one; returns fields compared."""
    d = rec.decoded
    checked = 0
    if "u64" in d:
        assert msg.payload == as_int(d["u64"])
        checked += 1
    if "features" in d:
        assert msg.request in FEATURE_REQUESTS
        assert virtio_feature_names(msg.payload) == set(d["features"])
        checked += 1
    if "protocol_features" in d:
        assert msg.request in PROTOCOL_FEATURE_REQUESTS
        assert feature_names(msg.payload, ProtocolFeature) == d["protocol_features"]
        checked += 1
    if "vring_index" in d:
        assert msg.payload.index == d["vring_index"]
        assert msg.payload.nofd == d["nofd_flag(0x100)"]
        checked += 1
    for key in ("vring_state", "vring_addr"):
        if key in d:
            for field, value in d[key].items():
                assert msg.payload[field] == as_int(value), (key, field)
            checked += 1
    if "config" in d:
        cfg = d["config"]
        assert (msg.payload.offset, msg.payload.size, msg.payload.flags) == (
            cfg["offset"],
            cfg["size"],
            cfg["flags"],
        )
        assert len(msg.payload.payload) == cfg["data_len"]
        checked += 1
    if "regions" in d:
        assert msg.payload.nregions == d["nregions"] == len(msg.payload.regions)
        for ours, theirs in zip(msg.payload.regions, d["regions"], strict=True):
            check_region(ours, theirs)
        checked += 1
    if "region" in d:
        check_region(msg.payload.region, d["region"])
        checked += 1
    return checked


def check_region(ours: Any, theirs: dict[str, Any]) -> None:
    for field in ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"):
        assert ours[field] == as_int(theirs[field]), field


def test_captures_are_present() -> None:
    assert CAPTURES_DIR.is_dir(), f"captures directory missing: {CAPTURES_DIR.resolve()}"
    assert len(capture_files()) >= 3, f"expected 3 captures in {CAPTURES_DIR.resolve()}"


@pytest.mark.parametrize("name", capture_ids())
def test_every_message_decodes_and_reencodes(name: str) -> None:
    records = load_records(name)
    checked = 0
    with no_fd_leak():
        for rec in records:
            fds = make_fds(rec)
            msg = parse_message(rec.wire, sender=rec.sender, fds=fds)  # type: ignore[arg-type]
            expected_enum = (
                FrontendRequest if (rec.sender == "frontend") != msg.is_reply else (BackendRequest)
            )
            assert isinstance(msg.request, expected_enum)
            assert msg.request.name == rec.name and msg.request == rec.request
            assert msg.flags == rec.flags
            assert msg.is_reply == bool(rec.flags & 0x4)
            assert msg.need_reply == bool(rec.flags & 0x8)
            assert msg.fds == fds and all(fd_is_open(fd) for fd in fds)  # handed through
            assert build_message(msg) == rec.wire, f"seq {rec.seq} re-encodes differently"
            checked += check_against_decoded(msg, rec)
            close_all(fds)
    assert checked >= len(records) // 2, "too few records had a decoding to compare with"


@pytest.mark.parametrize("name", capture_ids())
def test_reply_payload_types(name: str) -> None:
    """Replies are typed by the request they answer (u64, vring state, config, ack)."""
    for rec in load_records(name):
        if not rec.flags & 0x4:
            continue
        msg = parse_message(rec.wire, rec.nfds, sender="backend")
        if msg.request == FrontendRequest.GET_VRING_BASE:
            assert set(msg.payload) >= {"index", "num"}
        elif msg.request == FrontendRequest.GET_CONFIG:
            config = parse_blk_config(msg.payload.payload)
            assert config.capacity * 512 == 64 << 20  # the 64 MiB image
            assert config.blk_size == 512
        else:  # a u64: feature masks, counts, and REPLY_ACK statuses
            assert isinstance(msg.payload, int)


@pytest.mark.parametrize("name", capture_ids())
def test_bad_copy_of_each_fd_message_closes_its_fds(name: str) -> None:
    """Corrupt the flags of every message that carries fds: the fds must be closed."""
    with no_fd_leak():
        for rec in load_records(name):
            if not rec.nfds:
                continue
            fds = make_fds(rec)
            bad = bytearray(rec.wire)
            bad[4] |= 0x40  # reserved flag bit
            with pytest.raises(ProtocolError, match=rec.name) as info:
                parse_message(bytes(bad), sender=rec.sender, fds=fds)  # type: ignore[arg-type]
            assert "reserved flag" in info.value.reason
            assert not any(fd_is_open(fd) for fd in fds)


def streams(records: list[Record]) -> dict[tuple[str, str], list[Record]]:
    by_stream: dict[tuple[str, str], list[Record]] = {}
    for rec in records:
        by_stream.setdefault((rec.channel, rec.dir), []).append(rec)
    return by_stream


def chunked(records: list[Record], rng: random.Random) -> list[tuple[bytes, list[int]]]:
    """Cut a stream the way recvmsg may: anywhere, except that a message with fds is the last
    message starting in its chunk (Linux stops a read right after a segment with fds)."""
    stream = b"".join(r.wire for r in records)
    starts, pos = [], 0
    for r in records:
        starts.append(pos)
        pos += len(r.wire)
    cuts = {rng.randrange(1, len(stream)) for _ in range(len(records))}
    for i, r in enumerate(records):
        if r.nfds and i + 1 < len(records):
            cuts.add(starts[i + 1])
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(stream)), len(stream)]
    fd_at = {starts[i]: make_fds(r) for i, r in enumerate(records) if r.nfds}
    chunks = []
    for lo, hi in itertools.pairwise(bounds):
        fds = [fd for start, fl in fd_at.items() if lo <= start < hi for fd in fl]
        chunks.append((stream[lo:hi], fds))
    return chunks


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", capture_ids())
def test_framer_replays_capture_in_random_chunks(name: str, seed: int) -> None:
    rng = random.Random(seed)
    with no_fd_leak():
        for (_channel, direction), records in streams(load_records(name)).items():
            framer = Framer("frontend" if direction == "fe->be" else "backend")
            chunks = chunked(records, rng)
            got: list[Message] = []
            for data, fds in chunks:
                got += framer.feed(data, fds)
                assert all(fd_is_open(fd) for fd in fds)
            assert framer.buffered == 0 and framer.pending_fds == []
            assert [m.request.name for m in got] == [r.name for r in records]
            assert b"".join(build_message(m) for m in got) == b"".join(r.wire for r in records)
            sent = [fd for _data, fds in chunks for fd in fds]
            assert [fd for m in got for fd in m.fds] == sent
            for m, r in zip(got, records, strict=True):
                assert len(m.fds) == r.nfds
                close_all(m.fds)


def test_framer_takes_a_whole_capture_in_one_feed() -> None:
    records = [r for r in load_records(capture_ids()[0]) if r.dir == "fe->be" and not r.nfds]
    stream = b"".join(r.wire for r in records)
    msgs = Framer("frontend").feed(stream)
    assert [m.request.name for m in msgs] == [r.name for r in records]
