"""The sans-IO NBD wire format against handwritten bytes and bytes captured from real servers
(qemu-nbd 7.2 serving a qcow2 image, nbdkit 1.32 with the memory plugin)."""

from __future__ import annotations

import struct

import pytest

from nbd import (
    REQUEST_SIZE,
    ClientHandshake,
    NbdOptionError,
    NbdProtocolError,
    Request,
    Transmission,
)
from nbd.constants import (
    IHAVEOPT,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_OPT_GO,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
)
from nbd.transmission import encode_request

# qemu-nbd -f qcow2 -x disk (1 MiB image): greeting, STRUCTURED_REPLY ack, GO's
# NBD_INFO_BLOCK_SIZE (1, 4096, 32 MiB) and NBD_INFO_EXPORT, then ACK.
QEMU_NBD_HANDSHAKE = bytes.fromhex(
    "4e42444d4147494349484156454f505400030003e889045565a90000000800000001000000000003e8890455"
    "65a900000007000000030000000e00030000000100001000020000000003e889045565a90000000700000003"
    "0000000c000000000000001000000ced0003e889045565a9000000070000000100000000")
# What this client sent to it: client flags, STRUCTURED_REPLY, then GO for "disk".
QEMU_NBD_CLIENT = [bytes.fromhex("0000000349484156454f50540000000800000000"),
                   bytes.fromhex("49484156454f5054000000070000000c000000046469736b00010003")]
# nbdkit -e mem memory 1M: no NBD_INFO_BLOCK_SIZE.
NBDKIT_HANDSHAKE = bytes.fromhex(
    "4e42444d4147494349484156454f505400030003e889045565a90000000800000001000000000003e8890455"
    "65a900000007000000030000000c000000000000001000000ded0003e889045565a9000000070000000100000000")
# qemu-nbd's replies to READ 16 bytes at 4088 (cookie 1; 0xab up to 4096, zeroes after) and
# READ 4096 at 65536 (cookie 2, unallocated in the qcow2: one OFFSET_HOLE chunk).
QEMU_NBD_READ_DATA = bytes.fromhex(
    "668e33ef000100010000000000000001000000180000000000000ff8abababababababab0000000000000000")
QEMU_NBD_READ_HOLE = bytes.fromhex(
    "668e33ef0001000200000000000000020000000c000000000001000000001000")


def run_handshake(server: bytes, export: str) -> tuple[ClientHandshake, list[bytes]]:
    hs = ClientHandshake(export)
    sent = []
    for i in range(len(server)):  # byte by byte: every split point works
        hs.receive(server[i : i + 1])
        out = hs.data_to_send()
        if out:
            sent.append(out)
    return hs, sent


def test_handshake_with_captured_qemu_nbd() -> None:
    hs, sent = run_handshake(QEMU_NBD_HANDSHAKE, "disk")
    assert sent == QEMU_NBD_CLIENT
    assert hs.done and hs.export is not None
    info = hs.export
    assert (info.size, info.structured) == (1 << 20, True)
    assert (info.min_block, info.preferred_block, info.max_payload) == (1, 4096, 32 << 20)
    assert info.has(NBD_FLAG_SEND_FLUSH) and info.has(NBD_FLAG_SEND_FUA)
    assert not info.has(NBD_FLAG_READ_ONLY)


def test_handshake_with_captured_nbdkit_defaults_block_sizes() -> None:
    hs, _ = run_handshake(NBDKIT_HANDSHAKE, "mem")
    assert hs.export is not None and hs.export.preferred_block == 4096
    assert hs.export.min_block == 1


def greeting(flags: int = 3) -> bytes:
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)


def opt_reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPT_REPLY_MAGIC, option, rtype, len(data)) + data


def info_export(size: int = 1 << 20, flags: int = 1) -> bytes:
    return opt_reply(NBD_OPT_GO, NBD_REP_INFO, struct.pack(">HQH", 0, size, flags))


