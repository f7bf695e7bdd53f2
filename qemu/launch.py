"""Boots the test guest under QEMU beside a vhost-user-blk backend and judges the result.

Library use::

    from qemu.backends import qsd_backend
    from qemu.launch import GuestConfig, run_guest
    result = run_guest(qsd_backend(), GuestConfig(num_queues=2, smp=2))
    assert result.passed, result.report()

Command line::

    python -m qemu.launch --backend qsd --num-queues 2 --smp 2     # one checked boot
    python -m qemu.launch --interactive --socket ./vhostmem.sock   # a shell on a running backend

Acceleration: ``accel="auto"`` (the default) is KVM only where a probe boot of the test guest
under KVM succeeds, else TCG (see qemu/accel.py); the report says which one ran and why.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from qemu import assets as guest_assets
from qemu.accel import ACCELS, resolve_accel
from qemu.backends import BACKEND_FACTORIES, FILE, RAM, STORAGES, Backend, BackendRequest
from qemu.guestlog import Check, GuestLog
from qemu.hostchecks import (
    host_checks,
    is_ram_backed,
    make_image,
    mount_of,
    own_ram_check,
    storage_check,
)
from qemu.hotplug import HotplugDriver
from qemu.pattern import DiskLayout
from qemu.vhost_tap import TapMessage, VhostUserTap, ring_restart_check

MIB = 1 << 20
QEMU = "qemu-system-x86_64"
SOCKET_WAIT = 10.0
TERMINATE_WAIT = 3.0
HOTPLUG_SLOTS, HOTPLUG_MAXMEM = 2, "2G"
HOTPLUG_ROUNDS = 3  # before the plug, with the DIMM, after the unplug
DEFAULT_SOCKET = Path("vhostmem.sock")
LOG_TAIL_LINES = 40
RAM_DIR = Path("/dev/shm")  # where a RAM-backed image lives when the backend needs a file
DISK_DIR_FALLBACK = Path("/var/tmp")  # for file-backed images when the temp dir is a tmpfs



@dataclass(frozen=True)
class GuestConfig:
    """One boot: the VM's shape and what the guest program does."""

    disk_size: int = 16 * MIB
    num_queues: int = 1
    smp: int = 1
    readonly: bool = False
    hotplug: bool = False
    rounds: int = 1
    seed: int = 1
    memory_mib: int = 512
    timeout: float = 90.0
    # "auto": KVM where a probe boot under KVM succeeds, else TCG (qemu/accel.py); or "kvm"/"tcg".
    accel: str = "auto"
    # FILE: an image file on a disk file system; RAM: the backend's own RAM disk if it has one
    # (Backend.ram_disk), else an image on /dev/shm.
    storage: str = FILE
    # The CPUs the guest pins its queue-coverage readers to (None: every vCPU), see queues-used.
    queue_io_cpus: tuple[int, ...] | None = None
    # Put a vhost-user tap (qemu/vhost_tap.py) between QEMU and the backend and check that ring 0
    # was started, stopped and started again on one connection (host.vhost-user-ring-restart).
    trace_vhost_user: bool = False
    # > 0: instead of the checks, the guest runs `vmtest --bench` (O_DIRECT 4 KiB random reads)
    # for this many seconds in ``bench_jobs`` processes and reports VHOSTMEM-INFO bench lines.
    bench_seconds: int = 0
    bench_jobs: int = 1
    # vhost-user-blk-pci packed=on: the guest negotiates packed virtqueues (virtio 1.2 2.8).
    packed: bool = False

    @property
    def round_count(self) -> int:
        return HOTPLUG_ROUNDS if self.hotplug else self.rounds

    def round_seed(self, round_number: int) -> int:
        """Each read-write round writes a fresh pattern (seed + 1 is the last-sector stream)."""
        return self.seed if self.readonly else self.seed + 2 * (round_number - 1)


