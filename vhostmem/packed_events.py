"""Event suppression of a packed virtqueue (virtio 1.2 section 2.8.10), device side: the
device's own area (``_set_device_event``: ENABLE, DISABLE or DESC with an offset) and the
driver's, read to decide interrupts (``notify``). A mixin of
:class:`~vhostmem.packed_ring.PackedRing`, which owns the views and positions used here.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from vhostmem.eventfd import signal_eventfd
from vhostmem.split_ring import _fence, log

if TYPE_CHECKING:
    from vhostmem.dirty_log import DirtyLog

# Event suppression structure (2.8.10): le16 off_wrap (bits 0-14 descriptor offset, bit 15 wrap
# counter), le16 flags (bits 0-1).
EVENT_AREA_SIZE = 4
EVENT_OFF_WRAP = 0  # u16 index of the fields in the structure
EVENT_FLAGS = 1
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2  # only with VIRTIO_RING_F_EVENT_IDX
RING_EVENT_FLAGS_MASK = 3
WRAP_SHIFT = 15  # the wrap counter bit of off_wrap and of the vring base halves
POS_MASK = (1 << WRAP_SHIFT) - 1
U16_MASK = 0xFFFF


def _need_event(event: int, new: int, old: int) -> bool:
    """The EVENT_IDX rule: moving from ``old`` to ``new`` passed ``event`` (u16 arithmetic)."""
    return (new - event - 1) & U16_MASK < (new - old) & U16_MASK


class PackedEvents:
    """Interrupt and kick suppression of the packed layout (state: :class:`PackedRing`)."""

    index: int
    num: int
    event_idx: bool
    call_fd: int
    dirty: DirtyLog | None
    log_used_gpa: int | None
    stat_interrupts: int
    _addr: tuple[int, int, int] | None
    _idle: threading.Condition
    _unsignalled: bool
    _signalled_valid: bool
    _signalled_pos: int
    _signalled_wrap: int
    _signalled_returned: int
    _returned: int
    _used_pos: int
    _used_wrap: int
    _kicks_off: bool
    _driver_area: memoryview | None
    _device_area: memoryview | None

    def _set_device_event(self, flags: int, off_wrap: int) -> None:
        area = self._device_area
        assert area is not None
        area[EVENT_OFF_WRAP] = off_wrap  # before flags: a driver reading DESC sees its offset
        area[EVENT_FLAGS] = flags
        self._kicks_off = flags == RING_EVENT_FLAGS_DISABLE
        dirty = self.dirty
        if dirty is not None and self.log_used_gpa is not None and self._addr is not None:
            self._mark(dirty, [(self._addr[2], EVENT_AREA_SIZE)])

    def _mark(self, dirty: DirtyLog, ranges: list[tuple[int, int]]) -> None:
        outside = dirty.mark_ranges(ranges)
        if outside is not None:
            log.error("virtqueue %d: gpa=%#x len=%#x is outside the dirty log; not marked",
                      self.index, *outside)

    def notify(self) -> bool:
        """Signal the call eventfd if the driver's event suppression area asks for it for
        the used descriptors written since the last signal. Returns whether it signalled."""
        area = self._driver_area
        if not self._unsignalled or area is None:
            return False
        self._unsignalled = False
        _fence()  # used flags stored before the driver's area is read
        flags = area[EVENT_FLAGS] & RING_EVENT_FLAGS_MASK  # read once
        # Descriptors used so far, read before the position (push_used counts them first):
        # a completion in between makes the next count too large (a spare interrupt), never
        # too small.
        returned = self._returned
        new, wrap = self._used_pos, self._used_wrap
        if flags == RING_EVENT_FLAGS_DISABLE:
            need = False
        elif flags == RING_EVENT_FLAGS_DESC and self.event_idx and self._signalled_valid:
            off_wrap = area[EVENT_OFF_WRAP]  # read once
            num = self.num
            if returned - self._signalled_returned >= num:
                # A lap or more of used descriptors since the last signal: every position,
                # the event's included, was passed (the wrap bits cannot tell laps apart).
                need = True
            else:
                old = self._signalled_pos
                if self._signalled_wrap != wrap:
                    old -= num
                event = off_wrap & POS_MASK
                if off_wrap >> WRAP_SHIFT != wrap:
                    event -= num
                need = _need_event(event, new, old)
        else:
            need = True  # ENABLE, the first signal, or DESC without EVENT_IDX
        self._signalled_pos, self._signalled_wrap = new, wrap
        self._signalled_returned = returned
        self._signalled_valid = True
        if need:
            signal_eventfd(self.call_fd)
            self.stat_interrupts += 1
        return need