def test_structured_reply_refused_falls_back_to_simple() -> None:
    hs = ClientHandshake("x")
    hs.receive(greeting())
    hs.data_to_send()
    hs.receive(opt_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_UNSUP))
    assert hs.data_to_send()[:16] == struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, 9)
    hs.receive(info_export() + opt_reply(NBD_OPT_GO, NBD_REP_ACK))
    assert hs.export is not None and not hs.export.structured


def test_go_error_names_the_error_and_message() -> None:
    hs = ClientHandshake("nope", structured=False)
    hs.receive(greeting())
    with pytest.raises(NbdOptionError, match=r"NBD_OPT_GO: NBD_REP_ERR_UNKNOWN .*no such"):
        hs.receive(opt_reply(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, b"no such export"))


@pytest.mark.parametrize(("server", "match"), [
    (struct.pack(">QQH", 0x1122, IHAVEOPT, 3), "not NBDMAGIC"),
    (struct.pack(">QQ", NBDMAGIC, 0x00420281861253) + b"\0\0", "oldstyle"),
    (greeting(0), "FIXED_NEWSTYLE"),
    (greeting() + struct.pack(">QIII", 0x1234, NBD_OPT_GO, NBD_REP_ACK, 0), "magic"),
    (greeting() + opt_reply(NBD_OPT_GO, NBD_REP_ACK), "without NBD_INFO_EXPORT"),
    (greeting() + opt_reply(NBD_OPT_GO, NBD_REP_INFO, b"\0\0\1"), "NBD_INFO_EXPORT of 3"),
    (greeting() + opt_reply(NBD_OPT_GO, NBD_REP_INFO, struct.pack(">HIII", 3, 3, 4096, 8192)),
     "minimum block size 3"),
    (greeting() + opt_reply(NBD_OPT_GO, NBD_REP_INFO, struct.pack(">HIII", 3, 512, 4096, 1000)),
     "maximum block size 1000"),
    (greeting() + opt_reply(NBD_OPT_GO, NBD_REP_INFO, struct.pack(">HQH", 0, 1, 0)),
     "HAS_FLAGS"),
    (greeting() + struct.pack(">QIII", OPT_REPLY_MAGIC, NBD_OPT_GO, NBD_REP_INFO, 1 << 30),
     "too long"),
    (greeting() + opt_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK), "while NBD_OPT_GO"),
])
def test_bad_handshakes_are_named(server: bytes, match: str) -> None:
    hs = ClientHandshake("x", structured=False)
    with pytest.raises(NbdProtocolError, match=match):
        hs.receive(server)


def test_request_headers() -> None:
    assert encode_request(NBD_CMD_WRITE, 7, 4096, 512, NBD_CMD_FLAG_FUA) == bytes.fromhex(
        "25609513" "0001" "0001" "0000000000000007" "0000000000001000" "00000200")
    t = Transmission(structured=True)
    buf = bytearray(8)
    cookie, header = t.request(NBD_CMD_READ, 0, 8, into=[memoryview(buf)])
    assert header == bytes.fromhex("25609513000000000000000000000001" "0000000000000000"
                                   "00000008")
    assert cookie == 1 and t.in_flight == 1


def test_captured_qemu_nbd_data_and_hole_replies() -> None:
    t = Transmission(structured=True)
    data = bytearray(b"\xee" * 16)
    hole = bytearray(b"\xee" * 4096)
    # The data lands in two views: split where the guest's buffers would be.
    c1, _ = t.request(NBD_CMD_READ, 4088, 16, into=[memoryview(data)[:5], memoryview(data)[5:]])
    c2, _ = t.request(NBD_CMD_READ, 65536, 4096, into=[memoryview(hole)])
    done = t.feed(QEMU_NBD_READ_DATA + QEMU_NBD_READ_HOLE)
    assert [(d.cookie, d.error) for d in done] == [(c1, 0), (c2, 0)]
    assert data == b"\xab" * 8 + b"\0" * 8
    assert hole == bytes(4096)
    assert t.in_flight == 0


