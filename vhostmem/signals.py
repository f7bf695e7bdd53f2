"""The process signals a serving process takes in its main thread (vhostmem/lifecycle.py).

Only the main thread takes them: uvloop sees a signal only while its loop runs, through a
wakeup fd, so lifecycle.py keeps them blocked in the main thread outside the loop's run, and
every other thread vhostmem starts blocks them for good (:func:`block_in_this_thread`, a
thread pool's initializer). Otherwise the kernel could hand one to an I/O thread at a moment
the loop is not running, and it would be lost.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PROCESS_SIGNALS = frozenset({*STOP_SIGNALS, signal.SIGHUP})


def block_in_this_thread() -> None:
    """Leave the process signals to the main thread (an I/O thread's initializer)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
