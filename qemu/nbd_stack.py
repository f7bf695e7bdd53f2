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
    args = ap.parse_args(argv)
    if args.plain:
        return _plain(args)
    qcow2 = args.image.with_suffix(".qcow2")
    nbd_sock = args.image.with_suffix(".nbd.sock")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(args.image),
                    str(qcow2)], check=True)
    nbd_argv = ["qemu-nbd", "-t", "-f", "qcow2", "-k", str(nbd_sock), "-x", "disk",
                "-e", str(args.num_queues), "--discard=unmap", str(qcow2)]
    if args.readonly:
        nbd_argv.insert(1, "-r")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    server = subprocess.Popen(nbd_argv, stdin=subprocess.DEVNULL)
    _wait_for(nbd_sock, server, "qemu-nbd")
    spec = (f"socket={args.socket},nbd=nbd+unix:///disk?socket={nbd_sock},"
            f"num-queues={args.num_queues}")
    if args.readonly:
        spec += ",readonly=on"
    log = args.image.with_suffix(".vhostmem.log")
    serve = subprocess.Popen([sys.executable, "-m", "vhostmem.cli", "serve", "--blk", spec,
                              "--log-level", "INFO", "--log-file", str(log)],
                             stdin=subprocess.DEVNULL, cwd=ROOT)
    while not stopping and serve.poll() is None and server.poll() is None:
        time.sleep(0.05)
    status = _stop(serve)
    _stop(server)
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
