"""vhostmem serving a qcow2 image over NBD, as one backend command for the QEMU harness:
``python -m qemu.nbd_stack --socket S --image RAW [--num-queues N] [--readonly]``.

It converts the harness's raw image to qcow2 (``qemu-img convert``), serves that with
``qemu-nbd`` on a Unix socket (``--shared`` as many clients as queues: with 2 or more it
offers multi-conn, and vhostmem opens a connection per queue; fewer fails the run), and runs
``vhostmem serve --blk socket=S,nbd=URI`` on it. On
SIGTERM it stops vhostmem (which flushes the export), then qemu-nbd, checks the qcow2
(``qemu-img check``) and converts it back over the raw image: the harness's ``host.image`` check
then compares what the guest wrote through vhostmem, NBD and the qcow2 layer with its model.
With ``--keep PATH`` the final qcow2 is also copied there. ``--plain`` serves the raw image
directly (``disk=``) instead, and ``--keep`` copies the raw image: the same guest run on both
gives two images ``qemu-img compare`` must find identical.

Server outages (``qemu.reconnect``'s ``fault=NBD_SERVER``): SIGUSR1 kills qemu-nbd with
SIGKILL and keeps it down, SIGUSR2 starts it again on the same socket and image; vhostmem
reconnects and sends its requests again. ``--nbd-timeout`` is vhostmem's ``nbd-timeout``.
``--preallocate`` converts with ``preallocation=metadata``: a guest write then allocates
nothing, so a SIGKILLed qemu-nbd takes no metadata with it (qcow2 cluster allocations live in
qemu-nbd's L2 cache until a flush, and an unflushed allocation dies with the process; the
guest, which did not flush, had no claim on it, but the outage test checks every acknowledged
write).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOCKET_WAIT = 10.0
POLL = 0.02
STOP_WAIT = 10.0
KILL_SERVER, START_SERVER = signal.SIGUSR1, signal.SIGUSR2


class _Server:
    """qemu-nbd: started, SIGKILLed and started again on demand (the signals above)."""

    def __init__(self, argv: list[str], sock: Path) -> None:
        self.argv, self.sock = argv, sock
        self.down = False  # killed on purpose: not an exit that ends the stack
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        self.sock.unlink(missing_ok=True)  # so that the wait below sees the new socket
        proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL)
        _wait_for(self.sock, proc, "qemu-nbd")
        return proc

    def handle(self, sig: int) -> None:
        if sig == KILL_SERVER and not self.down:
            self.proc.kill()
            self.proc.wait()
            self.down = True
            print("nbd_stack: qemu-nbd killed (SIGKILL)", flush=True)
        elif sig == START_SERVER and self.down:
            self.proc = self._start()
            self.down = False
            print("nbd_stack: qemu-nbd started again", flush=True)

    def running(self) -> bool:
        return self.down or self.proc.poll() is None


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + SOCKET_WAIT
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"nbd_stack: {what} did not open {path}")
        time.sleep(POLL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qemu.nbd_stack")
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument("--image", required=True, type=Path)
    ap.add_argument("--num-queues", type=int, default=1)
    ap.add_argument("--readonly", action="store_true")
    ap.add_argument("--keep", type=Path)
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--nbd-timeout", type=float)
    ap.add_argument("--preallocate", action="store_true")
    args = ap.parse_args(argv)
    if args.plain:
        return _plain(args)
    qcow2 = args.image.with_suffix(".qcow2")
    nbd_sock = args.image.with_suffix(".nbd.sock")
    prealloc = ["-o", "preallocation=metadata"] if args.preallocate else []
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *prealloc,
                    str(args.image), str(qcow2)], check=True)
    nbd_argv = ["qemu-nbd", "-t", "-f", "qcow2", "-k", str(nbd_sock), "-x", "disk",
                "-e", str(args.num_queues), "--discard=unmap", str(qcow2)]
    if args.readonly:
        nbd_argv.insert(1, "-r")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    # Handled in the loop below, not in the handler: it starts and waits for processes.
    outages: list[int] = []
    for sig in (KILL_SERVER, START_SERVER):
        signal.signal(sig, lambda signum, _: outages.append(signum))
    server = _Server(nbd_argv, nbd_sock)
    spec = (f"socket={args.socket},nbd=nbd+unix:///disk?socket={nbd_sock},"
            f"num-queues={args.num_queues}")
    if args.readonly:
        spec += ",readonly=on"
    if args.nbd_timeout is not None:
        spec += f",nbd-timeout={args.nbd_timeout}"
    log = args.image.with_suffix(".vhostmem.log")
    serve = subprocess.Popen([sys.executable, "-m", "vhostmem.cli", "serve", "--blk", spec,
                              "--log-level", "INFO", "--log-file", str(log)],
                             stdin=subprocess.DEVNULL, cwd=ROOT)
    while not stopping and serve.poll() is None and server.running():
        while outages:
            server.handle(outages.pop(0))
        time.sleep(0.05)
    status = _stop(serve)
    _stop(server.proc)
    text = log.read_text()
    print(text, end="", flush=True)  # into the harness's backend log, as without --log-file
    opened = 1 + sum(f"(connection {i + 1}): connected" in text
                     for i in range(1, args.num_queues))
    print(f"nbd_stack: vhostmem used {opened} NBD connection(s) for {args.num_queues} "
          "queue(s)", flush=True)
    if opened < args.num_queues:
        print(f"nbd_stack: expected {args.num_queues} (qemu-nbd offers multi-conn)",
              flush=True)
        status = status or 1
    check = subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", str(qcow2)])
    if check.returncode:
        print(f"nbd_stack: qemu-img check {qcow2} failed ({check.returncode})", flush=True)
        status = status or 1
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2),
                    str(args.image)], check=True)
    if args.keep is not None:
        shutil.copyfile(qcow2, args.keep)
    print(f"nbd_stack: vhostmem exited {status}; qcow2 converted back to {args.image}",
          flush=True)
    return status


def _plain(args: argparse.Namespace) -> int:
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    spec = f"socket={args.socket},disk={args.image},num-queues={args.num_queues}"
    if args.readonly:
        spec += ",readonly=on"
    serve = subprocess.Popen([sys.executable, "-m", "vhostmem.cli", "serve", "--blk", spec],
                             stdin=subprocess.DEVNULL, cwd=ROOT)
    while not stopping and serve.poll() is None:
        time.sleep(0.05)
    status = _stop(serve)
    if args.keep is not None:
        shutil.copyfile(args.image, args.keep)
    return status


if __name__ == "__main__":
    sys.exit(main())
