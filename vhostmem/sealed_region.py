"""Shared memory a frontend hands over by fd and we map read-write: the inflight region
(SET_INFLIGHT_FD) and the dirty log (SET_LOG_BASE). No sockets.

Both must be a memory file sealed against shrinking: a file that could be truncated under the
mapping would kill the process with SIGBUS at the next touch. QEMU allocates the dirty log that
way (``qemu_memfd_alloc`` with F_SEAL_SHRINK); every backend, us included, hands out the
inflight region that way and QEMU only passes it back.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Callable

from vhostmem.guest_memory import shrink_sealed


def map_sealed(fd: int, mmap_size: int, mmap_offset: int, what: str,
               error: type[ValueError], check_size: Callable[[], None]) -> mmap.mmap:
    """Map ``mmap_size`` bytes of ``fd`` at ``mmap_offset``, shared and writable, after
    checking them; ``check_size`` raises ``error`` if the size is wrong for its user. Owns
    ``fd``: closed on any error, which is raised as ``error`` naming ``what``."""
    try:
        _check_file(fd, mmap_size, mmap_offset, what, error, check_size)
        return mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=mmap_offset)
    except (OSError, ValueError) as exc:
        os.close(fd)
        if isinstance(exc, error):
            raise
        raise error(f"{what}: {exc}") from exc


def _check_file(fd: int, mmap_size: int, mmap_offset: int, what: str,
                error: type[ValueError], check_size: Callable[[], None]) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} fd is not a memory file (memfd or regular file)")
    if mmap_offset % mmap.PAGESIZE:
        raise error(f"mmap_offset {mmap_offset} is not a multiple of {mmap.PAGESIZE}")
    check_size()
    if mmap_offset + mmap_size > st.st_size:
        raise error(f"mmap_offset {mmap_offset} + mmap_size {mmap_size} exceeds the fd's size "
                    f"{st.st_size}")
    if not shrink_sealed(fd):
        raise error(f"{what} fd is not a memfd sealed against shrinking (F_SEAL_SHRINK)")
