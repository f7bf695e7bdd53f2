"""The same hostile messages against a real ``vhostmem serve`` process, observed from outside:
after each case its /proc/PID/fd and its memfd mappings in /proc/PID/maps are back to the
baseline, and a fresh frontend does real I/O verified against the image. Every named case of
test_messages runs here too."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile.env import Image, guarded_ram, open_guest, real_io
from tests.hostile.test_messages import CASES, Step, alive, mutated, negotiate, steps
from tests.hostile.wire import RawConnection
from vhostmem.frontend import VhostUserError

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 10.0
SETTLE_TIMEOUT = 5.0
POLL = 0.01
IO_SECTOR = 1024


class ServeProcess:
    def __init__(self, workdir: Path, *options: str) -> None:
        self.image = Image(workdir / "disk.raw", seed=7)
        self.socket = str(workdir / "blk.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vhostmem.cli", "serve", "--socket", self.socket,
             "--disk", str(self.image.path), "--num-queues", "2", "--log-level", "ERROR",
             *options],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.socket):
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, "vhostmem serve did not create its socket"
            time.sleep(POLL)

    def stderr(self) -> str:
        return self.proc.stderr.read().decode() if self.proc.stderr else ""

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def memfd_maps(self) -> int:
        with open(f"/proc/{self.proc.pid}/maps") as f:
            return sum("memfd:" in line for line in f)

    def settle(self, fds: int) -> None:
        """Wait until the process is back to ``fds`` open fds and no memfd mapping."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (self.fds(), self.memfd_maps()) != (fds, 0):
            assert self.proc.poll() is None, f"vhostmem serve died: {self.stderr()}"
            assert time.monotonic() < deadline, \
                f"fds {self.fds()} (baseline {fds}), memfd mappings {self.memfd_maps()}"
            time.sleep(POLL)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(SETTLE_TIMEOUT)


@pytest.fixture(scope="module")
def serve() -> Iterator[ServeProcess]:
    with tempfile.TemporaryDirectory(prefix="vhm-hostile-proc-") as d:
        proc = ServeProcess(Path(d))
        yield proc
        proc.stop()


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_message_against_the_process(serve: ServeProcess, name: str) -> None:
    baseline = serve.fds()
    assert serve.memfd_maps() == 0
    conn = RawConnection(serve.socket)
    try:
        negotiate(conn)
        for data, fds in CASES[name][0]:
            if not conn.send(data, fds) or conn.reply() is None:
                break
    finally:
        conn.close()
    serve.settle(baseline)
    ram = guarded_ram()
    try:
        with open_guest(serve.socket, ram) as dev:
            real_io(dev, 0, serve.image, IO_SECTOR)
    finally:
        ram.close()
    serve.settle(baseline)
    assert serve.image.unchanged_elsewhere()



def test_required_seal_refuses_truncatable_guest_ram(tmp_path: Path) -> None:
    """With --require-sealed-memory, guest RAM a frontend could still shrink (a truncation
    under the mapping is a SIGBUS) is refused with REPLY_ACK 1 and nothing of it stays; the
    same process then serves a frontend whose memfds are sealed, as QEMU's are."""
    serve = ServeProcess(tmp_path, "--require-sealed-memory")
    try:
        baseline = serve.fds()
        ram = guarded_ram(sealed=False)
        try:
            with pytest.raises(VhostUserError, match="refused SET_MEM_TABLE: REPLY_ACK 1"):
                open_guest(serve.socket, ram)
        finally:
            ram.close()
        serve.settle(baseline)
        ram = guarded_ram()
        try:
            with open_guest(serve.socket, ram, queues=2) as dev:
                real_io(dev, 1, serve.image, IO_SECTOR)
        finally:
            ram.close()
        serve.settle(baseline)
    finally:
        serve.stop()
    assert "fd is not sealed against shrinking (F_SEAL_SHRINK)" in serve.stderr()


@pytest.mark.slow
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.one_of(steps, mutated), min_size=1, max_size=10))
def test_hypothesis_sequences_against_the_process(serve: ServeProcess, seq: list[Step]) -> None:
    """Generated and mutated message sequences: the process survives each one and is back to
    its fds and mappings afterwards."""
    baseline = serve.fds()
    conn = RawConnection(serve.socket)
    try:
        negotiate(conn)
        for data, fds in seq:
            if not conn.send(data, fds):
                break
        alive(conn)
    finally:
        conn.close()
    serve.settle(baseline)


def test_the_process_still_serves_after_the_sequences(serve: ServeProcess) -> None:
    baseline = serve.fds()
    ram = guarded_ram()
    try:
        with open_guest(serve.socket, ram, queues=2) as dev:
            real_io(dev, 0, serve.image, IO_SECTOR)
            real_io(dev, 1, serve.image, IO_SECTOR + 8)
    finally:
        ram.close()
    serve.settle(baseline)
    assert serve.image.unchanged_elsewhere()
