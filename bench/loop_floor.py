"""The floor of a queue-depth-1 NBD read's two event-loop wakes, without vhostmem's code.

    python bench/loop_floor.py [--rounds 20000]

A child process runs a uvloop loop shaped like vhostmem over NBD at depth 1, with nothing
else in it: wake 1, a "kick" eventfd is readable: read it, send a 28-byte "request" on a
socket; wake 2, the "reply" (28 bytes) is readable: receive it, write a "call" eventfd. An
echo process plays the server, this process the guest (write the kick, block on the call).
Printed: the loop process's CPU (utime + stime) per round, and rounds per second, as JSON. What
vhostmem-nbd spends per read above this is its own Python (the ring, the request and reply
paths), not the loop, the wakes or the syscalls (docs/nbd.md, "Performance").
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import peers
from bench.blk_bench import machine

REQUEST = b"x" * 28  # an NBD request header
WARMUP = 500


def _echo(sock: socket.socket) -> None:
    while data := sock.recv(64):
        sock.sendall(data)
    os._exit(0)


def _loop(kick: int, call: int, sock: socket.socket) -> None:
    loop = uvloop.new_event_loop()
    buf = bytearray(64)
    sock.setblocking(False)

    def on_kick() -> None:
        os.eventfd_read(kick)
        sock.send(REQUEST)

    def on_reply() -> None:
        sock.recv_into(buf)
        os.eventfd_write(call, 1)

    loop.add_reader(kick, on_kick)
    loop.add_reader(sock.fileno(), on_reply)
    loop.run_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20000)
    args = ap.parse_args(argv)
    kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0)
    near, far = socket.socketpair()
    children = []
    if (pid := os.fork()) == 0:
        near.close()
        _echo(far)
    children.append(pid)
    if (pid := os.fork()) == 0:
        far.close()
        _loop(kick, call, near)
    children.append(pid)
    try:
        for _ in range(WARMUP):
            os.eventfd_write(kick, 1)
            os.eventfd_read(call)
        cpu0, t0 = peers.cpu_seconds(pid), time.monotonic()
        for _ in range(args.rounds):
            os.eventfd_write(kick, 1)
            os.eventfd_read(call)
        cpu1, t1 = peers.cpu_seconds(pid), time.monotonic()
    finally:
        for child in children:
            os.kill(child, 9)
            os.waitpid(child, 0)
    print(json.dumps({"bench": "loop_floor", "machine": machine(), "rounds": args.rounds,
                      "loop_cpu_us_per_round": round((cpu1 - cpu0) / args.rounds * 1e6, 2),
                      "rounds_per_s": round(args.rounds / (t1 - t0))}, indent=1))


if __name__ == "__main__":
    main()