def simple(cookie: int, error: int = 0) -> bytes:
    return struct.pack(">IIQ", NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, ctype: int, payload: bytes, flags: int = NBD_REPLY_FLAG_DONE) -> bytes:
    return struct.pack(">IHHQI", NBD_STRUCTURED_REPLY_MAGIC, flags, ctype, cookie,
                       len(payload)) + payload


def test_simple_replies_out_of_order_into_the_right_buffers() -> None:
    t = Transmission(structured=False)
    a, b = bytearray(4), bytearray(4)
    ca, _ = t.request(NBD_CMD_READ, 0, 4, into=[memoryview(a)])
    cb, _ = t.request(NBD_CMD_READ, 4, 4, into=[memoryview(b)])
    cf, _ = t.request(NBD_CMD_FLUSH, 0, 0)
    done = t.feed(simple(cf) + simple(cb) + b"BBBB" + simple(ca, error=5))
    assert [(d.cookie, d.error) for d in done] == [(cf, 0), (cb, 0), (ca, 5)]
    assert b == b"BBBB" and a == bytes(4)  # an error reply carries no data


def test_structured_chunks_in_any_order_with_an_error_chunk() -> None:
    t = Transmission(structured=True)
    buf = bytearray(b"\xee" * 12)
    c, _ = t.request(NBD_CMD_READ, 100, 12, into=[memoryview(buf)])
    off = struct.pack(">Q", 108)
    assert t.feed(chunk(c, NBD_REPLY_TYPE_OFFSET_DATA, off + b"TAIL", flags=0)) == []
    assert t.feed(chunk(c, NBD_REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", 100, 8), flags=0)) == []
    done = t.feed(chunk(c, NBD_REPLY_TYPE_NONE, b""))
    assert done[0].error == 0 and buf == bytes(8) + b"TAIL"
    w, _ = t.request(NBD_CMD_WRITE, 0, 512)
    done = t.feed(chunk(w, NBD_REPLY_TYPE_ERROR, struct.pack(">IH", 28, 4) + b"full"))
    assert (done[0].error, done[0].message) == (28, "full")


def broken_reply(kind: str) -> tuple[Transmission, bytearray, bytes]:
    t = Transmission(structured=True)
    buf = bytearray(b"\xee" * 16)
    c, _ = t.request(NBD_CMD_READ, 4096, 8, into=[memoryview(buf)[4:12]])
    off = struct.pack(">Q", 4096)
    replies = {
        "magic": struct.pack(">IIQ", 0xDEADBEEF, 0, c),
        "cookie": chunk(c + 99, NBD_REPLY_TYPE_OFFSET_DATA, off + b"x" * 8),
        "too long": chunk(c, NBD_REPLY_TYPE_OFFSET_DATA, off + b"x" * 9),
        "before": chunk(c, NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 4092) + b"x" * 8),
        "after": chunk(c, NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 4100) + b"x" * 8),
        "hole outside": chunk(c, NBD_REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", 4096, 9)),
        "overlap": chunk(c, NBD_REPLY_TYPE_OFFSET_DATA, off + b"x" * 4, flags=0)
        + chunk(c, NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 4098) + b"y" * 2),
        "short": chunk(c, NBD_REPLY_TYPE_OFFSET_DATA, off + b"x" * 4),
        "simple data": simple(c) + b"x" * 8,
        "none without done": chunk(c, NBD_REPLY_TYPE_NONE, b"", flags=0),
        "huge error": struct.pack(">IHHQI", NBD_STRUCTURED_REPLY_MAGIC, 1,
                                  NBD_REPLY_TYPE_ERROR, c, 1 << 31),
        "unasked type": chunk(c, 5, b"\0" * 8),
    }
    return t, buf, replies[kind]


