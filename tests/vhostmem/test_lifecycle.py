"""Signals on a real `vhostmem serve` process: SIGTERM/SIGINT drain and exit 0, a second one
exits at once, SIGHUP reopens --log-file. The drain is watched on a slow FUSE disk (reads held
in the file system, an fsync counter) with requests in flight on I/O threads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile.slowfs import SlowDisk, pattern
from tests.vhostmem.activation import REPO
from tests.vhostmem.test_cli import wait_for_socket
from vhostmem.frontend import BlkType, VhostUserBlk
from vhostmem.frontend.queue import BlkQueue, Request

SECTOR = 512
TIMEOUT = 10.0
SLOW_BYTES = 64 << 10
READ_SIZE = 4096
UNREAD = 0xEE


def start(*argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "vhostmem.cli", "serve", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_text(path: Path, text: str, timeout: float = TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}: {content}"
        time.sleep(0.02)


def completions(q: BlkQueue, want: int, timeout: float) -> list[Request]:
    done = q.poll()
    deadline = time.monotonic() + timeout
    while len(done) < want and time.monotonic() < deadline:
        time.sleep(0.005)
        done += q.poll()
    return done


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_exits_0_flushes_and_removes_the_socket(tmp_path: Path,
                                                            signum: signal.Signals) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    sock, log = tmp_path / "d.sock", tmp_path / "vhostmem.log"
    proc = start("--socket", str(sock), "--disk", str(image), "--log-file", str(log))
    try:
        wait_for_socket(sock, proc)
        with VhostUserBlk.open(str(sock), ram_size=8 << 20) as dev:
            q = dev.start_queue(0, size=16)
            q.write(3, b"t" * SECTOR)
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert not sock.exists()
    text = log.read_text()
    assert f"{signum.name}: shutting down" in text
    assert "stopped: images flushed, sockets closed" in text
    assert image.read_bytes()[3 * SECTOR : 4 * SECTOR] == b"t" * SECTOR


@pytest.fixture
def slow_disk(tmp_path: Path) -> Iterator[SlowDisk]:
    """Reads of the first 64 KiB of its image take 1.5 s each; fsyncs are counted."""
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("the slow disk needs root and /dev/fuse")
    disk = SlowDisk(tmp_path / "mnt", 1.5, SLOW_BYTES)
    try:
        yield disk
    finally:
        disk.close()


def slow_reads_in_flight(proc: subprocess.Popen[bytes], sock: Path, disk: SlowDisk,
                         n: int) -> tuple[VhostUserBlk, BlkQueue, list[Request]]:
    wait_for_socket(sock, proc)
    dev = VhostUserBlk.open(str(sock), ram_size=8 << 20, timeout=TIMEOUT)
    q = dev.start_queue(0, size=64, depth=n)
    reqs = [q.prepare(BlkType.IN, 8 * k, in_len=READ_SIZE) for k in range(n)]
    for req in reqs:
        dev.ram.fill(req.in_gpa, READ_SIZE, UNREAD)
    q.notify()
    assert disk.wait_started(n, TIMEOUT), f"{disk.started} of {n} slow reads started"
    return dev, q, reqs


def test_sigterm_drains_requests_in_flight_then_fdatasyncs(tmp_path: Path,
                                                         slow_disk: SlowDisk) -> None:
    """Two reads sit in the slow file system on I/O threads when SIGTERM comes: the process
    stays until both complete into the used ring with the image's data, then fdatasyncs the
    image and exits 0 with its socket removed."""
    sock = tmp_path / "s.sock"
    proc = start("--socket", str(sock), "--disk", slow_disk.path, "--io-mode", "thread")
    dev = None
    try:
        dev, q, reqs = slow_reads_in_flight(proc, sock, slow_disk, 2)
        fsyncs_before = slow_disk.fsyncs
        proc.terminate()
        time.sleep(0.3)
        assert proc.poll() is None, "exited with requests in flight"
        assert slow_disk.done == 0
        done = completions(q, 2, TIMEOUT)
        assert sorted(r.index for r in done) == sorted(r.index for r in reqs)
        for req in done:
            assert req.status == 0
            sector = 8 * reqs.index(req)
            assert dev.ram.read(req.in_gpa, READ_SIZE) == pattern(sector * SECTOR, READ_SIZE)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        if dev is not None:
            dev.close()
    assert proc.returncode == 0, err.decode()
    deadline = time.monotonic() + 2
    while slow_disk.fsyncs == fsyncs_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slow_disk.fsyncs > fsyncs_before, "the image was not fdatasync'ed at exit"
    assert not sock.exists()
    assert "SIGTERM: shutting down" in err.decode()


def test_a_second_signal_exits_at_once(tmp_path: Path, slow_disk: SlowDisk) -> None:
    """SIGTERM starts the drain; a second SIGTERM while the slow reads are still in the file
    system ends the process with status 128 + 15 without draining: the reads never complete
    into the used ring. (The kernel lets the process go only once the file system answered
    the reads it had already taken, so "at once" means no drain, no flush, no completions.)"""
    sock = tmp_path / "s.sock"
    proc = start("--socket", str(sock), "--disk", slow_disk.path, "--io-mode", "thread")
    dev = None
    try:
        dev, q, _ = slow_reads_in_flight(proc, sock, slow_disk, 2)
        proc.terminate()
        time.sleep(0.2)
        assert proc.poll() is None
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT)
        assert slow_disk.wait_done(2, TIMEOUT)
        time.sleep(0.1)
        # (The kernel may have copied the data into the buffers: the reads were under way.)
        assert q.poll() == [], "requests were completed after the second signal"
    finally:
        proc.kill()
        if dev is not None:
            dev.close()
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert "SIGTERM again: exiting at once (status 143)" in err.decode()
    assert "stopped: images flushed" not in err.decode()


def test_sighup_reopens_the_log_file(tmp_path: Path) -> None:
    """logrotate style: the log is renamed, SIGHUP, and the next lines go to a new file at
    the old path while the renamed one keeps what was written before."""
    sock, log = tmp_path / "d.sock", tmp_path / "vhostmem.log"
    proc = start("--socket", str(sock), "--ram-size", "4M", "--log-file", str(log))
    try:
        wait_for_socket(sock, proc)
        wait_for_text(log, "listening on")
        rotated = tmp_path / "vhostmem.log.1"
        log.rename(rotated)
        proc.send_signal(signal.SIGHUP)
        wait_for_text(log, "SIGHUP: log file")
        with VhostUserBlk.open(str(sock), ram_size=8 << 20) as dev:
            dev.start_queue(0, size=16).write(0, b"h" * SECTOR)
        wait_for_text(log, "frontend connected")
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    old, new = rotated.read_text(), log.read_text()
    assert "listening on" in old and "frontend connected" not in old
    assert "SIGTERM: shutting down" in new and "listening on" not in new


def test_sighup_without_a_log_file_does_not_stop_the_process(tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    proc = start("--socket", str(sock), "--ram-size", "4M")
    try:
        wait_for_socket(sock, proc)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        assert proc.poll() is None, "SIGHUP killed the process"
        with VhostUserBlk.open(str(sock), ram_size=8 << 20) as dev:
            q = dev.start_queue(0, size=16)
            q.write(1, b"k" * SECTOR)
            assert q.read(1, SECTOR) == b"k" * SECTOR
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "SIGHUP: no --log-file to reopen; ignored" in err.decode()


# A serving process's setup, stopped by a signal that arrives before its loop first runs
# (a launcher signalling as soon as the socket exists hits that window).
SIGNAL_BEFORE_THE_LOOP = """
import os, signal, sys
from vhostmem.launch import Notifier
from vhostmem.lifecycle import Lifecycle
from vhostmem.memmap import MemRegistry
from vhostmem.server import Server, new_event_loop

