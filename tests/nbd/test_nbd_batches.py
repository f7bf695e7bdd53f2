"""Batches of NBD requests on one connection, in process on a real socket to the scripted server
(tests/nbd/hostile.py): a batch's headers are packed side by side into the link's buffer and go
out as runs between WRITE payloads; a header must reach the server intact even when the socket
did not take the previous batch at once (its bytes are still queued while the next batch is
packed) and when a batch outgrows one header buffer; a request sent again after a lost
connection starts afresh."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from nbd.constants import NBD_CMD_READ, NBD_CMD_WRITE
from tests.nbd.hostile import HONEST, HostileServer
from tests.nbd.servers import unix_uri
from vhostmem.devices import nbd_backend
from vhostmem.devices.nbd_backend import NbdBackend
from vhostmem.devices.nbd_link import HEADERS_PER_BUFFER

SECTOR = 512
MIB = 1 << 20
DISK = 32 * MIB
WRITE = 2 * MIB  # more than the socket buffers take at once, ten of them
WRITES_AT = 4 * MIB  # the big writes go here, the reads below


def pattern(size: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (size // 256)


class Batch:
    """Requests submitted to ``backend`` in one batch (corked), and what they expect."""

    def __init__(self, backend: NbdBackend) -> None:
        self.backend = backend
        self.loop = asyncio.get_running_loop()
        self.results: list[asyncio.Future[bool]] = []
        self.expected: list[tuple[int, int, int, int]] = []  # command, flags, offset, length
        self.reads: list[tuple[int, bytearray]] = []

    def _done(self) -> Callable[[bool], None]:
        fut: asyncio.Future[bool] = self.loop.create_future()
        self.results.append(fut)
        return fut.set_result

    def read(self, offset: int, length: int) -> None:
        buf = bytearray(b"\xee" * length)
        self.reads.append((offset, buf))
        self.expected.append((NBD_CMD_READ, 0, offset, length))
        self.backend.submit_read([memoryview(buf)], offset, length, self._done())

    def write(self, offset: int, data: bytes) -> None:
        self.expected.append((NBD_CMD_WRITE, 0, offset, len(data)))
        self.backend.submit_write([memoryview(data)], offset, len(data), False, self._done())

    async def wait(self) -> list[bool]:
        return list(await asyncio.wait_for(asyncio.gather(*self.results), 20))


async def _close(backend: NbdBackend) -> None:
    backend.close()
    await asyncio.gather(*list(nbd_backend._CLOSING))


def test_batches_reach_the_server_intact_while_the_socket_is_full(tmp_path: Path) -> None:
    server = HostileServer(tmp_path / "h.sock", HONEST, size=DISK)
    server.disk[:] = pattern(DISK, 1)
    writes = [pattern(WRITE, 10 + j) for j in range(12)]
    count = HEADERS_PER_BUFFER + 44  # more headers in a batch than one buffer holds

    async def main() -> tuple[list[Batch], bool]:
        backend = NbdBackend(unix_uri(tmp_path / "h.sock"), timeout=20)
        batches = [Batch(backend), Batch(backend)]
        first, second = batches
        backend.cork()
        for i in range(count):
            first.read(i * SECTOR, SECTOR)
            if i % 30 == 29:  # 20 MiB of payload between runs of headers
                first.write(WRITES_AT + (i // 30) * WRITE, writes[i // 30])
        backend.uncork()
        # 20 MiB do not fit the socket: the first batch's headers are still queued, as views
        # of the header buffer, while the second batch is packed.
        still_queued = bool(backend.links[0]._out)
        backend.cork()
        for i in range(count):
            second.read((count + i) * SECTOR, SECTOR)
            if i in (5, 200):
                j = 10 + (i > 5)
                second.write(WRITES_AT + j * WRITE, writes[j])
        backend.uncork()
        for batch in batches:
            assert all(await batch.wait())
        await _close(backend)
        return batches, still_queued

    try:
        batches, still_queued = asyncio.run(main())
    finally:
        server.close()
    assert still_queued
    sent = [r for r in server.requests if r[0] in (NBD_CMD_READ, NBD_CMD_WRITE)]
    assert sent == batches[0].expected + batches[1].expected
    for batch in batches:
        for offset, buf in batch.reads:
            assert buf == server.disk[offset : offset + len(buf)]
    for j, data in enumerate(writes):
        at = WRITES_AT + j * WRITE
        assert server.disk[at : at + WRITE] == data, j


def test_requests_sent_again_after_a_reply_cut_short_start_afresh(tmp_path: Path) -> None:
    """The first READ's reply claims its whole range and then stops (the server closes the
    connection): the range it claimed must not count against the same request sent again on
    the next connection."""
    server = HostileServer(tmp_path / "h.sock", "short-then-close", size=DISK, bad_limit=1)
    server.disk[:] = pattern(DISK, 3)

    async def main() -> Batch:
        backend = NbdBackend(unix_uri(tmp_path / "h.sock"), timeout=20)
        batch = Batch(backend)
        backend.cork()
        for i in range(64):
            batch.read(i * 4096, 4096)
        backend.uncork()
        assert all(await batch.wait())
        await _close(backend)
        return batch

    try:
        batch = asyncio.run(main())
    finally:
        server.close()
    assert server.bad_replies == 1 and server.connections == 2
    for offset, buf in batch.reads:
        assert buf == server.disk[offset : offset + len(buf)]


def test_a_link_op_sets_every_field_of_a_request() -> None:
    """Op.__init__ sets Request's fields itself (one call less per request): a field added to
    Request must be added there too, or an Op would lack it."""
    from nbd import Request
    from vhostmem.devices.nbd_link import Op

    op = Op(1, 4096, 512, 0, None, lambda ok: None, 0.0)
    fresh = Request(1, 4096, 512)
    for name in Request.__slots__:
        assert getattr(op, name) == getattr(fresh, name), name
