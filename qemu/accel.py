"""Which accelerator a guest boots with: KVM only where a probe boot succeeds, otherwise TCG.

An openable ``/dev/kvm`` does not mean KVM can run a guest: on the development machines it
exists, QEMU starts with ``-accel kvm`` and SeaBIOS prints its banner, but the kernel then spins
without printing a byte (the host CPU has no VMX/SVM). So the test is a boot: the test guest's
own kernel and initramfs under ``-accel kvm`` with ``vmtest.mode=probe`` (init prints
``VHOSTMEM-PROBE running`` and powers off at once, no disk attached). KVM is used only if that
line arrives within ``PROBE_TIMEOUT``.

The verdict is cached for the process and on disk (``CACHE_DIR/kvm-probe-<key>.json``), keyed
by the kernel and initramfs, the QEMU version, the host kernel release, the host CPU's flags and
whether ``/dev/kvm`` is open to us, so a machine pays for the probe (about ``PROBE_TIMEOUT``
where KVM does not work, well under a second where it does) once per change of any of these.

``python -m qemu.accel`` prints the verdict (``--fresh``: probe again, ignoring the caches).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import queue
import re
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from qemu import assets as guest_assets

QEMU = "qemu-system-x86_64"
KVM_DEVICE = Path("/dev/kvm")
PROBE_TIMEOUT = 4.0  # under KVM init prints within ~1 s; TCG would need ~3 s, KVM never less
PROBE_MARKER = "VHOSTMEM-PROBE running"
PROBE_APPEND = "console=ttyS0 quiet panic=-1 vmtest.mode=probe"
PROBE_MEMORY = "256M"
STOP_WAIT = 2.0
ACCELS = ("auto", "kvm", "tcg")
SOURCE_BOOT, SOURCE_PROCESS, SOURCE_DISK = "boot", "process", "disk"
ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[A-Za-z])")  # SeaBIOS's terminal control codes

_verdicts: dict[str, KvmProbe] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class KvmProbe:
    """Whether a KVM boot of the test guest reached init, how long finding out took, and why."""

    works: bool
    seconds: float
    detail: str
    key: str
    source: str = SOURCE_BOOT  # "boot" (probed now), "process" or "disk" (a cached verdict)

    @property
    def accel(self) -> str:
        return "kvm" if self.works else "tcg"

    def describe(self) -> str:
        where = "probed now" if self.source == SOURCE_BOOT else f"cached ({self.source})"
        verdict = "KVM boot reached init" if self.works else "KVM unusable"
        return f"{verdict}: {self.detail} ({self.seconds:.2f} s, {where})"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


def _qemu_version() -> str:
    try:
        proc = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"
    return proc.stdout.splitlines()[0] if proc.stdout else f"status {proc.returncode}"


def _kvm_usable() -> bool:
    return os.access(KVM_DEVICE, os.R_OK | os.W_OK)


def probe_key(assets: guest_assets.GuestAssets) -> str:
    """What the verdict depends on, hashed: guest, QEMU, host kernel, CPU flags, access."""
    parts = [assets.kernel_release, assets.kernel.name, assets.initrd.name, _qemu_version(),
             platform.release(), _cpu_flags(), str(_kvm_usable())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _pump(stream, lines: queue.Queue[str | None]) -> None:  # type: ignore[no-untyped-def]
    for raw in stream:
        lines.put(raw.decode(errors="replace").rstrip("\r\n"))
    lines.put(None)


def probe_kvm(assets: guest_assets.GuestAssets, *, timeout: float = PROBE_TIMEOUT,
              key: str | None = None) -> KvmProbe:
    """Boots the test guest under KVM once, now; no cache is read or written."""
    key = key or probe_key(assets)
    started = time.monotonic()
    if not _kvm_usable():
        return KvmProbe(False, time.monotonic() - started,
                        f"{KVM_DEVICE} missing or not readable and writable", key)
    argv = [QEMU, "-accel", "kvm", "-machine", "q35", "-m", PROBE_MEMORY, "-smp", "1",
            "-kernel", str(assets.kernel), "-initrd", str(assets.initrd),
            "-append", PROBE_APPEND, "-nographic", "-no-reboot", "-nodefaults",
            "-serial", "stdio"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    deadline, last, works = started + timeout, "", False
    detail = f"no {PROBE_MARKER!r} within {timeout:.0f} s"
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                detail = f"QEMU exited with status {proc.wait()} before init ran ({last!r})"
                break
            if PROBE_MARKER in line:
                works, detail = True, "init printed its probe line"
                break
            if ESCAPE.sub("", line).strip():
                last = ESCAPE.sub("", line).strip()[-120:]
        if not works and "within" in detail:
            detail += f" (last output: {last!r})"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(STOP_WAIT)
        proc.stdout.close()
    return KvmProbe(works, time.monotonic() - started, detail, key)


def _cache_file(key: str) -> Path:
    return guest_assets.CACHE_DIR / f"kvm-probe-{key}.json"


def _read_disk(key: str) -> KvmProbe | None:
    try:
        data = json.loads(_cache_file(key).read_text())
        return KvmProbe(**data, key=key, source=SOURCE_DISK)
    except (OSError, ValueError, TypeError):
        return None


def kvm_verdict(assets: guest_assets.GuestAssets) -> KvmProbe:
    """The cached verdict for these assets on this host: process cache, disk cache, or a probe
    (whose verdict is then stored in both)."""
    key = probe_key(assets)
    with _lock:
        cached = _verdicts.get(key)
        if cached is not None:
            return replace(cached, source=SOURCE_PROCESS)
        found = _read_disk(key)
        if found is None:
            found = probe_kvm(assets, key=key)
            record = {k: v for k, v in asdict(found).items() if k not in ("key", "source")}
            guest_assets._atomic_write(_cache_file(key), json.dumps(record, indent=1).encode())
            guest_assets._prune(_cache_file(key), "kvm-probe-*.json")
        _verdicts[key] = found
        return found


def resolve_accel(requested: str, assets: guest_assets.GuestAssets) -> tuple[str, str]:
    """The accelerator to pass to QEMU, and why: "kvm"/"tcg" as asked, "auto" by the probe."""
    if requested not in ACCELS:
        raise ValueError(f"accel {requested!r}: expected one of {ACCELS}")
    if requested != "auto":
        return requested, "requested explicitly"
    verdict = kvm_verdict(assets)
    return verdict.accel, verdict.describe()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qemu.accel", description=__doc__.split("\n")[0])
    p.add_argument("--fresh", action="store_true", help="probe now, ignoring the caches")
    args = p.parse_args(argv)
    assets = guest_assets.prepare()
    verdict = probe_kvm(assets) if args.fresh else kvm_verdict(assets)
    print(f"accel={verdict.accel}; {verdict.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