loop = new_event_loop()
lifecycle = Lifecycle(loop, Server(loop, MemRegistry()), Notifier(), None)
lifecycle.install_signals()
os.kill(os.getpid(), signal.SIG{name})  # the loop has not run yet
lifecycle.run()
print("stopped by", signal.Signals(lifecycle.stop_signal).name, flush=True)
"""


@pytest.mark.parametrize("name", ["TERM", "INT"])
def test_a_stop_signal_before_the_loop_runs_is_not_lost(name: str) -> None:
    """uvloop drops a signal that arrives while its loop is not running: the process served on
    after a SIGTERM. It is now held pending until the loop runs, and drains then."""
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_BEFORE_THE_LOOP.format(name=name)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"SIG{name} before the loop ran was lost: {err.decode()}")
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == f"stopped by SIG{name}"


# After the loop has stopped, while the devices are closed: SIGHUP still reopens the log file
# and a second stop signal still exits at once (143), both sent before closing() set handlers.
SIGNALS_AFTER_THE_LOOP = """
import os, signal, sys
from vhostmem.launch import Notifier
from vhostmem.lifecycle import Lifecycle, configure_logging
from vhostmem.memmap import MemRegistry
from vhostmem.server import Server, new_event_loop

handler = configure_logging(20, sys.argv[1])
loop = new_event_loop()
lifecycle = Lifecycle(loop, Server(loop, MemRegistry()), Notifier(), handler)
lifecycle.install_signals()
os.kill(os.getpid(), signal.SIGTERM)
lifecycle.run()
os.kill(os.getpid(), signal.SIGHUP)  # the loop has stopped: held until closing()
os.kill(os.getpid(), signal.SIGTERM)
restore = lifecycle.closing()
print("not stopped", flush=True)
"""


def test_signals_after_the_loop_stopped_are_handled_while_closing(tmp_path: Path) -> None:
    log = tmp_path / "vhostmem.log"
    proc = subprocess.run([sys.executable, "-c", SIGNALS_AFTER_THE_LOOP, str(log)], cwd=REPO,
                          capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.decode()
    assert b"not stopped" not in proc.stdout
    text = log.read_text()
    assert "SIGTERM: shutting down" in text and "SIGHUP: log file" in text
    assert "SIGTERM again: exiting at once" in text