@dataclass
class GuestResult:
    """The outcome of one boot: guest and host checks, logs, and timings."""

    backend: str
    config: GuestConfig
    checks: list[Check] = field(default_factory=list)
    verdict: str | None = None
    error: str | None = None
    serial_log: str = ""
    backend_log: str = ""
    seconds: float = 0.0
    first_result_seconds: float | None = None
    accel: str = ""  # what QEMU ran with: "kvm" or "tcg"
    accel_reason: str = ""
    # Host checks that cannot apply to this boot, with the reason (reported as N/A, not PASS).
    not_applicable: list[tuple[str, str]] = field(default_factory=list)
    vhost_user: list[TapMessage] = field(default_factory=list)  # with trace_vhost_user
    backend_argv: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def passed(self) -> bool:
        return self.error is None and self.verdict == "PASS" and not self.failures and bool(
            self.checks
        )

    def report(self, with_logs: bool = True) -> str:
        head = f"{'PASS' if self.passed else 'FAIL'} backend={self.backend} {self.config}"
        lines = [head, f"guest verdict: {self.verdict}; {self.seconds:.1f} s",
                 f"accel: {self.accel or '-'} ({self.accel_reason or 'QEMU not started'})"]
        if self.backend_argv:
            lines.append(f"backend command: {' '.join(self.backend_argv)}")
        if self.error:
            lines.append(f"error: {self.error}")
        lines += [str(c) for c in self.checks]
        lines += [f"N/A {name} {reason}" for name, reason in self.not_applicable]
        if with_logs and not self.passed:
            lines += ["--- serial (tail) ---", *_tail(self.serial_log)]
            lines += ["--- backend (tail) ---", *_tail(self.backend_log)]
        return "\n".join(lines)


def _tail(text: str) -> list[str]:
    return text.splitlines()[-LOG_TAIL_LINES:]


def kernel_cmdline(config: GuestConfig, layout: DiskLayout, backend: Backend) -> str:
    settings = {
        "size": layout.size,
        "lbs": layout.block_size,
        "queues": min(config.num_queues, config.smp),
        "ro": int(config.readonly),
        "seed": config.seed,
        "rounds": config.rounds,
        "discard": layout.discard.arg(),
        "discard_zeroes": int(backend.discard_zeroes),
        "zeroout": layout.zeroout.arg(),
        "hotplug": int(config.hotplug),
    }
    if config.packed:
        settings["packed"] = 1
    if config.queue_io_cpus is not None:
        settings["queue_cpus"] = ",".join(str(c) for c in config.queue_io_cpus)
    if config.bench_seconds:
        settings.update(mode="bench", bench_seconds=config.bench_seconds,
                        bench_jobs=config.bench_jobs)
    words = ["console=ttyS0", "quiet", "panic=-1"]
    if config.hotplug:
        # Movable zone: the DIMM's pages can be migrated away, so the unplug can succeed.
        words.append("memhp_default_state=online_movable")
    return " ".join(words + [f"vmtest.{k}={v}" for k, v in settings.items()])


