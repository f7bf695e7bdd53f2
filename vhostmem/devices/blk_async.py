"""vhost-user-blk requests on an asynchronous backend (``backend.asynchronous``, e.g. NBD):
each chain popped is held (``Virtqueue.hold``), handed to the backend as one or more
operations, and completed when the backend says the last of them is done; the completions of
one backend batch (a kick's requests, a receive wake's replies: ``cork``/``uncork``) or else
of one event-loop turn are published together with one signal per queue
(``Virtqueue.complete_many``). A request is acknowledged to the guest only after the backend
acknowledged every operation of it.

The validation is the synchronous path's (:meth:`BlkDevice._execute`): the same checks, in the
same order, with the same status for each malformed request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import monotonic_ns
from typing import TYPE_CHECKING, Any

from vhostmem.devices.blk import (
    REQ_HEADER,
    SECTOR_SHIFT,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    _copy_into,
    _segment_bytes_ok,
    _split,
)

if TYPE_CHECKING:
    from vhostmem.devices.blk import BlkDevice
    from vhostmem.virtqueue import DescChain, Virtqueue

log = logging.getLogger(__name__)


class _Request:
    """One guest request in flight: its status byte, and how many operations it waits for
    (one extra while they are being submitted, so that none completes it early)."""

    __slots__ = ("done_list", "head", "left", "ok", "read_bytes", "started", "status", "vq",
                 "write_bytes")

    def __init__(self, vq: Virtqueue, head: int, status: memoryview, started: int,
                 done_list: _Completions) -> None:
        self.vq, self.head, self.status, self.started = vq, head, status, started
        self.done_list = done_list
        self.left = 1
        self.ok = True
        self.read_bytes = self.write_bytes = 0

    def op_done(self, ok: bool) -> None:
        self.ok = self.ok and ok
        self.left -= 1
        if self.left == 0:
            self.finish(VIRTIO_BLK_S_OK if self.ok else VIRTIO_BLK_S_IOERR)

    def finish(self, status: int) -> None:
        self.left = -1
        self.status[0] = status
        data_in = self.read_bytes if status == VIRTIO_BLK_S_OK else 0
        # On the event loop, like inline mode: no worker thread shares these counters.
        self.vq.account_turn(1, data_in, self.write_bytes, int(status != VIRTIO_BLK_S_OK),
                             self.started)
        self.done_list.add(self.vq, self.head, data_in + 1)


class _Completions:
    """Completions gathered during a batch of the backend (a kick's requests, a receive
    wake's replies: published when it ends, without another loop turn) or else during one
    event-loop turn (published at its end)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, backend: Any) -> None:
        self.loop = loop
        self.after_batch: Callable[[Callable[[], None]], bool] = getattr(
            backend, "after_batch", lambda call: False)
        self.by_queue: dict[Virtqueue, list[tuple[int, int]]] = {}
        self.scheduled = False

    def add(self, vq: Virtqueue, head: int, used: int) -> None:
        self.by_queue.setdefault(vq, []).append((head, used))
        if self.scheduled:
            return
        self.scheduled = True
        if self.after_batch(self.publish):
            return  # published when the backend's batch ends, in this call stack
        if self.loop.is_closed() or not self.loop.is_running():
            self.publish()  # the backend fails what is left as it closes: publish now
        else:
            self.loop.call_soon(self.publish)

    def publish(self) -> None:
        self.scheduled = False
        by_queue, self.by_queue = self.by_queue, {}
        for vq, done in by_queue.items():
            try:
                vq.complete_many(done)
            except Exception:
                log.exception("queue %d: publishing %d completions failed", vq.index,
                              len(done))


def handle_queue_async(dev: BlkDevice, vq: Virtqueue) -> None:
    done_list: _Completions | None = getattr(dev, "_async_completions", None)
    backend: Any = dev.backend
    if done_list is None:
        done_list = _Completions(asyncio.get_running_loop(), backend)
        dev._async_completions = done_list  # type: ignore[attr-defined]
    started = monotonic_ns()
    popped = 0
    # One batch: the requests go out together when it ends (one sendmsg per connection, no
    # extra loop turn), and what completed at once is published then.
    cork = getattr(backend, "cork", None)
    if cork is not None:
        cork()
    try:
        while (chain := vq.pop()) is not None:
            popped += 1
            _start(dev, vq, chain, started, done_list)
    finally:
        # Held before any of them is published (completions wait for the end of the batch
        # or loop turn); in service at once, so whichever batch completes last signals.
        if popped:
            vq.hold(popped, waiting=False)
        if cork is not None:
            backend.uncork()


