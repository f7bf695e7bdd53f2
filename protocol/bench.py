"""Decode speed of the framer: a capture's front-end stream replayed many times.

    .venv/bin/python -m protocol.bench [capture.jsonl] [--rounds N]

Prints microseconds per message for Framer.feed (whole stream per feed, and one message per
feed as recvmsg usually returns them) and for build_message.
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from pathlib import Path

from protocol import Framer, build_message

DEFAULT_CAPTURE = (
    Path(__file__).parents[1] / ".." / "shared" / "captures" / "capture-qemu72-blk.jsonl"
)
HEADER = struct.Struct("<III")
US_PER_S = 1e6


def load_stream(path: Path) -> list[bytes]:
    """The fd-less front-end messages of a capture (fds cannot be replayed in a loop)."""
    messages = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "event" not in rec and rec["dir"] == "fe->be" and not rec["nfds"]:
            payload = bytes.fromhex(rec["payload_hex"])
            messages.append(HEADER.pack(rec["request"], rec["flags"], rec["size"]) + payload)
    return messages


def per_message(seconds: float, count: int) -> float:
    return seconds / count * US_PER_S


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("capture", nargs="?", type=Path, default=DEFAULT_CAPTURE)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    messages = load_stream(args.capture)
    stream = b"".join(messages)
    count = len(messages) * args.rounds

    framer = Framer("frontend")
    start = time.perf_counter()
    for _ in range(args.rounds):
        framer.feed(stream)
    whole = time.perf_counter() - start

    start = time.perf_counter()
    decoded = []
    for _ in range(args.rounds):
        for message in messages:
            decoded += framer.feed(message)
    single = time.perf_counter() - start

    start = time.perf_counter()
    for message in decoded:
        build_message(message)
    build = time.perf_counter() - start

    print(f"{len(messages)} messages x {args.rounds} rounds ({count} messages)")
    print(f"decode, whole stream per feed: {per_message(whole, count):.1f} us/message")
    print(f"decode, one message per feed:  {per_message(single, count):.1f} us/message")
    print(f"encode (build_message):        {per_message(build, count):.1f} us/message")


if __name__ == "__main__":
    main()
