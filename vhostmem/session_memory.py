"""The memory requests of a session: SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG.

A mixin of :class:`vhostmem.session.Session`. The rule it keeps: memory a started ring lives in
never goes away under it (such a request is refused before anything changes), and a stopped
ring never keeps removed memory mapped (it lets go at once and is resolved again when it
starts).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from protocol import Message
from vhostmem.guest_memory import GuestMemory
from vhostmem.session_base import (
    MAX_MEM_SLOTS,
    SessionError,
    SessionState,
    close_fds,
    take_fds,
)
from vhostmem.virtqueue import Virtqueue
from vhostmem.worker_pool import WorkerPool

log = logging.getLogger("vhostmem.session")


class MemoryRequests:
    """Handlers of the memory-table requests (the session provides the state)."""

    name: str
    memory: GuestMemory
    queues: list[Virtqueue]
    state: SessionState
    pool: WorkerPool | None  # session_workers.py: the workers map the same table

    def _resolve_ring(self, i: int, addr: tuple[int, int, int, int, int]) -> None:
        raise NotImplementedError  # the session translates ring addresses
    # session_log.py: memory beyond the dirty log is refused while logging
    _check_log_covers: Callable[[int, str], None]

    def _set_mem_table(self, msg: Message) -> None:
        table = msg.payload
        if len(msg.fds) != table.nregions:
            raise SessionError(
                f"SET_MEM_TABLE: {table.nregions} regions but {len(msg.fds)} fds"
            )
        self._check_started_rings_in(table.regions)
        self._check_log_covers(
            max((r.guest_phys_addr + r.memory_size for r in table.regions), default=0),
            "SET_MEM_TABLE")
        regions = [
            (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, fd)
            for r, fd in zip(table.regions, take_fds(msg), strict=True)
        ]
        kept = self._keep_fds([fd for *_, fd in regions])
        try:
            self.memory.set_table(regions)
        except BaseException:
            close_fds(kept)
            raise
        if self.pool is not None:
            self.pool.set_table([(*r[:4], fd) for r, fd in zip(regions, kept, strict=True)])
        self._log_regions("SET_MEM_TABLE")
        self._reresolve_rings()

    def _check_started_rings_in(self, regions: list[Any]) -> None:
        """Refuse a table that would pull a started ring's memory away, before anything
        changes (the rings keep running on the old table)."""
        for i, vq in enumerate(self.queues):
            if not vq.started or vq.frontend_addr is None:
                continue
            _, desc, used, avail, _ = vq.frontend_addr
            desc_len, avail_len, used_len = vq.ring_sizes()
            for what, uva, size in (("descriptor table", desc, desc_len),
                                    ("avail ring", avail, avail_len),
                                    ("used ring", used, used_len)):
                if not any(r.userspace_addr <= uva and uva + size <= r.userspace_addr
                           + r.memory_size for r in regions):
                    raise SessionError(
                        f"SET_MEM_TABLE: the {what} of started ring {i} (frontend address "
                        f"{uva:#x}) is in none of the new regions"
                    )

    def _add_mem_reg(self, msg: Message) -> None:
        if len(msg.fds) != 1:
            raise SessionError("ADD_MEM_REG: expected exactly one fd")
        if len(self.memory.regions) >= MAX_MEM_SLOTS:
            raise SessionError(f"ADD_MEM_REG: all {MAX_MEM_SLOTS} memory slots are in use")
        r = msg.payload.region
        self._check_log_covers(r.guest_phys_addr + r.memory_size, "ADD_MEM_REG")
        fd = take_fds(msg)[0]
        kept = self._keep_fds([fd])
        try:
            self.memory.add_region(
                r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, fd)
        except BaseException:
            close_fds(kept)
            raise
        if self.pool is not None:
            self.pool.add_region(r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                 r.mmap_offset, kept[0])
        log.info(
            "%s: ADD_MEM_REG registered region gpa=%#x size=%#x",
            self.name,
            r.guest_phys_addr,
            r.memory_size,
        )

    def _rem_mem_reg(self, msg: Message) -> None:
        # QEMU may attach the region's fd again; it is not needed to find the region.
        close_fds(take_fds(msg))
        r = msg.payload.region
        self._check_rings_outside(r.guest_phys_addr, r.memory_size)
        self.memory.remove_region(r.guest_phys_addr, r.memory_size, r.userspace_addr)
        if self.pool is not None:
            self.pool.remove_region(r.guest_phys_addr, r.memory_size, r.userspace_addr)
        self._unmap_stopped_rings()
        log.info(
            "%s: REM_MEM_REG unregistered region gpa=%#x size=%#x",
            self.name,
            r.guest_phys_addr,
            r.memory_size,
        )

    def _keep_fds(self, fds: list[int]) -> list[int]:
        """Duplicates of region fds for the workers (the mapping here closes the originals)."""
        if self.pool is None:
            return []
        kept: list[int] = []
        try:
            for fd in fds:
                kept.append(os.dup(fd))
        except OSError:
            close_fds(kept)
            close_fds(fds)
            raise
        return kept

    def _log_regions(self, what: str) -> None:
        for region in self.memory.regions:
            log.info(
                "%s: %s registered region gpa=%#x size=%#x",
                self.name,
                what,
                region.guest_phys_addr,
                region.memory_size,
            )

    def _check_rings_outside(self, gpa: int, size: int) -> None:
        """Refuse to remove memory that a started ring still lives in."""
        for i, vq in enumerate(self.queues):
            if vq.started and vq.ring_overlaps(gpa, size):
                raise SessionError(f"REM_MEM_REG: ring {i} lives in region gpa={gpa:#x}")

    def _reresolve_rings(self) -> None:
        """After the table changed, point every started ring at the new mappings (checked
        beforehand to be there); stopped rings let go of the old ones and are resolved again
        when they start."""
        for i, vq in enumerate(self.queues):
            if vq.started and vq.frontend_addr is not None:
                self._resolve_ring(i, vq.frontend_addr)
        self._unmap_stopped_rings()

    def _unmap_stopped_rings(self) -> None:
        """A stopped ring's views must not keep removed guest memory mapped."""
        for vq in self.queues:
            if not vq.started:
                vq.unmap()
