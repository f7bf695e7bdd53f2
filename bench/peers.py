"""Backend processes for the benchmarks: vhostmem and qemu-storage-daemon on one image.

Each benchmark run starts a fresh backend process, waits for its socket, and reads its CPU time
(utime + stime of all its threads) from /proc/PID/stat.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from qemu.procs import child_pids

ROOT = Path(__file__).resolve().parent.parent
QSD = "qemu-storage-daemon"
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
POLL = 0.01
CLK_TCK = os.sysconf("SC_CLK_TCK")
# /proc/PID/stat fields after the ")" that ends comm: utime is field 14, stime 15 (1-based).
UTIME_AFTER_COMM = 11
BACKENDS = ("vhostmem", "qsd")
# The same two over NBD: one qemu-nbd serves the image on a Unix socket, vhostmem (nbd=URI) or
# qemu-storage-daemon (an nbd blockdev) serves it as vhost-user-blk. The CPU measured is the
# backend's; qemu-nbd's is the same work for both.
NBD_BACKENDS = ("vhostmem-nbd", "qsd-nbd")
# vhostmem over NBD with one connection for all queues (nbd-conns=1), against vhostmem-nbd's
# one per queue (qemu-nbd offers multi-conn when started for 2 queues or more).
NBD_CONNS = ("vhostmem-nbd", "vhostmem-nbd-1conn")
ALL_NBD = (*NBD_BACKENDS, NBD_CONNS[1])
NBD_EXPORT = "disk"
WORKERS_PREFIX = "vhostmem-w"
POLL_PREFIX = "vhostmem-poll"  # vhostmem-pollN: --poll-us N
NBD_POLL_PREFIX = "vhostmem-nbd-poll"  # vhostmem-nbd-pollN: vhostmem-nbd with --poll-us N


class PeerStartError(RuntimeError):
    """A backend did not come up."""


def backend_argv(name: str, socket: str, image: str, num_queues: int,
                 nbd_socket: str = "") -> list[str]:
    if name.startswith(NBD_POLL_PREFIX) and name[len(NBD_POLL_PREFIX):].isdigit():
        return [*backend_argv(NBD_CONNS[0], socket, image, num_queues, nbd_socket),
                "--poll-us", name[len(NBD_POLL_PREFIX):]]
    if name in NBD_CONNS:
        conns = ",nbd-conns=1" if name == NBD_CONNS[1] else ""
        return [sys.executable, "-m", "vhostmem.cli", "serve", "--blk",
                f"socket={socket},nbd=nbd+unix:///{NBD_EXPORT}?socket={nbd_socket},"
                f"num-queues={num_queues}{conns}", "--log-level", "WARNING"]
    if name == "qsd-nbd":
        return [QSD,
                "--blockdev", f"driver=nbd,node-name=d,server.type=unix,"
                f"server.path={nbd_socket},export={NBD_EXPORT}",
                "--export", "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,"
                f"addr.path={socket},writable=on,num-queues={num_queues}"]
    if name == "vhostmem":
        return [sys.executable, "-m", "vhostmem.cli", "serve", "--socket", socket,
                "--disk", image, "--num-queues", str(num_queues), "--log-level", "WARNING"]
    if name.startswith(WORKERS_PREFIX) and name[len(WORKERS_PREFIX):].isdigit():
        # vhostmem-wN: rings served by N data-plane worker processes (--workers N).
        return [*backend_argv("vhostmem", socket, image, num_queues),
                "--workers", name[len(WORKERS_PREFIX):]]
    if name.startswith(POLL_PREFIX) and name[len(POLL_PREFIX):].isdigit():
        # vhostmem-pollN: rings busy-polled for N us after a turn that served requests.
        return [*backend_argv("vhostmem", socket, image, num_queues),
                "--poll-us", name[len(POLL_PREFIX):]]
    if name == "qsd-iothread":
        # qsd's export in an IOThread, which polls adaptively (poll-max-ns, 32768 by default).
        argv = backend_argv("qsd", socket, image, num_queues)
        return [argv[0], "--object", "iothread,id=io0", *argv[1:-1], argv[-1] + ",iothread=io0"]
    if name == "qsd":
        return [QSD,
                "--blockdev", f"driver=file,node-name=f,filename={image},cache.direct=off",
                "--blockdev", "driver=raw,node-name=d,file=f",
                "--export", "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,"
                f"addr.path={socket},writable=on,num-queues={num_queues}"]
    raise ValueError(f"unknown backend {name!r} (choose from {BACKENDS + ALL_NBD})")


def is_nbd(name: str) -> bool:
    """Whether backend ``name`` serves the image through qemu-nbd."""
    return name in ALL_NBD or name.startswith(NBD_POLL_PREFIX)


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` and of its live child processes (vhostmem's
    data-plane workers), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = (int(fields[UTIME_AFTER_COMM]) + int(fields[UTIME_AFTER_COMM + 1])) / CLK_TCK
    return own + sum(cpu_seconds(child) for child in child_pids(pid))


def runqueue_wait_seconds(pid: int) -> float:
    """Seconds the threads of ``pid`` and of its live child processes spent runnable but
    waiting for a CPU (/proc/PID/task/TID/schedstat, second field): on a machine other jobs
    keep busy, what a backend lost to them."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError), \
                    open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
    return total / 1e9 + sum(runqueue_wait_seconds(child) for child in child_pids(pid))


@contextlib.contextmanager
def running(name: str, image: str, num_queues: int) -> Iterator[tuple[subprocess.Popen[bytes],
                                                                       str]]:
    """Start backend ``name`` on ``image``; yields (process, socket path); always stops it."""
    with tempfile.TemporaryDirectory(prefix="vhostmem-bench-") as tmp:
        sock = os.path.join(tmp, "blk.sock")
        log_path = os.path.join(tmp, "backend.log")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        nbd_sock = os.path.join(tmp, "nbd.sock")
        server = None
        if is_nbd(name):
            # -e: as many clients as queues; with 2 or more qemu-nbd offers multi-conn and
            # vhostmem opens one connection per queue (qsd's nbd driver opens one).
            server = subprocess.Popen(
                ["qemu-nbd", "-t", "-f", "raw", "-x", NBD_EXPORT, "-k", nbd_sock,
                 "-e", str(num_queues), "--cache=writeback", image], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if server is not None:
                _wait_socket(server, nbd_sock, os.devnull, "qemu-nbd")
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(backend_argv(name, sock, image, num_queues, nbd_sock),
                                        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                        env=env)
            try:
                _wait_socket(proc, sock, log_path, name)
                yield proc, sock
            finally:
                _stop(proc)
        finally:
            if server is not None:
                _stop(server)


def _wait_socket(proc: subprocess.Popen[bytes], sock: str, log_path: str, name: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise PeerStartError(f"{name} did not open {sock}: {Path(log_path).read_text()}")
        time.sleep(POLL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