@pytest.mark.parametrize(("kind", "match"), [
    ("magic", "reply magic 0xdeadbeef"), ("cookie", "unknown cookie"),
    ("too long", "OFFSET_DATA length 17"), ("before", r"outside READ cookie 1's range"),
    ("after", "outside READ"), ("hole outside", "outside READ"), ("overlap", "overlaps"),
    ("short", "ended with 4 of its 8 bytes"), ("simple data", "simple reply with data"),
    ("none without done", "NONE must be empty"), ("huge error", "error chunk length"),
    ("unasked type", "did not ask for"),
])
def test_bad_replies_are_named_and_never_write_outside(kind: str, match: str) -> None:
    t, buf, reply = broken_reply(kind)
    with pytest.raises(NbdProtocolError, match=match):
        t.feed(reply)
    assert buf[:4] == b"\xee" * 4 and buf[12:] == b"\xee" * 4  # around the request's buffer
    if kind in ("magic", "cookie", "too long", "before", "after", "hole outside", "huge error"):
        assert buf[4:12] == b"\xee" * 8  # refused before any data was taken
    with pytest.raises(NbdProtocolError):
        t.advance(0)  # the connection stays broken
    assert [r.cookie for r in t.forget_all()] == [1]


def test_read_needs_buffers_of_its_length() -> None:
    t = Transmission(structured=True)
    with pytest.raises(ValueError, match="exactly its length"):
        t.request(NBD_CMD_READ, 0, 8, into=[memoryview(bytearray(4))])


def test_read_ahead_takes_the_next_header_with_the_data_and_never_more() -> None:
    """While a READ may still be answered, buffers() ends where data could begin; the bytes
    read ahead are parsed as the next reply."""
    t = Transmission(structured=True)
    a, b = bytearray(8), bytearray(8)
    ca, _ = t.request(NBD_CMD_READ, 0, 8, into=[memoryview(a)])
    cb, _ = t.request(NBD_CMD_READ, 8, 8, into=[memoryview(b)])
    assert [len(v) for v in t.buffers()] == [28]  # header + offset, not a data byte
    stream = (chunk(ca, NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + b"AAAAAAAA")
              + chunk(cb, NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 8) + b"BBBBBBBB"))
    assert t.feed(stream[:28]) == []
    bufs = t.buffers()
    assert [len(v) for v in bufs] == [8, 28]  # a's data, then b's header and offset
    assert [c.cookie for c in t.feed(stream[28:64])] == [ca]
    assert [len(v) for v in t.buffers()] == [8, 4130]  # b is the last READ: read all
    assert [c.cookie for c in t.feed(stream[64:])] == [cb]
    assert (a, b) == (b"A" * 8, b"B" * 8)


def test_replies_without_reads_are_read_in_one_go() -> None:
    t = Transmission(structured=True)
    cookies = [t.request(NBD_CMD_WRITE, i * 512, 512)[0] for i in range(20)]
    assert len(t.buffers()[0]) > 20 * 16
    done = t.feed(b"".join(simple(c) for c in reversed(cookies)))
    assert [d.cookie for d in done] == cookies[::-1]


def test_zero_length_read_completes() -> None:
    t = Transmission(structured=False)
    c, _ = t.request(NBD_CMD_READ, 0, 0, into=[])
    assert [d.cookie for d in t.feed(simple(c))] == [c]