def _start(dev: BlkDevice, vq: Virtqueue, chain: DescChain, started: int,
           done_list: _Completions) -> None:
    writable = chain.writable
    if chain.writable_len == 0:
        log.warning("blk request %d has no status byte: completed empty", chain.head)
        vq.account_turn(1, 0, 0, 1, started)
        done_list.add(vq, chain.head, 0)
        return
    last = writable[-1]
    if len(last) == 1:
        status = writable.pop()
    else:
        status = last[-1:]
        writable[-1] = last[:-1]
    req = _Request(vq, chain.head, status, started, done_list)
    try:
        immediate = _submit(dev, chain, writable, chain.writable_len - 1, req)
    except Exception:  # a bug must fail one request, not the connection
        log.exception("blk request %d: unexpected error", chain.head)
        immediate = VIRTIO_BLK_S_IOERR
    if immediate is not None:
        req.finish(immediate)
    else:
        req.op_done(True)  # all submitted: drop the submission's own count


def _submit(dev: BlkDevice, chain: DescChain, data_out: list[memoryview], out_len: int,
            req: _Request) -> int | None:
    """Hand the request's operations to the backend; or the status to finish it with now."""
    backend: Any = dev.backend
    readable = chain.readable
    if chain.readable_len < REQ_HEADER.size:
        return VIRTIO_BLK_S_IOERR
    in_len = chain.readable_len - REQ_HEADER.size
    if len(readable[0]) == REQ_HEADER.size:
        rtype, _, sector = REQ_HEADER.unpack_from(readable[0])
        data_in = readable[1:]
    else:
        header, data_in = _split(readable, REQ_HEADER.size)
        rtype, _, sector = REQ_HEADER.unpack(header)
    fua = not dev.writeback  # write-through: each write is durable before it completes
    if rtype == VIRTIO_BLK_T_IN:
        if in_len or not dev._in_range(sector, out_len):
            return VIRTIO_BLK_S_IOERR
        req.left += 1
        req.read_bytes = out_len
        backend.submit_read(data_out, sector << SECTOR_SHIFT, out_len, req.op_done,
                            req.vq.index)
        return None
    if rtype == VIRTIO_BLK_T_OUT:
        if dev.readonly or out_len or not dev._in_range(sector, in_len):
            return VIRTIO_BLK_S_IOERR
        req.left += 1
        req.write_bytes = in_len
        backend.submit_write(data_in, sector << SECTOR_SHIFT, in_len, fua, req.op_done,
                             req.vq.index)
        return None
    if rtype == VIRTIO_BLK_T_FLUSH:
        req.left += 1
        backend.submit_flush(req.op_done, req.vq.index)
        return None
    if rtype == VIRTIO_BLK_T_GET_ID:
        req.read_bytes = _copy_into(data_out, dev.serial)
        return VIRTIO_BLK_S_OK
    if rtype == VIRTIO_BLK_T_WRITE_ZEROES and not getattr(backend, "offers_write_zeroes",
                                                          True):
        return VIRTIO_BLK_S_UNSUPP  # not offered (blk.py features): a guest ignoring that
    if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        if dev.readonly or not _segment_bytes_ok(in_len):
            return VIRTIO_BLK_S_IOERR
        return _discard_write_zeroes(dev, backend, rtype, b"".join(data_in), fua, req)
    return VIRTIO_BLK_S_UNSUPP


def _discard_write_zeroes(dev: BlkDevice, backend: Any, rtype: int, payload: bytes, fua: bool,
                          req: _Request) -> int | None:
    """Every segment is validated before any is submitted (5.2.6.2)."""
    is_discard = rtype == VIRTIO_BLK_T_DISCARD
    status, segments = dev.dwz_segments(rtype, payload)
    if status != VIRTIO_BLK_S_OK:
        return status
    for sector, count, flags in segments:
        offset, nbytes = sector << SECTOR_SHIFT, count << SECTOR_SHIFT
        if not nbytes:
            continue
        req.left += 1
        if is_discard:
            backend.submit_trim(offset, nbytes, fua, req.op_done, req.vq.index)
        else:
            unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
            backend.submit_write_zeroes(offset, nbytes, unmap, fua, req.op_done,
                                        req.vq.index)
    return None
