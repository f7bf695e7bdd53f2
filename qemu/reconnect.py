"""Backend crash test: SIGKILL the vhost-user-blk backend again and again under a writing guest.

QEMU dials the backend socket with ``reconnect=1`` (it redials a vanished backend once a
second). The guest runs ``vmtest --writer``: several processes write checksummed 4 KiB blocks
with O_DIRECT, read acknowledged blocks back, and at the end verify that every block holds
exactly its last acknowledged write. Meanwhile the host kills the backend with SIGKILL at a random
moment after the guest's I/O has resumed, waits a random 0.2-1.0 s and starts it again on the same
socket and image. With VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, QEMU hands the restarted backend
the inflight region of the dead one, which resubmits what was in flight.

Most random moments find a Python backend idle between kicks, so a share of the kills
(``inflight_kills``) is aimed: the host maps the backend's inflight memfd read-only through
/proc/PID/fd and fires as soon as it shows a request flagged in flight.

With ``fault=NBD_SERVER`` the backend stays up and its NBD server goes down instead: the
backend must be ``qemu/nbd_stack.py``, which SIGKILLs its qemu-nbd on SIGUSR1 and starts it
again on SIGUSR2; the same loop, timings and checks apply.

Library use::

    from qemu.backends import vhostmem_backend
    from qemu.reconnect import CrashConfig, run_crash_test
    result = run_crash_test(vhostmem_backend(), CrashConfig(kills=20))
    assert result.passed, result.report()

Command line: ``python -m qemu.reconnect [--backend vhostmem|qsd] [--kills 20] [--seed 1]``.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qemu import assets as guest_assets
from qemu.accel import resolve_accel
from qemu.backends import BACKEND_FACTORIES, Backend, BackendRequest, vhostmem_backend
from qemu.guestlog import Check, GuestLog
from qemu.launch import (
    SOCKET_WAIT,
    GuestConfig,
    _pump_lines,
    _stop,
    _tail,
    _wait_for_socket,
    qemu_command,
)
from qemu.procs import child_pids
from vhostmem.inflight import H_DESC_NUM, SPLIT_LAYOUT
from vhostmem.inflight_packed import PACKED_LAYOUT

MIB = 1 << 20
WRITER_STOP = "writer-stop"
PROGRESS_RE = re.compile(r"VHOSTMEM-INFO writer job=(\d+) writes=(\d+)")
# Progress lines needed from every writer job after a restart to count the guest's I/O as
# resumed (one may have been in the serial pipe already when the backend died): a request lost
# by the backend stalls its job for good, which shows at the next restart.
RESUMED_LINES = 2
# What the guest kernel prints when a request fails or a task hangs on the disk.
KERNEL_ERROR_MARKERS = ("I/O error", "blk_update_request", "blocked for more than", "Call Trace")
# Backend log lines showing the inflight region at work (vhostmem's wording).
REGION_ATTACHED = "inflight region attached"
INFLIGHT_MEMFD = "vhostmem-inflight"
FREEZE_WAIT = 1.0  # seconds an aimed kill waits for SIGSTOP to take effect
AIM_WINDOW = 0.5  # seconds an aimed kill waits for a request in flight before firing anyway
RESUBMITTING = "resubmitting"
POLL = 0.02
RESUME_TIMEOUT = 15.0  # QEMU redials within ~1-2 s; a job silent for this long lost a request
START_MARK = "=== backend start"
BACKEND, NBD_SERVER = "backend", "nbd-server"  # what CrashConfig.fault kills

# vmtest --writer block layout (see qemu/guest/vmtest.c).
WBLOCK = 4096
WRITER_MAGIC = 0x57484D56
XORSHIFT_SEED = 0x9E3779B97F4A7C15
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
HEADER_WORDS = 3  # magic+job, block, seq (u64 words)
BODY_END = WBLOCK // 8 - 1  # the last u64 word is the checksum


@dataclass(frozen=True)
class CrashConfig:
    kills: int = 20
    down_min: float = 0.2  # seconds the backend stays dead
    down_max: float = 1.0
    up_min: float = 0.0  # seconds it serves after the guest's I/O resumed, before the next kill
    up_max: float = 0.5
    writer_jobs: int = 4
    num_queues: int = 1
    smp: int = 1
    packed: bool = False  # vhost-user-blk-pci packed=on: packed virtqueues (virtio 1.2 2.8)
    disk_size: int = 16 * MIB
    memory_mib: int = 512
    seed: int = 1
    reconnect: int = 1  # QEMU's redial period in seconds (7.2 takes whole seconds only)
    inflight_kills: float = 0.75  # share of kills aimed at a moment with requests in flight
    timeout: float = 120.0
    fault: str = BACKEND  # or NBD_SERVER: the backend's NBD server (module docstring)


@dataclass
class CrashResult:
    backend: str
    config: CrashConfig
    kills: int = 0
    kills_with_inflight: int = 0  # the region showed requests in flight just before the kill
    resumed: int = 0
    checks: list[Check] = field(default_factory=list)
    verdict: str | None = None
    error: str | None = None
    serial_log: str = ""
    backend_log: str = ""
    seconds: float = 0.0
    outages: list[float] = field(default_factory=list)  # kill -> guest I/O resumed
    accel: str = ""  # what QEMU ran with, and why (qemu/accel.py)

    @property
    def passed(self) -> bool:
        return self.error is None and self.verdict == "PASS" and bool(self.checks) and all(
            c.passed for c in self.checks)

    @property
    def resubmissions(self) -> int:
        return self.backend_log.count(RESUBMITTING)

    def report(self, with_logs: bool = True) -> str:
        worst = max(self.outages, default=0.0)
        lines = [
            f"{'PASS' if self.passed else 'FAIL'} backend={self.backend} kills={self.kills} "
            f"resumed={self.resumed} kills-seeing-inflight={self.kills_with_inflight} "
            f"restarts-with-resubmission={self.resubmissions} "
            f"{self.seconds:.1f} s (longest outage {worst:.2f} s)",
            f"guest verdict: {self.verdict}",
            f"accel: {self.accel or '-'}",
        ]
        if self.error:
            lines.append(f"error: {self.error}")
        lines += [str(c) for c in self.checks]
        if with_logs and not self.passed:
            lines += ["--- serial (tail) ---", *_tail(self.serial_log)]
            lines += ["--- backend (tail) ---", *_tail(self.backend_log)]
        return "\n".join(lines)


def writer_cmdline(config: CrashConfig) -> str:
    settings = {"mode": "writer", "size": config.disk_size, "lbs": 512,
                "queues": min(config.num_queues, config.smp), "ro": 0,
                "writer_jobs": config.writer_jobs}
    words = ["console=ttyS0", "quiet", "panic=-1"]
    return " ".join(words + [f"vmtest.{k}={v}" for k, v in settings.items()])


def check_writer_image(image: bytes) -> Check:
    """Every 4 KiB block is zeroes or one whole vmtest --writer block (header, fill, FNV-1a)."""
    words = np.frombuffer(image, dtype="<u8").reshape(-1, WBLOCK // 8)
    written = np.flatnonzero(words.any(axis=1))
    w = words[written]
    magic_ok = (w[:, 0] & 0xFFFFFFFF) == WRITER_MAGIC
    block_ok = w[:, 1] == written.astype(np.uint64)
    x = (w[:, 1] << np.uint64(32)) ^ w[:, 2] ^ np.uint64(XORSHIFT_SEED)
    fill_ok = np.ones(len(w), dtype=bool)
    for col in range(HEADER_WORDS, BODY_END):
        x ^= x << np.uint64(13)
        x ^= x >> np.uint64(7)
        x ^= x << np.uint64(17)
        fill_ok &= w[:, col] == x
    data = np.ascontiguousarray(w[:, :BODY_END]).view(np.uint8)
    h = np.full(len(w), FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in range(data.shape[1]):
            h = (h ^ data[:, col]) * np.uint64(FNV_PRIME)
    sum_ok = h == w[:, BODY_END]
    good = magic_ok & block_ok & fill_ok & sum_ok
    bad = written[~good]
    detail = (f"{len(written)} written blocks valid, {len(words) - len(written)} untouched"
              if not len(bad) else f"{len(bad)} damaged blocks, first {bad[:8].tolist()}")
    return Check("host.image-blocks", not len(bad) and len(written) > 0, detail)


class _Run:
    """The processes of one crash test; ``close`` ends them whatever happened."""

    def __init__(self, backend: Backend, config: CrashConfig, workdir: Path) -> None:
        self.backend, self.config = backend, config
        self.image, self.socket = workdir / "disk.img", workdir / "blk.sock"
        self.backend_log = workdir / "backend.log"
        self.rng = random.Random(config.seed)
        self.backend_proc: subprocess.Popen[bytes] | None = None
        self.qemu_proc: subprocess.Popen[bytes] | None = None
        self.log = GuestLog()
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.progress = [0] * config.writer_jobs  # progress lines seen, per writer job
        self.stop_requested = False
        self.qemu_done = False

    def start_backend(self) -> str | None:
        request = BackendRequest(self.socket, self.image, False, self.config.num_queues)
        with self.backend_log.open("ab") as out:
            out.write(f"{START_MARK}\n".encode())
            out.flush()
            self.backend_proc = subprocess.Popen(
                self.backend.argv(request), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        return _wait_for_socket(self.socket, self.backend_proc, SOCKET_WAIT)

    def fail(self, aim: bool) -> bool:
        """Kill the backend (see kill_backend), or its NBD server (never aimed)."""
        if self.config.fault == NBD_SERVER:
            assert self.backend_proc is not None
            os.kill(self.backend_proc.pid, signal.SIGUSR1)  # qemu/nbd_stack.py: SIGKILL it
            return False
        return self.kill_backend(aim)

    def recover(self) -> str | None:
        if self.config.fault == NBD_SERVER:
            assert self.backend_proc is not None
            os.kill(self.backend_proc.pid, signal.SIGUSR2)  # start qemu-nbd again
            return None
        return self.start_backend()

    def kill_backend(self, aim: bool) -> bool:
        """SIGKILL the backend (``aim``: once its inflight region shows a request in flight);
        returns whether requests were flagged in flight at the kill. An aimed kill stops the
        process (SIGSTOP) when it sees a flag and looks again: what the frozen region shows
        is what the restarted backend finds."""
        proc = self.backend_proc
        assert proc is not None
        region = _map_inflight_region(proc.pid) if aim else None
        seen = False
        if region is not None:
            with region:
                until = time.monotonic() + AIM_WINDOW
                packed = self.config.packed
                # vhostmem's data-plane workers hold the rings: they are frozen too.
                pids = [proc.pid, *child_pids(proc.pid)]
                while not seen and time.monotonic() < until:
                    if _any_inflight(region, packed):
                        _signal_all(pids, signal.SIGSTOP)
                        seen = all(_frozen(p) for p in pids) and _any_inflight(region, packed)
                        if not seen:
                            _signal_all(pids, signal.SIGCONT)
        # SIGKILL: no cleanup of any kind. A backend's child processes first (vhostmem's
        # data-plane workers, which hold the requests in flight; they would otherwise finish
        # their turn before dying with their parent).
        _signal_all(child_pids(proc.pid), signal.SIGKILL)
        proc.kill()
        proc.wait()
        self.socket.unlink(missing_ok=True)  # so that start_backend waits for the new one
        return seen

    def start_qemu(self, assets: guest_assets.GuestAssets) -> None:
        guest = GuestConfig(disk_size=self.config.disk_size, memory_mib=self.config.memory_mib,
                            num_queues=self.config.num_queues, smp=self.config.smp,
                            packed=self.config.packed)
        argv = qemu_command(assets, guest, self.socket, writer_cmdline(self.config),
                            reconnect=self.config.reconnect)
        self.qemu_proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT)
        assert self.qemu_proc.stdout is not None
        threading.Thread(target=_pump_lines, args=(self.qemu_proc.stdout, self.lines),
                         daemon=True).start()

    def drain(self, until: float) -> None:
        """Feed serial lines to the log until ``until`` (monotonic) or QEMU's output ends."""
        while not self.qemu_done:
            left = until - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, min(left, POLL)))
            except queue.Empty:
                if left <= 0:
                    return
                continue
            if line is None:
                self.qemu_done = True
                return
            if (match := PROGRESS_RE.search(line)) and int(match[1]) < len(self.progress):
                self.progress[int(match[1])] += 1
            if self.log.feed(line) == WRITER_STOP:
                self.stop_requested = True

    def wait_progress(self, lines: int, deadline: float) -> list[int]:
        """Wait until every writer job printed ``lines`` more progress lines; returns the jobs
        that did not (empty: all resumed)."""
        target = [n + lines for n in self.progress]

        def stalled() -> list[int]:
            return [j for j, (n, t) in enumerate(zip(self.progress, target, strict=True)) if n < t]

        while stalled() and not self.qemu_done and time.monotonic() < deadline:
            self.drain(time.monotonic() + POLL)
        return stalled()

    def crash_loop(self, result: CrashResult, deadline: float) -> None:
        cfg = self.config
        if stalled := self.wait_progress(RESUMED_LINES, deadline):
            result.error = f"writer jobs {stalled} never made progress"
            return
        while result.kills < cfg.kills:
            self.drain(time.monotonic() + self.rng.uniform(cfg.up_min, cfg.up_max))
            killed_at = time.monotonic()
            aim = self.rng.random() < cfg.inflight_kills
            result.kills_with_inflight += self.fail(aim)
            result.kills += 1
            self.drain(time.monotonic() + self.rng.uniform(cfg.down_min, cfg.down_max))
            result.error = self.recover()
            if result.error is not None:
                return
            if stalled := self.wait_progress(RESUMED_LINES, min(deadline, time.monotonic()
                                                               + RESUME_TIMEOUT)):
                result.error = f"writer jobs {stalled} stalled after kill {result.kills}"
                return
            result.resumed += 1
            result.outages.append(time.monotonic() - killed_at)

    def finish(self, result: CrashResult, deadline: float) -> None:
        """Tell the guest to stop writing and verify; wait for it to power off."""
        while not self.stop_requested and not self.qemu_done and time.monotonic() < deadline:
            self.drain(time.monotonic() + POLL)
        if self.stop_requested and self.qemu_proc is not None and self.qemu_proc.stdin:
            self.qemu_proc.stdin.write(f"{WRITER_STOP}\n".encode())
            self.qemu_proc.stdin.flush()
        while not self.qemu_done and time.monotonic() < deadline:
            self.drain(deadline)
        if not self.qemu_done:
            result.error = result.error or f"timeout after {self.config.timeout} s"
            return
        assert self.qemu_proc is not None
        status = self.qemu_proc.wait()
        if status != 0:
            result.error = result.error or f"QEMU exited with status {status}"

    def close(self) -> None:
        _stop(self.qemu_proc)
        _stop(self.backend_proc)
        if self.qemu_proc is not None:
            for stream in (self.qemu_proc.stdin, self.qemu_proc.stdout):
                if stream is not None:
                    stream.close()


