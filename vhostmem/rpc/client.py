"""``vhostmem rpc [--socket PATH] METHOD [KEY=VALUE ...]``: one request, the result printed as
JSON; exit 1 with the error's message on a JSON-RPC error or when the socket cannot be used."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

from vhostmem.rpc.protocol import MAX_LINE_BYTES, encode_request

DEFAULT_RPC_SOCKET = "vhostmem-rpc.sock"
TIMEOUT_SECONDS = 60.0  # device_del hard waits for the requests in flight


class RpcCallError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def add_parser(sub: Any) -> None:
    rpc = sub.add_parser(
        "rpc",
        help="call a method on a running vhostmem's management socket",
        description=(
            "Send one JSON-RPC request to `vhostmem serve --rpc-socket PATH` and print the "
            "result. Values are parsed as JSON when they parse (2, true, null, \"text\"), "
            "else taken as strings: vhostmem rpc device_add socket=/run/b.sock ram=64M"
        ),
    )
    rpc.add_argument("--socket", default=DEFAULT_RPC_SOCKET,
                     help=f"the management socket (default ./{DEFAULT_RPC_SOCKET})")
    rpc.add_argument("--timeout", type=float, default=TIMEOUT_SECONDS,
                     help="seconds to wait for the reply")
    rpc.add_argument("method", help="device_add, device_del, device_list, device_stats, "
                     "log_set_level, version")
    rpc.add_argument("params", nargs="*", metavar="KEY=VALUE")


def parse_params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(text)
        except ValueError:
            params[key] = text
    return params


def call(path: str, method: str, params: dict[str, Any] | None = None,
         timeout: float = TIMEOUT_SECONDS) -> Any:
    """One request on a new connection; the result, or :class:`RpcCallError`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(encode_request(method, params, 1))
        data = bytearray()
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the management socket closed without a reply")
            data += chunk
            if len(data) > MAX_LINE_BYTES * 16:
                raise ConnectionError("reply too long")
    reply = json.loads(data)
    if "error" in reply:
        raise RpcCallError(reply["error"]["code"], reply["error"]["message"])
    return reply["result"]


def main(args: argparse.Namespace) -> int:
    try:
        params = parse_params(args.params)
    except ValueError as exc:
        print(f"vhostmem rpc: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = call(args.socket, args.method, params, args.timeout)
    except RpcCallError as exc:
        print(f"vhostmem rpc: error {exc.code}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"vhostmem rpc: {args.socket}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0
