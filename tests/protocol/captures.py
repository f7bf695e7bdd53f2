"""Access to the recorded QEMU 7.2 <-> qemu-storage-daemon sessions, and fd helpers for tests."""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# The repository's parent directory holds shared/ (see the task's layout).
CAPTURES_DIR = Path(__file__).parents[2] / ".." / "shared" / "captures"
HEADER = struct.Struct("<III")


def capture_files() -> list[Path]:
    return sorted(CAPTURES_DIR.glob("*.jsonl"))


def capture_ids() -> list[str]:
    """Parametrisation ids; a single marker id when the directory is missing (fails loudly)."""
    return [p.name for p in capture_files()] or ["<captures missing>"]


def require_capture(name: str) -> Path:
    path = CAPTURES_DIR / name
    if not path.is_file():
        pytest.fail(f"capture {name!r} not found under {CAPTURES_DIR.resolve()}")
    return path


@dataclass
class Record:
    seq: int
    channel: str
    dir: str
    request: int
    name: str
    flags: int
    size: int
    nfds: int
    fds: list[dict[str, Any]]
    payload: bytes
    decoded: dict[str, Any]

    @property
    def sender(self) -> str:
        return "frontend" if self.dir == "fe->be" else "backend"

    @property
    def wire(self) -> bytes:
        return HEADER.pack(self.request, self.flags, self.size) + self.payload


def load_records(name: str) -> list[Record]:
    """The message records of one capture, in order (events skipped)."""
    records = []
    with require_capture(name).open() as f:
        for line in f:
            raw = json.loads(line)
            if "event" in raw:
                continue
            payload = bytes.fromhex(raw["payload_hex"])
            assert len(payload) == raw["size"], f"seq {raw['seq']}: payload_hex != size"
            records.append(
                Record(
                    raw["seq"],
                    raw["channel"],
                    raw["dir"],
                    raw["request"],
                    raw["name"],
                    raw["flags"],
                    raw["size"],
                    raw["nfds"],
                    raw.get("fds", []),
                    payload,
                    raw.get("decoded") or {},
                )
            )
    return records


def make_fd(description: dict[str, Any]) -> int:
    """A real fd standing in for one that travelled in the capture (same kind, same size)."""
    target = description["target"]
    if target.startswith("/memfd:"):
        fd = os.memfd_create("vhostmem-test", os.MFD_CLOEXEC)
        os.ftruncate(fd, description["st_size"])  # sparse: costs no memory
        return fd
    if "eventfd" in target:
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    if target.startswith("socket:"):
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    raise AssertionError(f"capture has an fd of unknown kind: {target}")


def make_fds(record: Record) -> list[int]:
    assert len(record.fds) == record.nfds
    return [make_fd(d) for d in record.fds]


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def no_fd_leak() -> Iterator[None]:
    """Asserts that the block leaves the process with as many open fds as it found."""
    before = open_fd_count()
    yield
    after = open_fd_count()
    assert after == before, f"{after - before} fds leaked"


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
