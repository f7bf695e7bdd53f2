"""A serving process's life after its devices are set up: signals, shutdown, the log file.

* SIGTERM / SIGINT: stop accepting frontends, stop popping requests, wait for the requests
  already on I/O threads to complete into their used rings, close the connections, make every
  image durable (fdatasync) and close it, remove the socket files this process created (never
  inherited ones), exit 0. vhost-user.rst ("Backend program conventions") asks a backend to end
  "as quickly and cleanly as possible" on SIGTERM; this is the clean part.
* A second SIGTERM / SIGINT while that runs: exit at once with status 128 + the signal number
  (143, 130), as a shell reports a death by that signal; nothing more is flushed or closed.
* SIGHUP: reopen ``--log-file`` (logrotate renames the file, then signals; the next line goes
  to a new file at the same path). Without a log file it is logged and ignored, never fatal.
* systemd: READY=1 once every endpoint listens (or connects), STOPPING=1 at the first stop
  signal, STATUS= lines on the way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

from vhostmem.launch import Notifier
from vhostmem.server import DRAIN_TIMEOUT_SECONDS, Server
from vhostmem.signals import PROCESS_SIGNALS, STOP_SIGNALS

log = logging.getLogger("vhostmem")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DRAIN_POLL_SECONDS = 0.002


class ReopenableFileHandler(logging.FileHandler):
    """A FileHandler whose file can be reopened at its path (after logrotate moved it)."""

    def reopen(self) -> None:
        self.acquire()
        try:
            old = self.stream
            self.stream = self._open()  # open first: if it fails, the old file keeps logging
            if old is not None:
                old.close()
        finally:
            self.release()


def configure_logging(level: int, log_file: str | None) -> ReopenableFileHandler | None:
    """Log to ``log_file`` (appending, reopened on SIGHUP) or to stderr; returns the file
    handler. OSError (naming the file) if it cannot be opened."""
    handler: logging.Handler
    file_handler = None
    if log_file is not None:
        try:
            file_handler = handler = ReopenableFileHandler(log_file, delay=False)
        except OSError as exc:
            raise OSError(exc.errno, f"--log-file {log_file}: {exc.strerror}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return file_handler


def _exit_now(signum: int) -> None:
    """The second stop signal: no draining, no flushing (the operator asked twice)."""
    name = signal.Signals(signum).name
    try:
        log.warning("%s again: exiting at once (status %d)", name, 128 + signum)
        for handler in logging.getLogger().handlers:
            handler.flush()
    finally:
        os._exit(128 + signum)


class Lifecycle:
    """Runs the loop until a stop signal, then drains; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, server: Server, notifier: Notifier,
                 log_handler: ReopenableFileHandler | None) -> None:
        self.loop = loop
        self.server = server
        self.notifier = notifier
        self.log_handler = log_handler
        self.stop_signal: int | None = None
        self._stop = asyncio.Event()
        self._saved_mask: set[signal.Signals] = set()  # this thread's mask before setup

    def install_signals(self) -> None:
        """Before the first socket exists: a launcher may signal as soon as it sees it.

        The loop's handlers only see a signal while the loop runs (uvloop reads them from a
        wakeup fd it sets up in each run; one that arrives outside a run is lost, and the
        process would serve on after a SIGTERM). So the process signals are blocked in this
        thread from here on and unblocked only while :meth:`run` runs the loop (other threads
        block them for good: vhostmem/signals.py). One that arrives during setup stays pending
        and is taken as the loop starts (a stop signal before READY drains at once);
        :meth:`closing` unblocks them again, with handlers of its own."""
        self._saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
        for signum in STOP_SIGNALS:
            self.loop.add_signal_handler(signum, self._on_stop, signum)
        self.loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain the requests in flight, in one run of the
        loop (its first callback unblocks the signals; they are blocked again, and the loop's
        handlers removed, before it returns). The caller closes the server and the devices
        afterwards, under :meth:`closing`."""
        count = len(self.server.endpoints)
        self.notifier.notify("READY=1", f"STATUS=serving {count} device(s)")
        self.loop.call_soon(signal.pthread_sigmask, signal.SIG_UNBLOCK, PROCESS_SIGNALS)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)

    async def _serve(self) -> None:
        try:
            await self._stop.wait()
            await self._drain()
        finally:
            # Blocked first: from here a signal waits for closing()'s handlers. The loop's
            # handlers are removed while it runs (uvloop ignores a removal outside a run).
            signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
            for signum in PROCESS_SIGNALS:
                self.loop.remove_signal_handler(signum)

    def closing(self) -> Callable[[], None]:
        """While the server and disks are closed outside the loop (fdatasync, joins), a stop
        signal exits at once and SIGHUP still reopens the log file: plain handlers are set,
        then the signals unblocked (one that waited is taken now). Returns the function that
        restores the previous handlers."""

        def on_stop(signum: int, frame: FrameType | None) -> None:
            del frame
            _exit_now(signum)

        def on_hup(signum: int, frame: FrameType | None) -> None:
            del signum, frame
            self._on_hup()

        previous = {signum: signal.signal(signum, on_stop) for signum in STOP_SIGNALS}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._saved_mask)

        def restore() -> None:
            for signum, old in previous.items():
                signal.signal(signum, old)

        return restore

    def _on_stop(self, signum: int) -> None:
        if self.stop_signal is not None:
            _exit_now(signum)
        self.stop_signal = signum
        name = signal.Signals(signum).name
        log.info("%s: shutting down (stop accepting, drain requests in flight, flush and "
                 "close; a second %s exits at once)", name, name)
        self.notifier.notify("STOPPING=1", f"STATUS=stopping on {name}")
        self._stop.set()

    def _on_hup(self) -> None:
        if self.log_handler is None:
            log.info("SIGHUP: no --log-file to reopen; ignored")
            return
        try:
            self.log_handler.reopen()
        except OSError as exc:  # keep logging to the old file rather than to nowhere
            log.error("SIGHUP: cannot reopen %s: %s", self.log_handler.baseFilename, exc)
            return
        log.info("SIGHUP: log file %s reopened", self.log_handler.baseFilename)

    async def _drain(self) -> None:
        """Take no new frontend or request; wait until the requests already running on I/O
        threads have completed into their rings (the guest sees them answered)."""
        self.server.stop_accepting()
        self.server.quiesce()
        started = time.monotonic()
        warned = False
        while not self.server.idle():
            if not warned and time.monotonic() - started > DRAIN_TIMEOUT_SECONDS:
                # Memory cannot be unmapped under a request still being served; a second
                # signal (or the supervisor's SIGKILL) ends the wait.
                log.error("requests still in flight after %.0f s; still waiting (a second "
                          "signal exits at once)", DRAIN_TIMEOUT_SECONDS)
                warned = True
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        log.info("no request in flight; closing")
