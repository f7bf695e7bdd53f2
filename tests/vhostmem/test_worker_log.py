"""vhostmem/worker_log.py: a worker's stderr relayed into the main process's logging."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import pytest

import vhostmem.virtqueue  # noqa: F401  (its logger exists here, as in a serving process)
from vhostmem.worker_log import LINE_MAX, WorkerLog

PID = 4242


class Watched:
    """The watch registrations a WorkerLog makes (the server's KickWatcher interface)."""

    def __init__(self) -> None:
        self.callbacks: dict[int, Callable[[], None]] = {}

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self.callbacks[fd] = callback

    watch_channel = watch

    def unwatch(self, fd: int) -> None:
        self.callbacks.pop(fd, None)

    def defer(self, callback: Callable[[], None]) -> None:
        callback()


def _relayed(caplog: pytest.LogCaptureFixture, chunks: list[bytes]) -> list[tuple[str, int, str]]:
    read_end, write_end = os.pipe()
    watched = Watched()
    relay = WorkerLog(read_end, PID, watched)
    with caplog.at_level(logging.DEBUG):
        for chunk in chunks:
            os.write(write_end, chunk)
            watched.callbacks[read_end]()
        os.close(write_end)
        watched.callbacks[read_end]()  # EOF: the rest is relayed and the pipe closed
    assert read_end not in watched.callbacks and relay.fd == -1
    with pytest.raises(OSError):
        os.fstat(read_end)
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records]


def test_records_keep_their_logger_and_level(caplog: pytest.LogCaptureFixture) -> None:
    got = _relayed(caplog, [b"ERROR vhostmem.virtqueue: virtqueue 0 broken: x\nINFO vhost",
                            b"mem.worker: done\n"])
    assert got == [("vhostmem.virtqueue", logging.ERROR, f"worker[{PID}] virtqueue 0 broken: x"),
                   ("vhostmem.worker", logging.INFO, f"worker[{PID}] done")]


def test_a_traceback_follows_its_record_and_unknown_loggers_are_not_created(
        caplog: pytest.LogCaptureFixture) -> None:
    got = _relayed(caplog, [b"Fatal Python error: at start-up\n",
                            b"ERROR vhostmem.worker: device failed\nTraceback (most recent):\n",
                            b"CRITICAL os: not one of ours\nunterminated at exit"])
    assert "os" not in logging.Logger.manager.loggerDict
    assert got == [
        ("vhostmem.worker", logging.WARNING, f"worker[{PID}] Fatal Python error: at start-up"),
        ("vhostmem.worker", logging.ERROR, f"worker[{PID}] device failed"),
        ("vhostmem.worker", logging.ERROR, f"worker[{PID}] Traceback (most recent):"),
        ("vhostmem.worker", logging.CRITICAL, f"worker[{PID}] os: not one of ours"),
        ("vhostmem.worker", logging.CRITICAL, f"worker[{PID}] unterminated at exit"),
    ]


def test_a_long_line_is_cut(caplog: pytest.LogCaptureFixture) -> None:
    got = _relayed(caplog, [b"INFO vhostmem.worker: " + b"x" * (3 * LINE_MAX), b"x" * 100 + b"\n"])
    assert len(got) == 1 and len(got[0][2]) <= LINE_MAX + len(f"worker[{PID}] ")