def _frozen(pid: int) -> bool:
    """Wait (briefly) until ``pid`` is stopped: SIGSTOP is delivered asynchronously."""
    until = time.monotonic() + FREEZE_WAIT
    while time.monotonic() < until:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state in ("T", "t"):
            return True
    return False


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _map_inflight_region(pid: int) -> mmap.mmap | None:
    """The backend's inflight memfd, mapped read-only through procfs (None if it has none)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    for name in names:
        try:
            if INFLIGHT_MEMFD not in os.readlink(f"{fd_dir}/{name}"):
                continue
            fd = os.open(f"{fd_dir}/{name}", os.O_RDONLY)
        except OSError:
            continue
        try:
            return mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
    return None


def _any_inflight(region: mmap.mmap, packed: bool) -> bool:
    """Whether any queue of an inflight region has a request flagged in flight (layouts:
    vhostmem/inflight.py and vhostmem/inflight_packed.py; ``inflight`` is each entry's first
    byte, ``desc_num`` at the same offset of both headers)."""
    layout = PACKED_LAYOUT if packed else SPLIT_LAYOUT
    desc_num = int.from_bytes(region[2 * H_DESC_NUM : 2 * H_DESC_NUM + 2], "little")
    stride = layout.queue_region_size(desc_num)
    step = layout.desc_state_size
    for start in range(0, len(region) - stride + 1, stride):
        first = start + layout.header_size
        if any(region[first : first + step * desc_num : step]):
            return True
    return False


def _host_checks(run: _Run, result: CrashResult) -> list[Check]:
    cfg = run.config
    serial = run.log.text
    errors = [m for m in KERNEL_ERROR_MARKERS if m in serial]
    jobs = [c for c in run.log.checks if c.name.startswith("writer.job")]
    starts = result.backend_log.split(START_MARK)[1:]
    attached = sum(REGION_ATTACHED in log for log in starts)
    return [
        Check("host.kills", result.kills == cfg.kills, f"{result.kills} of {cfg.kills}"),
        Check("host.io-resumed-after-every-kill", result.resumed == result.kills,
              f"{result.resumed} of {result.kills}"),
        Check("host.no-guest-io-errors", not errors,
              f"kernel log mentions {errors}" if errors else "no I/O error in the serial log"),
        Check("host.all-writer-jobs-reported", len(jobs) == cfg.writer_jobs,
              f"{len(jobs)} of {cfg.writer_jobs}"),
        Check("host.inflight-region-on-every-start",
              run.backend.name != "vhostmem" or attached == len(starts),
              f"{attached} of {len(starts)} backend starts were handed the inflight region"),
        check_writer_image(run.image.read_bytes()),
    ]


def run_crash_test(
    backend: Backend,
    config: CrashConfig | None = None,
    *,
    assets: guest_assets.GuestAssets | None = None,
) -> CrashResult:
    """Boot a writing guest, kill/restart ``backend`` ``config.kills`` times, check the data."""
    config = config or CrashConfig()
    assets = assets or guest_assets.prepare()
    result = CrashResult(backend=backend.name, config=config)
    accel, why = resolve_accel(GuestConfig().accel, assets)  # what qemu_command will pick
    result.accel = f"{accel} ({why})"
    started = time.monotonic()
    deadline = started + config.timeout
    with tempfile.TemporaryDirectory(prefix="vhostmem-crash-") as tmp:
        run = _Run(backend, config, Path(tmp))
        with run.image.open("wb") as f:
            f.truncate(config.disk_size)
        try:
            result.error = run.start_backend()
            if result.error is None:
                run.start_qemu(assets)
                run.crash_loop(result, deadline)
                if result.error is None:  # a stalled guest would never finish
                    run.finish(result, deadline)
        finally:
            run.close()
            result.seconds = time.monotonic() - started
            result.serial_log = run.log.text
            if run.backend_log.exists():
                result.backend_log = run.backend_log.read_text(errors="replace")
        result.verdict = run.log.verdict
        result.checks = run.log.checks
        if result.error is None:
            result.checks += _host_checks(run, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qemu.reconnect", description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=sorted(BACKEND_FACTORIES), default="vhostmem")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--jobs", type=int, default=4, help="guest writer processes")
    p.add_argument("--num-queues", type=int, default=1)
    p.add_argument("--smp", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--packed", action="store_true", help="packed virtqueues (packed=on)")
    p.add_argument("--io-mode", choices=("inline", "thread"), help="vhostmem serve --io-mode")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--verbose", action="store_true", help="print the serial log too")
    args = p.parse_args(argv)
    config = CrashConfig(kills=args.kills, writer_jobs=args.jobs, seed=args.seed,
                         timeout=args.timeout, num_queues=args.num_queues, smp=args.smp,
                         packed=args.packed)
    backend = (vhostmem_backend(extra=("--io-mode", args.io_mode)) if args.io_mode
               else BACKEND_FACTORIES[args.backend]())
    result = run_crash_test(backend, config)
    if args.verbose:
        print(result.serial_log)
    print(result.report())
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