def qemu_command(
    assets: guest_assets.GuestAssets,
    config: GuestConfig,
    socket: Path,
    append: str,
    *,
    qmp_socket: Path | None = None,
    interactive: bool = False,
    reconnect: int = 0,
) -> list[str]:
    """The QEMU command line: shared memfd RAM (vhost-user needs it) and a vhost-user-blk disk.
    ``reconnect`` > 0: QEMU redials a backend that went away every that many seconds.
    ``config.accel`` "auto" becomes the probe's verdict (cached, see qemu/accel.py)."""
    accel, _ = resolve_accel(config.accel, assets)
    chardev = f"socket,id=blk0,path={socket}" + (f",reconnect={reconnect}" if reconnect else "")
    memory = f"{config.memory_mib}M"
    if config.hotplug:
        memory += f",slots={HOTPLUG_SLOTS},maxmem={HOTPLUG_MAXMEM}"
    argv = [
        QEMU, "-accel", accel, "-machine", "q35,memory-backend=mem",
        "-smp", str(config.smp), "-m", memory,
        "-object", f"memory-backend-memfd,id=mem,size={config.memory_mib}M,share=on",
        "-chardev", chardev,
        "-device", f"vhost-user-blk-pci,chardev=blk0,num-queues={config.num_queues}"
        + (",packed=on" if config.packed else ""),
        "-kernel", str(assets.kernel), "-initrd", str(assets.initrd), "-append", append,
        "-nographic", "-no-reboot", "-nodefaults",
        # mon:stdio lets an interactive user leave with Ctrl-A X.
        "-serial", "mon:stdio" if interactive else "stdio",
    ]
    if qmp_socket is not None:
        argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    return argv


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(TERMINATE_WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _pump_lines(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    for raw in stream:
        lines.put(raw.decode(errors="replace").rstrip("\r\n"))
    lines.put(None)


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            return f"backend exited with status {proc.returncode} before creating {path}"
        if time.monotonic() > deadline:
            return f"backend did not create {path} within {timeout:.0f} s"
        time.sleep(0.02)
    return None


class _Session:
    """Runs the processes of one boot; ``close`` ends them whatever happened."""

    def __init__(self, backend: Backend, config: GuestConfig, workdir: Path) -> None:
        self.backend, self.config, self.workdir = backend, config, workdir
        self.layout = DiskLayout.for_size(config.disk_size, backend.block_size)
        # With a tap, QEMU dials the tap at blk.sock and the tap dials the backend.
        self.socket = workdir / "blk.sock"
        self.backend_socket = workdir / ("backend.sock" if config.trace_vhost_user
                                         else "blk.sock")
        self.qmp_socket, self.backend_log = workdir / "qmp.sock", workdir / "backend.log"
        self.image: Path | None = None
        self.image_dir: Path | None = None  # a directory of our own outside workdir, if any
        self.backend_proc: subprocess.Popen[bytes] | None = None
        self.qemu_proc: subprocess.Popen[bytes] | None = None
        self.hotplug: HotplugDriver | None = None
        self.tap: VhostUserTap | None = None
        self.log = GuestLog()
        self.host_checks: list[Check] = []
        self.backend_argv: list[str] = []

    def _place_image(self) -> str | None:
        """Creates the image where the storage choice says; None or an error."""
        config = self.config
        if config.storage == RAM and self.backend.ram_disk:
            if config.readonly:
                return (f"{self.backend.name}'s own RAM disk starts zero-filled: it cannot hold "
                        "the pattern a read-only boot checks (use storage='file')")
            return None  # no image: the backend allocates the disk itself
        if config.storage == RAM:
            if not is_ram_backed(RAM_DIR):
                return f"{RAM_DIR} is not a RAM file system ({mount_of(RAM_DIR)[1]})"
            self.image_dir = Path(tempfile.mkdtemp(prefix="vhostmem-vm-", dir=RAM_DIR))
            self.image = self.image_dir / "disk.img"
        elif is_ram_backed(self.workdir):
            self.image_dir = Path(tempfile.mkdtemp(prefix="vhostmem-vm-", dir=DISK_DIR_FALLBACK))
            self.image = self.image_dir / "disk.img"
        else:
            self.image = self.workdir / "disk.img"
        make_image(self.image, config, self.layout)
        self.host_checks.append(storage_check(self.image, config.storage))
        return None

    def start_backend(self) -> str | None:
        if self.config.storage not in STORAGES:
            return f"storage {self.config.storage!r}: expected one of {STORAGES}"
        error = self._place_image()
        if error is not None:
            return error
        request = BackendRequest(self.backend_socket, self.image, self.config.readonly,
                                 self.config.num_queues, size=self.layout.size,
                                 storage=self.config.storage)
        self.backend_argv = self.backend.argv(request)
        with self.backend_log.open("wb") as out:
            self.backend_proc = subprocess.Popen(
                self.backend_argv, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        error = _wait_for_socket(self.backend_socket, self.backend_proc, SOCKET_WAIT)
        if error is None and self.image is None:
            self.host_checks.append(own_ram_check(self.backend_proc.pid, self.layout.size))
        if error is None and self.config.trace_vhost_user:
            self.tap = VhostUserTap(self.socket, self.backend_socket)
        return error

    def start_qemu(self, assets: guest_assets.GuestAssets) -> None:
        append = kernel_cmdline(self.config, self.layout, self.backend)
        argv = qemu_command(assets, self.config, self.socket, append, qmp_socket=self.qmp_socket)
        self.qemu_proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT)
        assert self.backend_proc is not None
        self.hotplug = HotplugDriver(self.qmp_socket, self.backend, self.backend_proc.pid,
                                     self.backend_log)

    def run(self, result: GuestResult, started: float) -> None:
        """Feeds serial lines to the log until QEMU exits; answers the guest's sync points."""
        assert self.qemu_proc is not None and self.qemu_proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump_lines, args=(self.qemu_proc.stdout, lines),
                         daemon=True).start()
        deadline = started + self.config.timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                result.error = f"timeout: the guest did not finish within {self.config.timeout} s"
                return
            if line is None:
                break
            tag = self.log.feed(line)
            if result.first_result_seconds is None and self.log.checks:
                result.first_result_seconds = time.monotonic() - started
            if tag is not None:
                self._answer(tag, result)
        status = self.qemu_proc.wait()
        if status != 0:
            result.error = f"QEMU exited with status {status}"

    def _answer(self, tag: str, result: GuestResult) -> None:
        assert self.hotplug is not None and self.qemu_proc is not None
        result.checks += self.hotplug.handle(tag)
        if self.qemu_proc.stdin is not None:
            self.qemu_proc.stdin.write(f"{tag}\n".encode())
            self.qemu_proc.stdin.flush()

    def close(self) -> None:
        if self.hotplug is not None:
            self.hotplug.close()
        _stop(self.qemu_proc)
        if self.tap is not None:
            self.tap.close()
        _stop(self.backend_proc)
        for proc in (self.qemu_proc,):
            if proc is not None and proc.stdin is not None:
                proc.stdin.close()
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()

    def remove_image(self) -> None:
        """Removes an image kept outside workdir (workdir goes with its TemporaryDirectory)."""
        if self.image_dir is not None:
            shutil.rmtree(self.image_dir, ignore_errors=True)


def run_guest(
    backend: Backend,
    config: GuestConfig | None = None,
    *,
    assets: guest_assets.GuestAssets | None = None,
) -> GuestResult:
    """Boots one guest beside ``backend`` and returns every guest and host check."""
    config = config or GuestConfig()
    assets = assets or guest_assets.prepare()
    result = GuestResult(backend=backend.name, config=config)
    # Resolved before the clock starts: a first-ever probe is not the boot's time.
    result.accel, result.accel_reason = resolve_accel(config.accel, assets)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vhostmem-vm-") as tmp:
        session = _Session(backend, config, Path(tmp))
        try:
            try:
                result.error = session.start_backend()
                if result.error is None:
                    session.start_qemu(assets)
                    session.run(result, started)
            finally:
                session.close()
                result.seconds = time.monotonic() - started
                result.serial_log = session.log.text
                if session.backend_log.exists():
                    result.backend_log = session.backend_log.read_text(errors="replace")
            result.checks = session.log.checks + session.host_checks + result.checks
            result.backend_argv = session.backend_argv
            result.verdict = session.log.verdict
            if session.tap is not None:
                result.vhost_user = session.tap.snapshot()
                result.checks.append(ring_restart_check(result.vhost_user))
                result.checks += [Check("host.vhost-user-tap", False, e)
                                  for e in session.tap.errors]
            if result.error is None and not config.bench_seconds:  # a bench writes no pattern
                result.checks += host_checks(session.log, result.checks, config,
                                              session.layout, backend, session.image,
                                              result.not_applicable)
        finally:
            session.remove_image()
    return result


def interactive(socket: Path, config: GuestConfig) -> int:
    """Boots a guest with a shell on an already running backend; returns QEMU's status."""
    if not socket.exists():
        print(f"no backend socket at {socket}: start one first (make run)", file=sys.stderr)
        return 1
    assets = guest_assets.prepare()
    append = "console=ttyS0 quiet panic=-1 vmtest.mode=shell"
    argv = qemu_command(assets, config, socket.resolve(), append, interactive=True)
    print("booting; leave with Ctrl-A X or by exiting the guest shell", file=sys.stderr)
    return subprocess.call(argv)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qemu.launch", description=__doc__.split("\n")[0])
    p.add_argument("--interactive", action="store_true",
                   help="boot a shell guest on the backend at --socket instead of the checks")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                   help="backend socket for --interactive (default: ./vhostmem.sock)")
    p.add_argument("--backend", choices=sorted(BACKEND_FACTORIES), default="qsd",
                   help="backend to start for a checked boot (default: qsd)")
    p.add_argument("--num-queues", type=int, default=1)
    p.add_argument("--smp", type=int, default=1)
    p.add_argument("--memory", type=int, default=512, help="guest RAM in MiB")
    p.add_argument("--disk-size", type=int, default=16, help="test disk size in MiB")
    p.add_argument("--readonly", action="store_true")
    p.add_argument("--hotplug", action="store_true", help="plug and unplug a DIMM mid-test")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=90.0)
    p.add_argument("--storage", choices=STORAGES, default=FILE,
                   help="file: image file; ram: the backend's own RAM disk or an image on "
                        "/dev/shm (default: file)")
    p.add_argument("--accel", choices=ACCELS, default="auto",
                   help="auto: KVM where a probe boot works, else TCG (default)")
    p.add_argument("--trace-vhost-user", action="store_true",
                   help="relay vhost-user through a tap and check ring 0 restarted")
    p.add_argument("--verbose", action="store_true", help="print the serial log too")
    return p.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    del frame
    raise SystemExit(128 + signum)  # unwinds through run_guest's cleanup


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = _parse_args(argv)
    config = GuestConfig(
        disk_size=args.disk_size * MIB, num_queues=args.num_queues, smp=args.smp,
        readonly=args.readonly, hotplug=args.hotplug, rounds=args.rounds, seed=args.seed,
        memory_mib=args.memory, timeout=args.timeout, storage=args.storage, accel=args.accel,
        trace_vhost_user=args.trace_vhost_user)
    if args.interactive:
        return interactive(args.socket, config)
    result = run_guest(BACKEND_FACTORIES[args.backend](), config)
    if args.verbose:
        print(result.serial_log)
    print(result.report())
    return 0 if result.passed else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
