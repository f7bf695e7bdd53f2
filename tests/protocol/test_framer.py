"""Framer: partial headers/payloads, several messages per feed, fd attribution, error handling."""

from __future__ import annotations

import array
import os
import socket

import pytest

from protocol import Framer, FrontendRequest, ProtocolError, build_message, encode_request
from tests.protocol.captures import fd_is_open, load_records, make_fds, no_fd_leak

FR = FrontendRequest
NUM = encode_request(FR.SET_VRING_NUM, {"index": 0, "num": 128})
BASE = encode_request(FR.SET_VRING_BASE, {"index": 0, "num": 0})
KICK = encode_request(FR.SET_VRING_KICK, {"index": 0, "nofd": False}, fds_count=1)
CALL = encode_request(FR.SET_VRING_CALL, {"index": 0, "nofd": False}, fds_count=1)
GET = encode_request(FR.GET_FEATURES)
REGION = {"guest_phys_addr": 0, "memory_size": 1 << 20, "userspace_addr": 1 << 40, "mmap_offset": 0}
TABLE = encode_request(FR.SET_MEM_TABLE, {"regions": [REGION, REGION]}, fds_count=2)


def efd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def test_one_byte_at_a_time() -> None:
    framer = Framer()
    stream = NUM + GET + BASE
    got = []
    for i in range(len(stream)):
        got += framer.feed(stream[i : i + 1])
        consumed = sum(len(build_message(m)) for m in got)
        assert framer.buffered == i + 1 - consumed
    assert [m.request for m in got] == [FR.SET_VRING_NUM, FR.GET_FEATURES, FR.SET_VRING_BASE]
    assert framer.buffered == 0


def test_partial_header_then_rest() -> None:
    framer = Framer()
    assert framer.feed(NUM[:7]) == [] and framer.buffered == 7
    assert framer.feed(NUM[7:12]) == [] and framer.buffered == 12
    (msg,) = framer.feed(NUM[12:])
    assert msg.payload == {"index": 0, "num": 128} and framer.buffered == 0


def test_several_messages_and_a_tail_in_one_feed() -> None:
    framer = Framer()
    got = framer.feed(NUM + GET + BASE + NUM[:5])
    assert [m.request for m in got] == [FR.SET_VRING_NUM, FR.GET_FEATURES, FR.SET_VRING_BASE]
    assert framer.buffered == 5
    assert [m.request for m in framer.feed(NUM[5:])] == [FR.SET_VRING_NUM]


def test_fds_go_to_the_last_message_starting_in_the_chunk() -> None:
    """Linux hands fd-less data queued before an fd segment to the same recvmsg."""
    fd = efd()
    got = Framer().feed(NUM + BASE + KICK, [fd])
    assert [m.fds for m in got] == [[], [], [fd]]
    os.close(fd)


def test_fds_with_a_header_whose_payload_comes_later() -> None:
    """libvhost-user sends the header with the fds and writes the payload separately."""
    framer = Framer()
    fd = efd()
    assert [m.request for m in framer.feed(NUM + KICK[:12], [fd])] == [FR.SET_VRING_NUM]
    assert framer.pending_fds == [fd]
    (kick,) = framer.feed(KICK[12:])
    assert kick.fds == [fd] and framer.pending_fds == []
    os.close(fd)


def test_fds_of_a_message_split_mid_header() -> None:
    framer = Framer()
    fds = [efd(), efd()]
    got = framer.feed(GET + TABLE[:3], fds)
    assert [m.request for m in got] == [FR.GET_FEATURES] and got[0].fds == []
    assert framer.pending_fds == fds
    (table,) = framer.feed(TABLE[3:])
    assert table.fds == fds and table.payload.nregions == 2
    for fd in fds:
        os.close(fd)


def test_fds_without_a_message_start_are_an_error() -> None:
    with no_fd_leak():
        framer = Framer()
        framer.feed(TABLE[:20])
        fds = [efd(), efd()]
        with pytest.raises(ProtocolError, match="fds arrived with no message start"):
            framer.feed(TABLE[20:], fds)
        assert not any(fd_is_open(fd) for fd in fds)


def test_empty_chunk_with_fds_is_an_error() -> None:
    with no_fd_leak():
        fd = efd()
        with pytest.raises(ProtocolError, match="no message start"):
            Framer().feed(b"", [fd])
        assert not fd_is_open(fd)


def test_error_closes_every_fd_the_framer_holds() -> None:
    """Messages decoded earlier in the same feed are dropped with their fds; so is a partial."""
    with no_fd_leak():
        framer = Framer()
        call_fd = efd()
        (call,) = framer.feed(CALL, [call_fd])  # delivered: now the caller's
        partial_fd = efd()
        framer.feed(KICK[:12], [partial_fd])
        bad = bytearray(NUM)
        bad[4] = 0x2  # bad version
        bad_fd = efd()  # goes with the last message starting in the chunk: the bad one
        with pytest.raises(ProtocolError, match="SET_VRING_NUM: bad version 2"):
            framer.feed(KICK[12:] + GET + bytes(bad), [bad_fd])
        assert not fd_is_open(partial_fd)  # KICK was complete but is dropped with the feed
        assert not fd_is_open(bad_fd)
        assert fd_is_open(call.fds[0])
        os.close(call.fds[0])
        # the stream is no longer synchronised: everything after is refused, fds closed
        late = efd()
        with pytest.raises(ProtocolError, match="unsynchronised"):
            framer.feed(GET, [late])
        assert not fd_is_open(late)


