"""bench/guest_bench.py: its backend variants, and one real bench boot reporting what the run
cost the guest (interrupts, context switches, idle share) and the host (CPU per read)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.guest_bench import _pinned, make_backend, one_boot
from qemu.backends import BackendRequest

BENCH_SECONDS = 1
BENCH_JOBS = 2


def _argv(variant: str) -> list[str]:
    req = BackendRequest(socket=Path("/tmp/s.sock"), disk=Path("/tmp/d.img"), readonly=False,
                         num_queues=1, size=1 << 20)
    return make_backend(variant).argv(req)


@pytest.mark.parametrize(("variant", "words"), [
    ("vhostmem-poll50", ["--poll-us", "50"]),
    ("vhostmem-thread", ["--io-mode", "thread"]),
    ("vhostmem-w2", ["--workers", "2"]),
    ("qsd-iothread", ["--object", "iothread,id=io0"]),
])
def test_variants_add_their_options(variant: str, words: list[str]) -> None:
    argv = " ".join(_argv(variant))
    assert " ".join(words) in argv
    assert " ".join(words) not in " ".join(_argv(variant.split("-")[0]))


def test_qsd_iothread_puts_the_export_in_it() -> None:
    assert _argv("qsd-iothread")[-1].endswith(",iothread=io0")


@pytest.mark.parametrize("variant", ["vhostmem-pollx", "qsd-poll50", "vhostmem-w", "nbd"])
def test_unknown_variants_are_refused(variant: str) -> None:
    with pytest.raises(ValueError, match="unknown backend variant"):
        make_backend(variant)


def test_pin_runs_the_backend_under_taskset_on_its_cpu() -> None:
    req = BackendRequest(socket=Path("/tmp/s.sock"), disk=None, readonly=False, num_queues=1,
                         size=1 << 20)
    argv = _pinned(make_backend("vhostmem")).argv(req)
    assert argv[1:3] == ["-c", "1"] and argv[0].endswith("taskset")
    assert argv[3:] == make_backend("vhostmem").argv(req)
    pinned_variant = make_backend("vhostmem-poll50+pin")  # one_boot pins it
    assert pinned_variant.argv(req) == make_backend("vhostmem-poll50").argv(req)


@pytest.mark.qemu
def test_bench_boot_reports_guest_and_host_costs() -> None:
    boot = one_boot("vhostmem", BENCH_SECONDS, BENCH_JOBS)
    ops = boot["ops"]
    assert ops > 0 and boot["iops"] > 0
    # Every read completes through the disk's interrupt; EVENT_IDX may fold several into one.
    assert 0 < boot["irqs"] <= ops
    # QD1 readers block on every read: at least one switch each (to the other job or idle).
    assert boot["ctxt"] >= ops
    assert 0.0 <= boot["guest_idle"] <= 1.0
    assert boot["backend_cpu_s_run"] > 0 and boot["qemu_cpu_s_run"] > 0
    assert boot["backend_wait_s_run"] >= 0 and boot["qemu_wait_s_run"] >= 0