def test_many_tiny_chunks_in_reverse_order_merge_into_one_range() -> None:
    """20000 one-byte chunks (data and holes alternating), last byte first: each is checked
    against its neighbours only, adjacent ranges merge (the old check compared every chunk
    with all earlier ones: 20000 chunks took seconds), and the READ completes whole."""
    n, base = 20000, 1 << 20
    t = Transmission(structured=True)
    buf = bytearray(b"\xee" * n)
    c, _ = t.request(NBD_CMD_READ, base, n, into=[memoryview(buf)])
    stream = []
    for i in reversed(range(n)):
        if i % 2:
            stream.append(chunk(c, NBD_REPLY_TYPE_OFFSET_DATA,
                                struct.pack(">Q", base + i) + b"d", flags=0))
        else:
            stream.append(chunk(c, NBD_REPLY_TYPE_OFFSET_HOLE,
                                struct.pack(">QI", base + i, 1), flags=0))
    assert t.feed(b"".join(stream)) == []
    assert t._pending[c].received == [(base, base + n)]
    done = t.feed(chunk(c, NBD_REPLY_TYPE_NONE, b""))
    assert [(d.cookie, d.error) for d in done] == [(c, 0)]
    assert buf == b"\0d" * (n // 2)


def received_after(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The request's received ranges after OFFSET_DATA chunks for ``ranges`` (no DONE)."""
    t = Transmission(structured=True)
    c, _ = t.request(NBD_CMD_READ, 0, 64, into=[memoryview(bytearray(64))])
    t.feed(b"".join(chunk(c, NBD_REPLY_TYPE_OFFSET_DATA,
                          struct.pack(">Q", start) + b"x" * (stop - start), flags=0)
                    for start, stop in ranges))
    return t._pending[c].received


def test_received_ranges_stay_sorted_disjoint_and_merged() -> None:
    assert received_after([(8, 12), (0, 4)]) == [(0, 4), (8, 12)]
    assert received_after([(8, 12), (0, 4), (4, 8)]) == [(0, 12)]  # fills the gap: one range
    assert received_after([(0, 4), (4, 8)]) == [(0, 8)]
    assert received_after([(4, 8), (0, 4)]) == [(0, 8)]
    assert received_after([(20, 30), (0, 4), (40, 41), (10, 12)]) == [
        (0, 4), (10, 12), (20, 30), (40, 41)]


@pytest.mark.parametrize("ranges", [
    [(0, 4), (3, 9)],  # overlaps the range before
    [(8, 12), (6, 9)],  # overlaps the range after
    [(0, 4), (8, 12), (3, 9)],  # both neighbours
    [(0, 4), (8, 12), (4, 9)],  # touches one, overlaps the other
    [(0, 12), (4, 8)],  # inside one
    [(4, 8), (0, 12)],  # covers one
    [(0, 4), (4, 8), (2, 3)],  # inside merged ranges
    [(10, 11), (20, 21), (30, 31), (10, 11)],  # the same again, among others
])
def test_overlapping_chunks_are_still_refused(ranges: list[tuple[int, int]]) -> None:
    with pytest.raises(NbdProtocolError, match="overlaps"):
        received_after(ranges)


def steady_state() -> tuple[Transmission, bytearray, bytearray, int]:
    """READs a, b and a third in flight, a's header and offset received: buffers() is a's
    data and 28 bytes read ahead (the next reply's header and offset), as at depth."""
    t = Transmission(structured=True)
    a, b = bytearray(8), bytearray(b"\xee" * 16)
    ca, _ = t.request(NBD_CMD_READ, 0, 8, into=[memoryview(a)])
    cb, _ = t.request(NBD_CMD_READ, 4096, 8, into=[memoryview(b)[4:12]])
    t.request(NBD_CMD_READ, 1 << 20, 8, into=[memoryview(bytearray(8))])  # keeps read-ahead
    first = chunk(ca, NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + b"A" * 8)
    t.feed(first[:28])
    assert [len(v) for v in t.buffers()] == [8, 28]
    return t, a, b, cb


@pytest.mark.parametrize(("flags", "ctype", "cookie", "offset", "length", "match"), [
    (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 99, 4096, 16, "unknown cookie"),
    (0x8000, NBD_REPLY_TYPE_OFFSET_DATA, None, 4096, 16, "unknown flags"),
    (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, None, 4096, 17, "length 17"),
    (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, None, 4096, 8, "length 8 outside"),
    (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, None, 4092, 16, "outside READ"),
    (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, None, 4097, 16, "outside READ"),
])
def test_a_bad_data_chunk_read_ahead_at_depth_is_named_before_any_data(
        flags: int, ctype: int, cookie: int | None, offset: int, length: int,
        match: str) -> None:
    """The read-ahead reply (header and offset in one receive, parsed in one step) gets the
    same checks as one read in pieces: named, and nothing written into b or around it."""
    t, a, b, cb = steady_state()
    bad = struct.pack(">IHHQIQ", NBD_STRUCTURED_REPLY_MAGIC, flags, ctype,
                      cb if cookie is None else cookie, length, offset)
    bufs = t.buffers()
    bufs[0][:] = b"A" * 8
    bufs[1][:] = bad
    with pytest.raises(NbdProtocolError, match=match):
        t.advance(36)
    assert a == b"A" * 8 and b == b"\xee" * 16


def test_a_data_chunk_read_ahead_for_a_write_is_refused() -> None:
    t = Transmission(structured=True)
    c, _ = t.request(NBD_CMD_READ, 0, 8, into=[memoryview(bytearray(8))])
    w, _ = t.request(NBD_CMD_WRITE, 0, 8)
    with pytest.raises(NbdProtocolError, match="OFFSET_DATA to a request other than READ"):
        t.feed(chunk(w, NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + b"x" * 8))
    assert [r.cookie for r in t.forget_all()] == [c, w]


def test_reads_at_depth_complete_through_the_read_ahead() -> None:
    """32 READs answered back to back, each header and offset read ahead with the previous
    data (one receive per reply): every buffer gets its data, in any order."""
    t = Transmission(structured=True)
    bufs = [bytearray(512) for _ in range(32)]
    cookies = [t.request(NBD_CMD_READ, i * 512, 512, into=[memoryview(buf)])[0]
               for i, buf in enumerate(bufs)]
    order = list(reversed(range(32)))
    stream = b"".join(chunk(cookies[i], NBD_REPLY_TYPE_OFFSET_DATA,
                            struct.pack(">Q", i * 512) + bytes([i]) * 512) for i in order)
    done = t.feed(stream)
    assert [d.cookie for d in done] == [cookies[i] for i in order]
    assert all(buf == bytes([i]) * 512 for i, buf in enumerate(bufs))
    assert t.in_flight == 0


def test_submit_packs_headers_side_by_side_and_completes_the_same_object() -> None:
    """A batch's headers go into the caller's one buffer; the reply reader hands back the
    request objects submitted, their error set, not records of its own."""
    t = Transmission(structured=True)
    bufs = [bytearray(4) for _ in range(3)]
    reqs = [Request(NBD_CMD_READ, 4 * i, 4, 0, [memoryview(b)]) for i, b in enumerate(bufs)]
    reqs.append(Request(NBD_CMD_WRITE, 64, 512, NBD_CMD_FLAG_FUA))
    headers = bytearray(b"\xff" * (REQUEST_SIZE * len(reqs) + 1))
    cookies = [t.submit(r, headers, i * REQUEST_SIZE) for i, r in enumerate(reqs)]
    assert headers == b"".join(encode_request(r.command, c, r.offset, r.length, r.flags)
                               for r, c in zip(reqs, cookies, strict=True)) + b"\xff"
    assert [r.cookie for r in reqs] == cookies
    stream = b"".join(chunk(c, NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 4 * i) + b"abcd")
                      for i, c in enumerate(cookies[:3]))
    done = t.feed(stream + simple(cookies[3], error=28))
    assert [d is r for d, r in zip(done, reqs, strict=True)] == [True] * 4
    assert [r.error for r in reqs] == [0, 0, 0, 28] and bufs == [bytearray(b"abcd")] * 3


def test_a_request_submitted_again_starts_afresh() -> None:
    """After a lost connection the same request goes to a new transmission: the range and
    error its earlier replies brought are forgotten (else its data would overlap them)."""
    buf = bytearray(8)
    req = Request(NBD_CMD_READ, 0, 8, 0, [memoryview(buf)])
    old = Transmission(structured=True)
    c = old.submit(req, bytearray(REQUEST_SIZE))
    old.feed(chunk(c, NBD_REPLY_TYPE_ERROR, struct.pack(">IH", 5, 0), flags=0))
    old.feed(chunk(c, NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + b"x" * 8, flags=0))
    assert (req.error, req.received) == (5, [(0, 8)])
    assert old.forget_all() == [req]
    new = Transmission(structured=True)
    c = new.submit(req, bytearray(REQUEST_SIZE))
    done = new.feed(chunk(c, NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + b"y" * 8))
    assert done == [req] and req.error == 0 and buf == b"y" * 8
