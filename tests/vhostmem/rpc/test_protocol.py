"""The sans-IO line and JSON-RPC framing."""

from __future__ import annotations

import json

import pytest

from vhostmem.rpc.protocol import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    LineBuffer,
    LineTooLong,
    RpcError,
    encode_error,
    encode_result,
    parse_request,
)


def test_lines_split_across_chunks_and_crlf() -> None:
    buf = LineBuffer()
    assert buf.feed(b'{"a"') == []
    assert buf.feed(b':1}\r\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert buf.pending == 4
    assert buf.feed(b":3}\n") == [b'{"c":3}']


def test_a_line_over_the_limit_is_refused_before_it_is_buffered() -> None:
    buf = LineBuffer(max_line=10)
    assert buf.feed(b"0123456789\n") == [b"0123456789"]
    buf.feed(b"01234")
    with pytest.raises(LineTooLong, match="longer than 10 bytes"):
        buf.feed(b"567890")
    with pytest.raises(LineTooLong):
        LineBuffer(max_line=10).feed(b"x" * 11 + b"\n")


@pytest.mark.parametrize(
    ("line", "code", "message", "request_id"),
    [
        (b"{", PARSE_ERROR, "not valid JSON", None),
        (b"\xc3\x28", PARSE_ERROR, "not valid JSON", None),
        (b"[1]", INVALID_REQUEST, "batch", None),
        (b"[" * 200000, PARSE_ERROR, "nested too deeply", None),
        (b'{"a":' * 100000, PARSE_ERROR, "nested too deeply", None),
        (b"true", INVALID_REQUEST, "not bool", None),
        (b'{"jsonrpc":"2.0","method":"m","id":true}', INVALID_REQUEST, "id must be", None),
        (b'{"jsonrpc":"2.0","method":"m","id":1.5}', INVALID_REQUEST, "id must be", None),
        (b'{"jsonrpc":"1.0","method":"m","id":7}', INVALID_REQUEST, "jsonrpc", 7),
        (b'{"jsonrpc":"2.0","id":"x"}', INVALID_REQUEST, "method", "x"),
        (b'{"jsonrpc":"2.0","method":"m","id":3,"extra":1}', INVALID_REQUEST, "'extra'", 3),
        (b'{"jsonrpc":"2.0","method":"m","params":"p","id":3}', INVALID_PARAMS, "object", 3),
    ],
)
def test_bad_requests(line: bytes, code: int, message: str, request_id: object) -> None:
    with pytest.raises(RpcError) as exc:
        parse_request(line)
    assert exc.value.code == code
    assert message in exc.value.message
    assert exc.value.request_id == request_id


def test_requests_and_replies() -> None:
    req = parse_request(b'{"jsonrpc":"2.0","method":"device_list","id":"a"}')
    assert (req.method, req.params, req.id, req.notification) == ("device_list", {}, "a", False)
    note = parse_request(b'{"jsonrpc":"2.0","method":"version"}')
    assert note.notification and note.id is None
    assert json.loads(encode_result(1, [1])) == {"jsonrpc": "2.0", "id": 1, "result": [1]}
    reply = encode_error(None, -32700, "bad \u00e9")
    assert reply.endswith(b"\n") and reply.isascii() and reply.count(b"\n") == 1
