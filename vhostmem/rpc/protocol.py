"""JSON-RPC 2.0, one JSON object per line, sans-IO: bytes in, requests out; results and errors
in, bytes out. No sockets, no event loop (the server in ``server.py`` moves the bytes).

A line is one request (a JSON object). Batches (JSON arrays) are not supported and answered
with an invalid-request error. Requests without an ``id`` are notifications: they run and get
no reply, unless they could not even be parsed (then the reply has ``id`` null, as the
specification says).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# JSON-RPC 2.0 error codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Application errors (outside the range the specification reserves).
DEVICE_BUSY = 1
NO_SUCH_DEVICE = 2
DEVICE_EXISTS = 3
OPERATION_FAILED = 4
TOO_MANY_CLIENTS = 5

# Longest request line accepted (without its newline); a longer one is an error and the
# connection is closed: its end cannot be found without buffering it.
MAX_LINE_BYTES = 1 << 20

_NO_ID = object()


class RpcError(Exception):
    """An error reply: ``code`` and a message naming what was wrong."""

    def __init__(self, code: int, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id  # the request's id, when it could be read


class LineTooLong(RpcError):
    def __init__(self, length: int, limit: int = MAX_LINE_BYTES) -> None:
        super().__init__(INVALID_REQUEST,
                         f"request line longer than {limit} bytes ({length} bytes "
                         "without a newline); closing the connection")


class LineBuffer:
    """Splits a byte stream into lines; never holds more than ``max_line`` bytes of a line."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line = max_line
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Complete lines in ``data`` (without their newline, ``\\r\\n`` too); raises
        :class:`LineTooLong` once a line is longer than the limit."""
        lines: list[bytes] = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            piece = data[start:end]
            if len(self._partial) + len(piece) > self.max_line:
                raise LineTooLong(len(self._partial) + len(piece), self.max_line)
            line = bytes(self._partial + piece) if self._partial else piece
            self._partial.clear()
            lines.append(line.removesuffix(b"\r"))
            start = end + 1
        rest = len(data) - start
        if len(self._partial) + rest > self.max_line:
            raise LineTooLong(len(self._partial) + rest, self.max_line)
        self._partial += data[start:]
        return lines

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held."""
        return len(self._partial)


@dataclass
class Request:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    id: Any = None
    notification: bool = False


def parse_request(line: bytes) -> Request:
    """One line -> a :class:`Request`; raises :class:`RpcError` (carrying the id when one could
    be read, in ``request_id``) for anything that is not a valid JSON-RPC 2.0 request."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _error(PARSE_ERROR, f"not valid JSON: {exc}", None) from None
    except RecursionError:  # json nests by recursion: '[' * 200000 fits in one line
        raise _error(PARSE_ERROR, "not valid JSON: nested too deeply", None) from None
    if isinstance(obj, list):
        raise _error(INVALID_REQUEST, "batch requests (JSON arrays) are not supported: send "
                     "one request object per line", None)
    if not isinstance(obj, dict):
        raise _error(INVALID_REQUEST, f"a request must be a JSON object, not "
                     f"{type(obj).__name__}", None)
    req_id = obj.get("id", _NO_ID)
    if req_id is not _NO_ID and req_id is not None and (
            isinstance(req_id, bool) or not isinstance(req_id, int | str)):
        raise _error(INVALID_REQUEST, "id must be a string, an integer or null", None)
    reply_id = None if req_id is _NO_ID else req_id
    if obj.get("jsonrpc") != "2.0":
        raise _error(INVALID_REQUEST, 'jsonrpc must be "2.0"', reply_id)
    method = obj.get("method")
    if not isinstance(method, str):
        raise _error(INVALID_REQUEST, "method must be a string", reply_id)
    unknown = sorted(set(obj) - {"jsonrpc", "method", "params", "id"})
    if unknown:
        raise _error(INVALID_REQUEST, f"unknown member {unknown[0]!r} in the request", reply_id)
    params = obj.get("params", {})
    if not isinstance(params, dict):
        raise _error(INVALID_PARAMS, "params must be an object (parameters by name)", reply_id)
    return Request(method, params, reply_id, notification=req_id is _NO_ID)


def _error(code: int, message: str, req_id: Any) -> RpcError:
    return RpcError(code, message, req_id)


def encode_result(req_id: Any, result: Any) -> bytes:
    return _line({"jsonrpc": "2.0", "id": req_id, "result": result})


def encode_error(req_id: Any, code: int, message: str) -> bytes:
    return _line({"jsonrpc": "2.0", "id": req_id, "error": {"code": code, "message": message}})


def encode_request(method: str, params: dict[str, Any] | None, req_id: Any) -> bytes:
    obj: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": req_id}
    if params:
        obj["params"] = params
    return _line(obj)


def _line(obj: dict[str, Any]) -> bytes:
    # ensure_ascii: a reply is plain ASCII whatever a device name or path holds.
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
