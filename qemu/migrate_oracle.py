"""What qemu/migrate.py checks a migration with, apart from the guest's own checks.

- :class:`MigrationTap`: qemu/vhost_tap.py's relay between a QEMU and the backend, recording each
  connection's dirty-log messages; with ``decoy`` it hands the backend a fresh log in place of
  QEMU's (the negative control: the backend logs into memory QEMU never reads).
- the RAM oracle: the guest RAM of two QEMU processes compared page by page through
  /proc/PID/mem (:func:`compare_guest_ram`), each differing page described as disk data, zeroes
  or other (:func:`describe_page`).
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import numpy as np

from protocol.constants import FrontendRequest
from qemu.reconnect import WRITER_MAGIC
from qemu.vhost_tap import (
    FRONT,
    VhostUserTap,
)

MIB = 1 << 20

# ---- the vhost-user relay: what each connection negotiated, and the negative control ---------

LOG_PAYLOAD = struct.Struct("<QQ")  # VhostUserLog: mmap_size, mmap_offset
U64 = struct.Struct("<Q")
F_LOG_ALL = 1 << 26  # VHOST_F_LOG_ALL


def decoy_log_fd(size: int) -> int:
    """A fresh memfd of ``size`` bytes, sealed like QEMU's own log (grow, shrink, seal)."""
    fd = os.memfd_create("decoy-vhost-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


class MigrationTap(VhostUserTap):
    """qemu/vhost_tap.py's relay, recording per connection the dirty-log messages (``events``:
    ``features LOG_ALL=on|off``, ``log-base SIZE``, ``inflight``). With ``decoy``, SET_LOG_BASE
    reaches the backend with a fresh memfd of the same size in place of QEMU's log: the backend
    logs as it should, into memory QEMU never reads, so QEMU migrates as if the backend marked
    nothing (the negative control of the in-guest check)."""

    def __init__(self, front: Path, back: Path, decoy: bool = False) -> None:
        self.decoy = decoy
        self.decoys = 0
        self.events: list[tuple[int, str]] = []  # (connection, what)
        super().__init__(front, back)

    def _inspect(self, number: int, sender: str, request: int, payload: bytes,
                 fds: list[int]) -> None:
        if sender != FRONT:
            return
        if request == FrontendRequest.SET_FEATURES and len(payload) >= U64.size:
            on = U64.unpack_from(payload)[0] & F_LOG_ALL
            self.events.append((number, f"features LOG_ALL={'on' if on else 'off'}"))
        elif request == FrontendRequest.SET_LOG_BASE and len(payload) >= LOG_PAYLOAD.size:
            mmap_size, mmap_offset = LOG_PAYLOAD.unpack_from(payload)
            self.events.append((number, f"log-base {mmap_size}"))
            if self.decoy and len(fds) == 1:
                os.close(fds[0])
                fds[0] = decoy_log_fd(mmap_size + mmap_offset)
                self.decoys += 1
        elif request == FrontendRequest.SET_INFLIGHT_FD:
            self.events.append((number, "inflight"))
        elif request == FrontendRequest.SET_VRING_KICK and len(payload) >= U64.size:
            self.events.append((number, f"kick[{U64.unpack_from(payload)[0] & 0xFF}]"))
        elif request == FrontendRequest.SET_VRING_ENABLE and len(payload) >= 8:
            index, on = struct.unpack_from("<II", payload)
            self.events.append((number, f"enable[{index}]={on}"))
        elif request == FrontendRequest.GET_VRING_BASE and len(payload) >= 8:
            self.events.append((number, f"stop[{struct.unpack_from('<I', payload)[0]}]"))

    def summary(self) -> str:
        """Per connection: its dirty-log and ring events, then the last messages it carried
        (where a connection stalled)."""
        with self._lock:
            events, messages = list(self.events), list(self.messages)
        per: dict[int, list[str]] = {}
        for number, what in events:
            per.setdefault(number, []).append(what)
        parts = []
        for n in sorted({m.connection for m in messages} | set(per)):
            last = [f"{m.name}{' reply' if m.is_reply else ''}" for m in messages
                    if m.connection == n][-3:]
            parts.append(f"c{n}: {', '.join(per.get(n, []))} (last: {', '.join(last)})")
        return "; ".join(parts)


# ---- the RAM oracle ------------------------------------------------------------------------------

RAM_CHUNK = 16 * MIB
PAGE = 4096


def guest_ram_address(pid: int, size: int) -> int:
    """Where QEMU ``pid`` maps its main guest RAM: the one mapping of exactly ``size`` bytes
    (the memfd backend's, or the anonymous RAM block's). LookupError if there is none or
    several."""
    found = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            path = fields[5] if len(fields) > 5 else ""
            if end - start == size and fields[1].startswith("rw") and (
                    "memfd:" in path or not path):
                found.append(start)
    if len(found) != 1:
        raise LookupError(f"QEMU {pid}: {len(found)} mappings of {size} bytes")
    return found[0]


def describe_page(page: bytes) -> str:
    """"zeroes", a vmtest writer block ("block J/B/S": job, block, seq; the guest's disk data:
    a page-cache page, an I/O buffer), or "other" (guest kernel or program data)."""
    words = np.frombuffer(page, dtype="<u8")
    if not words.any():
        return "zeroes"
    if int(words[0]) & 0xFFFFFFFF == WRITER_MAGIC:
        return f"block {int(words[0]) >> 32}/{int(words[1])}/{int(words[2])}"
    return "other"


def compare_guest_ram(source_pid: int, destination_pid: int, size: int,
                      first: int = 4) -> tuple[int, list[tuple[int, str, str]]]:
    """Guest pages (4 KiB) whose contents differ between two QEMUs' RAM (read through
    /proc/PID/mem), and for the first ``first`` of them the guest-physical offset and what
    each side holds (``describe_page``)."""
    addresses = (guest_ram_address(source_pid, size), guest_ram_address(destination_pid, size))
    fds = [os.open(f"/proc/{pid}/mem", os.O_RDONLY) for pid in (source_pid, destination_pid)]
    differing, found = 0, []
    try:
        for offset in range(0, size, RAM_CHUNK):
            length = min(RAM_CHUNK, size - offset)
            raw = [os.pread(fd, length, base + offset)
                   for fd, base in zip(fds, addresses, strict=True)]
            a, b = (np.frombuffer(r, dtype=np.uint64).reshape(-1, PAGE // 8) for r in raw)
            pages = np.flatnonzero((a != b).any(axis=1))
            differing += len(pages)
            for p in pages[: first - len(found)]:
                at = int(p) * PAGE
                found.append((offset + at, describe_page(raw[0][at : at + PAGE]),
                              describe_page(raw[1][at : at + PAGE])))
    finally:
        for fd in fds:
            os.close(fd)
    return differing, found
