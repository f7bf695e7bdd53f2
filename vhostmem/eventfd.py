"""The eventfds a frontend hands over for kicks, calls and errors, used so that it cannot stall us.

An eventfd's O_NONBLOCK flag lives in the open file description, which the frontend shares: it
can clear the flag after handing the fd over. A blocking read of an empty counter, or a blocking
write to a saturated one (0xfffffffffffffffe), would then hang the event loop and every device
of the process. So:

* only real eventfds are accepted (a pipe or a regular file behaves differently on read, write
  and poll), and each is made non-blocking when received;
* kicks are drained with ``preadv2(RWF_NOWAIT)``, which never blocks whatever the file flags
  say (kernels without read_iter on eventfds fall back to a plain non-blocking read);
* calls and errors are signalled with a non-blocking write; a saturated counter means the peer
  has a signal pending already, so EAGAIN is not an error.

What stays possible: a frontend that clears O_NONBLOCK on its own call fd *and* keeps its
counter saturated can block one signalling write; the kernel offers no per-call non-blocking
write for eventfds (pwritev2 RWF_NOWAIT is EOPNOTSUPP), and QEMU never does either.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

EVENTFD_LINK = "anon_inode:[eventfd]"
COUNTER_BYTES = 8
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0x8)
# preadv2 at the current position (eventfds have no offsets).
CURRENT_POSITION = -1
NOWAIT_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EINVAL, errno.ESPIPE)
_preadv = os.preadv


class EventfdError(ValueError):
    """An fd that cannot serve as a kick, call or error notifier (the message says why)."""


def check_eventfd(fd: int, what: str) -> None:
    """Raise EventfdError unless ``fd`` is an eventfd; then make it non-blocking."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise EventfdError(f"{what}: fd {fd} cannot be inspected: {exc}") from exc
    if target != EVENTFD_LINK:
        raise EventfdError(f"{what}: fd is {target}, not an eventfd")
    os.set_blocking(fd, False)


class KickReader:
    """Drains one kick eventfd without ever blocking (see the module docstring).

    ``drain()`` is called once per kick, so it is a bound method chosen once: the
    ``preadv2(RWF_NOWAIT)`` read, or a plain non-blocking read on kernels without it."""

    __slots__ = ("_bufs", "drain", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._bufs = [bytearray(COUNTER_BYTES)]
        self.drain: Callable[[], bool] = self._drain_nowait if fd >= 0 else _nothing
        if fd >= 0:
            os.set_blocking(fd, False)

    def _drain_nowait(self) -> bool:
        """Whether a kick was pending (its counter is consumed)."""
        try:
            return _preadv(self.fd, self._bufs, CURRENT_POSITION, RWF_NOWAIT) > 0
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in NOWAIT_UNSUPPORTED:
                raise
            self.drain = self._drain_plain  # this kernel: the non-blocking read it is
            return self._drain_plain()

    def _drain_plain(self) -> bool:
        try:
            return os.eventfd_read(self.fd) > 0
        except BlockingIOError:
            return False


def _nothing() -> bool:
    return False


def signal_eventfd(fd: int) -> None:
    """Add 1 to an eventfd counter (no fd: nothing to do)."""
    if fd >= 0:
        # try/except, not contextlib.suppress: this runs once per interrupt, and suppress
        # costs three Python calls (about 0.4 us).
        try:
            os.eventfd_write(fd, 1)
        except BlockingIOError:
            return  # the counter is saturated: the peer is signalled already
