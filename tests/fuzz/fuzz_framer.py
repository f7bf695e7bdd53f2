"""atheris fuzz target for protocol.Framer (run by hand, not collected by pytest).

    .venv/bin/python tests/fuzz/fuzz_framer.py -runs=100000

The input is cut into chunks; each chunk is prefixed by one control byte: low 2 bits = fds
to send with it (real eventfds), next 6 bits = chunk length. Only ProtocolError may escape a
feed, and the process must not gain open fds (checked every 1000 runs via /proc/self/fd).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

FD_BITS = 0x3
LEN_SHIFT = 2
CHECK_EVERY = 1000


def chunks_of(data: bytes) -> list[tuple[bytes, int]]:
    chunks = []
    pos = 0
    while pos < len(data):
        control = data[pos]
        length = control >> LEN_SHIFT
        chunks.append((data[pos + 1 : pos + 1 + length], control & FD_BITS))
        pos += 1 + length
    return chunks


def main() -> None:
    # run from anywhere: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import atheris

    with atheris.instrument_imports():
        import protocol  # noqa: F401  (instrumented for coverage feedback)
        from tests.protocol.fuzzing import run_framer

    baseline = len(os.listdir("/proc/self/fd"))
    runs = 0

    def one_input(data: bytes) -> None:
        nonlocal runs
        run_framer(chunks_of(data), sender="backend" if data[:1] == b"\xff" else "frontend")
        runs += 1
        if runs % CHECK_EVERY == 0:
            now = len(os.listdir("/proc/self/fd"))
            assert now == baseline, f"fd leak: {now - baseline} fds after {runs} runs"

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
