"""CPU per READ of the NBD client path alone (NbdBackend, NbdLink, Transmission), two trees.

    python bench/nbd_micro.py --a /tmp/base-main --b . [--rounds 2] [--batches 3000] [--depth 32]

In one process per slot (slot order A B B A per round; each runs the tree's own code with
PYTHONPATH and cwd set to it): the backend is given one end of a socketpair as its connection
(no handshake), and the process plays the server on the other end itself, synchronously.
Each batch: ``depth`` 4 KiB READs submitted in one cork (``submit_read``, the request side: the
Op, the header, the one ``sendmsg``), then, untimed, the server side reads the headers and
writes a structured OFFSET_DATA reply per request, then the connection's readable handler runs
(the reply side: the receives into the buffers, the parse, the completions). Only the
backend's two steps are timed, in CPU time (``time.process_time_ns``): no event loop wake, no
other process, no scheduler in the number, so it moves with the code and not with the load
of the machine (the guest side, ring pop and completion, is not in it: bench/blk_bench.py
measures the whole). Prints one JSON object: per slot, microseconds per READ for the request
side, the reply side and both.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BLOCK = 4096
SOCKET_BUFFER = 8 << 20
STRUCTURED_MAGIC = 0x668E33EF
REQUEST_MAGIC = 0x25609513
OFFSET_DATA, FLAG_DONE = 1, 1
HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
CHUNK = struct.Struct(">IHHQIQ")  # magic, flags, type, cookie, length, offset


def child(batches: int, depth: int) -> dict[str, float]:
    """Runs in the tree under test (imported from PYTHONPATH)."""
    import asyncio

    from nbd import ExportInfo
    from nbd.constants import NBD_FLAG_HAS_FLAGS, NBD_FLAG_SEND_FLUSH
    from vhostmem.devices.nbd_backend import NbdBackend

    ours, server = socket.socketpair()
    for s in (ours, server):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    ours.setblocking(False)
    info = ExportInfo(name="", size=1 << 30, flags=NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH,
                      structured=True)
    backend = NbdBackend("nbd+unix:///?socket=/unused", connection=(ours, info))
    bufs = [memoryview(bytearray(BLOCK)) for _ in range(depth)]
    payload = bytes(range(256)) * (BLOCK // 256)
    completed = [0]

    def done(ok: bool) -> None:
        completed[0] += ok

    async def run() -> dict[str, float]:
        backend._link(0)  # attach to this loop (the first request would)
        link = backend.links[0]
        request_ns = reply_ns = 0
        for n in range(batches):
            t0 = time.process_time_ns()
            backend.cork()
            for i in range(depth):
                backend.submit_read([bufs[i]], ((n * depth + i) % 4096) * BLOCK, BLOCK, done)
            backend.uncork()
            t1 = time.process_time_ns()
            wire = _recv_exact(server, depth * HEADER.size)
            replies = []
            for i in range(depth):
                magic, _, _, cookie, offset, length = HEADER.unpack_from(wire, i * HEADER.size)
                assert magic == REQUEST_MAGIC and length == BLOCK
                replies.append(CHUNK.pack(STRUCTURED_MAGIC, FLAG_DONE, OFFSET_DATA, cookie,
                                          8 + length, offset) + payload)
            server.sendall(b"".join(replies))
            t2 = time.process_time_ns()
            while completed[0] < (n + 1) * depth:
                link._on_readable()
            t3 = time.process_time_ns()
            request_ns += t1 - t0
            reply_ns += t3 - t2
        reads = batches * depth
        return {"request_us": request_ns / reads / 1e3, "reply_us": reply_ns / reads / 1e3,
                "total_us": (request_ns + reply_ns) / reads / 1e3}

    return asyncio.run(run())


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        data += sock.recv(n - len(data))
    return bytes(data)


def slot(tree: Path, batches: int, depth: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", "--batches", str(batches),
         "--depth", str(depth)], cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)),
        capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, help="tree A")
    ap.add_argument("--b", type=Path, help="tree B")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", type=int, default=3000)
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.batches, args.depth)))
        return
    if args.a is None or args.b is None:
        ap.error("--a and --b are required")
    slots = []
    for _ in range(args.rounds):
        for name in "ABBA":
            tree = args.a if name == "A" else args.b
            slots.append({"tree": name, **slot(tree.resolve(), args.batches, args.depth)})
    summary = {name: {key: round(statistics.mean(s[key] for s in slots if s["tree"] == name), 2)
                      for key in ("request_us", "reply_us", "total_us")} for name in "AB"}
    print(json.dumps({"bench": "nbd_micro", "depth": args.depth, "batches": args.batches,
                      "loadavg": os.getloadavg(), "slots": slots, "mean": summary}, indent=1))


if __name__ == "__main__":
    main()
