"""vhost-user-blk requests served inline, a batch at a time: the hot path of ``io_mode="inline"``.

One turn of a queue (:func:`serve_turn`) takes the available chains a batch at a time
(``Virtqueue.pop_batch``: one avail idx read per batch), executes each request and returns the
batch with one used idx store (``Virtqueue.push_used_batch``), then signals the driver once
(``Virtqueue.notify``). The ring layout stays behind those calls (a packed ring returns its
batch request by request).

The common request, a read into one data buffer with a header and a status descriptor of their
own (what Linux and SeaBIOS send for a 4 KiB read), is served here in a few steps: one header
unpack, the range check, one ``preadv`` into the data view, the status byte. Anything else
(other shapes, types, short reads, errors) goes through :meth:`BlkDevice.serve`, the one
implementation of the request rules; the fast path only skips work for chains whose outcome it
can decide alone, with the same result (5.2.6: status OK, used length data + 1).
"""

from __future__ import annotations

import os
from time import monotonic_ns
from typing import TYPE_CHECKING

from vhostmem.devices.blk import (
    REQ_HEADER,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    TALLY_ERRORS,
    TALLY_WRITE_BYTES,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    _data_in,
)

if TYPE_CHECKING:
    from vhostmem.devices.blk import BlkDevice
    from vhostmem.virtqueue import Virtqueue

# The fast path's chain shape: one readable buffer (the header) and two writable ones (data,
# then the status byte).
HEADER_SIZE = REQ_HEADER.size
STATUS_SIZE = 1


def serve_turn(dev: BlkDevice, vq: Virtqueue) -> None:
    """One turn of ``vq``: batches until it has nothing more (or its budget is used up)."""
    pop_batch = vq.pop_batch
    push_batch = vq.push_used_batch
    serve = dev.serve
    preadv = os.preadv
    unpack = REQ_HEADER.unpack
    fd = dev.backend.fd
    disk_bytes = dev.disk_bytes
    # Statistics (vhostmem/queue_stats.py): writes, errors and odd chains note themselves in
    # the turn's tally (serve); the queue's counters are updated once per turn.
    tally = [0, 0, 0]
    started = monotonic_ns()
    requests = used_bytes = 0
    while batch := pop_batch():
        lengths: list[int] = []
        for chain in batch:
            readable = chain.readable
            writable = chain.writable
            if len(readable) == 1 and len(writable) == 2:
                data, status = writable
                hdr = readable[0]
                if len(hdr) == HEADER_SIZE and len(status) == STATUS_SIZE:
                    rtype, _, sector = unpack(hdr)
                    n = len(data)
                    offset = sector << SECTOR_SHIFT
                    if (rtype == VIRTIO_BLK_T_IN and not n % SECTOR_SIZE
                            and offset + n <= disk_bytes):
                        try:
                            got = preadv(fd, (data,), offset)
                        except OSError:
                            got = -1  # serve() reads again and reports the error
                        if got == n:
                            status[0] = VIRTIO_BLK_S_OK
                            lengths.append(n + STATUS_SIZE)
                            continue
            lengths.append(serve(chain, tally))
        push_batch(batch, lengths)
        requests += len(batch)
        used_bytes += sum(lengths)
    vq.notify()
    if requests:
        vq.account_turn(requests, _data_in(used_bytes, requests, tally),
                        tally[TALLY_WRITE_BYTES], tally[TALLY_ERRORS], started)
