"""A data-plane worker's stderr, relayed into the main process's logging.

A worker (vhostmem/worker.py) logs to its stderr, which is a pipe the main process reads from
the event loop: every line goes through the main process's handlers, so ``--log-file`` (and
its reopening on SIGHUP, for logrotate) holds the workers' records too, each tagged
``worker[PID]``. Anything else the worker prints there (a traceback of a crash, a warning of
the interpreter) is relayed the same way, at the level of the record it follows.

Reading is bounded per callback (``READ_BYTES``) and never blocks; a line longer than
``LINE_MAX`` is cut. The pipe is closed at EOF, i.e. when the worker has exited.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import time

from vhostmem.session_base import KickWatcher

READ_BYTES = 65536
# The pipe's capacity (F_SETPIPE_SZ; the default is 64 KiB): a worker that logs a burst while
# the main process is busy does not block in write().
PIPE_BYTES = 1 << 20
LINE_MAX = 8192
# Lines that are not a record of a logger this process has (tracebacks, interpreter messages).
FALLBACK_LOGGER = "vhostmem.worker"
# A line before any record (an interpreter failing at start-up) is relayed at this level.
FIRST_LEVEL = logging.WARNING
_LEVELS = logging.getLevelNamesMapping()


class WorkerLog:
    """The read end of one worker's stderr pipe; see the module docstring."""

    def __init__(self, fd: int, pid: int, watcher: KickWatcher) -> None:
        self.fd = fd
        self.pid = pid
        self.watcher = watcher
        self._partial = b""
        self._level = FIRST_LEVEL
        self._logger = logging.getLogger(FALLBACK_LOGGER)
        os.set_blocking(fd, False)
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep 64 KiB
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        watcher.watch_channel(fd, self.on_readable)

    def on_readable(self) -> None:
        """Relay what the pipe holds (at most READ_BYTES); at EOF, the rest, then close."""
        if self.fd < 0:
            return
        try:
            data = os.read(self.fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[:LINE_MAX]
        for line in lines:
            self._relay(line[:LINE_MAX].decode(errors="replace"))

    def relay_until_exit(self, timeout: float) -> None:
        """Relay until the worker closes its end (it exits) or ``timeout`` seconds passed: a
        worker that is asked to leave and logs meanwhile must not block on a full pipe."""
        deadline = time.monotonic() + timeout
        while self.fd >= 0 and (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.fd], [], [], left)
            if readable:
                self.on_readable()

    def close(self) -> None:
        """Relay whatever is left (without waiting for more) and close the pipe."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            while data := os.read(self.fd, READ_BYTES):
                self._partial += data
        for line in self._partial.split(b"\n"):
            if line:
                self._relay(line[:LINE_MAX].decode(errors="replace"))
        self._partial = b""
        self.watcher.unwatch(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1

    def _relay(self, line: str) -> None:
        level_name, _, rest = line.partition(" ")
        name, sep, message = rest.partition(": ")
        level = _LEVELS.get(level_name)
        if level is not None and sep:  # a record: its level, its logger if this process has it
            known = name in logging.Logger.manager.loggerDict
            self._level = level
            self._logger = logging.getLogger(name if known else FALLBACK_LOGGER)
            if not known:
                message = f"{name}: {message}"
        else:  # a continuation (traceback) or a foreign line: the last record's level
            message = line
        self._logger.log(self._level, "worker[%d] %s", self.pid, message)
