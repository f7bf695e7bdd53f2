"""Real NBD servers (qemu-nbd, nbdkit) and `vhostmem serve` on them, started by the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 10.0
POLL = 0.02
GUEST_RAM = 64 << 20
# Tests that wait out vhostmem's NBD handshake or close timeout (5 s) on purpose shorten it
# for the `vhostmem serve` they start (vhostmem/devices/nbd_conn.py, seconds_from_env): still
# twice the 1 s stall bound those tests hold the other devices to.
SHORT_TIMEOUT = 2.0
CONNECT_TIMEOUT_ENV = "VHOSTMEM_NBD_CONNECT_TIMEOUT"
CLOSE_TIMEOUT_ENV = "VHOSTMEM_NBD_CLOSE_TIMEOUT"

needs_qemu_nbd = pytest.mark.skipif(shutil.which("qemu-nbd") is None,
                                    reason="qemu-nbd not installed (make system-deps)")
needs_nbdkit = pytest.mark.skipif(shutil.which("nbdkit") is None,
                                  reason="nbdkit not installed (make system-deps)")


def wait_for_path(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{what} did not create {path} (exit {proc.returncode})")
        time.sleep(POLL)


def stop(proc: subprocess.Popen[bytes], sig_kill: bool = False) -> None:
    if proc.poll() is None:
        if sig_kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def start_qemu_nbd(image: Path, sock: Path, fmt: str = "qcow2", export: str = "disk",
                   readonly: bool = False, shared: int = 1) -> subprocess.Popen[bytes]:
    """qemu-nbd serving ``image`` on a Unix socket; -t: it outlives its clients. ``shared``
    clients at once (-e): qemu-nbd 7.2 offers NBD_FLAG_CAN_MULTI_CONN when more than 1."""
    argv = ["qemu-nbd", "-t", "-f", fmt, "-k", str(sock), "-x", export, "-e", str(shared),
            "--cache=writeback", "--discard=unmap", str(image)]
    if readonly:
        argv.insert(1, "-r")
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_path(sock, proc, "qemu-nbd")
    return proc


def start_nbdkit(sock: Path, *plugin: str, export: str = "",
                 filters: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """nbdkit in the foreground on a Unix socket (e.g. ``memory 16M``, ``file FILE``)."""
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    argv = ["nbdkit", "-f", "-U", str(sock)]
    if export:
        argv += ["-e", export]
    for f in filters:
        argv.append(f"--filter={f}")
    proc = subprocess.Popen([*argv, *plugin], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_path(sock, proc, "nbdkit")
    return proc


def unix_uri(sock: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def start_vhostmem(*blk_specs: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "vhostmem.cli", "serve", "--log-level", "INFO"]
    for spec in blk_specs:
        argv += ["--blk", spec]
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})


@contextlib.contextmanager
def vhostmem_on(*blk_specs: str, log: Path, sockets: tuple[Path, ...]
                ) -> Iterator[subprocess.Popen[bytes]]:
    """`vhostmem serve` with these specs until the block ends (SIGTERM: it flushes the
    NBD export and disconnects)."""
    proc = start_vhostmem(*blk_specs, log=log)
    try:
        for sock in sockets:
            wait_for_path(sock, proc, f"vhostmem serve ({log.read_text()})")
        yield proc
    finally:
        stop(proc)