def test_garbage_header_is_rejected_before_its_payload_arrives() -> None:
    with pytest.raises(ProtocolError, match="size 65536 > 4096"):
        Framer().feed(b"\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x01\x00")
    with pytest.raises(ProtocolError, match="unknown front-end request code 77"):
        Framer().feed(b"\x4d\x00\x00\x00\x01\x00\x00\x00\x00\x01\x00\x00" + bytes(10))


def test_close_releases_fds_of_a_partial_message() -> None:
    with no_fd_leak():
        framer = Framer()
        fds = [efd(), efd()]
        framer.feed(TABLE[:30], fds)
        framer.close()
        assert not any(fd_is_open(fd) for fd in fds)
        with pytest.raises(ProtocolError):
            framer.feed(GET)


def test_backend_framer_reads_replies_and_backend_requests() -> None:
    framer = Framer("backend")
    reply = b"\x01\x00\x00\x00\x05\x00\x00\x00\x08\x00\x00\x00" + (1 << 32).to_bytes(8, "little")
    call = b"\x04\x00\x00\x00\x01\x00\x00\x00\x08\x00\x00\x00" + bytes(8)
    first, second = framer.feed(reply + call)
    assert first.request is FR.GET_FEATURES and first.is_reply and first.payload == 1 << 32
    assert second.request.name == "BACKEND_VRING_CALL" and not second.is_reply
    with pytest.raises(ValueError, match="sender"):
        Framer("qemu")


def test_large_stream_in_odd_chunks_loses_no_message() -> None:
    framer = Framer()
    stream = (NUM + BASE + GET) * 5000
    got = []
    step = 7001  # never on a message boundary for long
    for i in range(0, len(stream), step):
        got += framer.feed(stream[i : i + step])
    assert len(got) == 15000 and framer.buffered == 0
    assert b"".join(build_message(m) for m in got[:3]) == NUM + BASE + GET


def send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    assert sock.sendmsg([data], anc) == len(data)


def recv_all(sock: socket.socket, bufsize: int, framer: Framer) -> list:
    got = []
    while True:
        data, fds = b"", array.array("i")
        try:
            data, anc, flags, _ = sock.recvmsg(bufsize, socket.CMSG_SPACE(16 * fds.itemsize))
        except BlockingIOError:
            return got
        assert not flags & socket.MSG_CTRUNC
        for level, kind, raw in anc:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
        got += framer.feed(data, list(fds))


@pytest.mark.parametrize("bufsize", [5, 12, 40, 4108, 65536])
def test_real_unix_socket_with_capture_traffic(bufsize: int) -> None:
    """QEMU's side of a capture sent message by message with real fds over a socketpair."""
    records = [r for r in load_records("capture-qemu72-blk.jsonl") if r.dir == "fe->be"]
    with no_fd_leak():
        a, b = socket.socketpair()
        b.setblocking(False)
        framer = Framer("frontend")
        inodes = []
        for rec in records:
            fds = make_fds(rec)
            inodes.append([os.fstat(fd).st_ino for fd in fds])
            send(a, rec.wire, fds)
            for fd in fds:
                os.close(fd)  # the copies in flight keep the files alive
        got = recv_all(b, bufsize, framer)
        assert [m.request.name for m in got] == [r.name for r in records]
        assert [[os.fstat(fd).st_ino for fd in m.fds] for m in got] == inodes
        for m in got:
            for fd in m.fds:
                os.close(fd)
        a.close()
        b.close()


def test_wrong_argument_types_close_the_fds() -> None:
    with no_fd_leak():
        framer = Framer()
        fd = efd()
        with pytest.raises(TypeError):
            framer.feed("not bytes", [fd])  # type: ignore[arg-type]
        assert not fd_is_open(fd)
        fd = efd()
        with pytest.raises(TypeError, match="fds must be ints"):
            framer.feed(KICK, [fd, "3"])  # type: ignore[list-item]
        assert not fd_is_open(fd)
        # nothing was consumed: the stream is still in step
        assert [m.request for m in framer.feed(GET)] == [FR.GET_FEATURES]


def test_an_unexpected_error_while_decoding_is_a_protocol_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import protocol.framing

    real = protocol.framing.decode_known

    def decode_known(request: object, *args: object) -> object:
        if request == FR.SET_VRING_NUM:
            raise KeyError("a bug")
        return real(request, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(protocol.framing, "decode_known", decode_known)
    with no_fd_leak():
        framer = Framer()
        partial = efd()
        framer.feed(KICK[:12], [partial])
        fd = efd()
        with pytest.raises(ProtocolError, match="KeyError") as info:
            framer.feed(KICK[12:] + GET + NUM + KICK, [fd])
        assert isinstance(info.value.__cause__, KeyError)
        assert not fd_is_open(partial) and not fd_is_open(fd)
        with pytest.raises(ProtocolError, match="unsynchronised"):
            framer.feed(GET)


def test_memoryviews_of_other_formats_are_read_as_bytes() -> None:
    stream = (NUM + BASE) * 3  # 6 messages of 20 bytes: a whole number of u32s
    framer = Framer()
    got = framer.feed(memoryview(stream[:96]).cast("I"))
    got += framer.feed(memoryview(stream[96:]).cast("I"))
    assert [m.request for m in got] == [FR.SET_VRING_NUM, FR.SET_VRING_BASE] * 3


def test_only_the_incomplete_message_is_kept() -> None:
    """Each payload byte is copied at most once: the buffer holds the partial message only,
    never bytes already decoded (nothing to compact)."""
    framer = Framer()
    stream = (NUM + BASE + GET) * 3000
    step = 1001
    for i in range(0, len(stream), step):
        framer.feed(stream[i : i + step])
        assert len(framer._buf) == framer.buffered < 40
