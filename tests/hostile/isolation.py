"""Harness of the isolation tests: a real ``vhostmem serve`` process with two devices, A (the one
attacked) and B (the bystander), and a probe that measures how promptly B answers meanwhile.

Bounds here are hang detectors, not performance claims: each attack makes an unfixed backend
stall for several seconds (or forever), far beyond `LATENCY_BOUND`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from vhostmem.frontend import VhostUserClient, VhostUserError

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 10.0
STOP_TIMEOUT = 3.0
POLL = 0.01
# Worst reply latency of device B allowed while device A is attacked (a hang detector).
LATENCY_BOUND = 1.0
# One probe waits this long for its reply; a probe that times out ends the probing.
PROBE_TIMEOUT = 3.0
PROBE_INTERVAL = 0.005


class TwoDevices:
    """``vhostmem serve --blk socket=A.sock,<a_spec> --blk socket=B.sock,<b_spec>``, run from
    the checkout this file belongs to; stderr is collected line by line as it comes."""

    def __init__(self, workdir: Path, a_spec: str, b_spec: str = "ram=16M",
                 log_level: str = "ERROR") -> None:
        self.a = str(workdir / "A.sock")
        self.b = str(workdir / "B.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vhostmem.cli", "serve",
             "--blk", f"socket={self.a},{a_spec}", "--blk", f"socket={self.b},{b_spec}",
             "--log-level", log_level],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not (os.path.exists(self.a) and os.path.exists(self.b)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"vhostmem serve exited at start: {self.stderr()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("vhostmem serve did not create its sockets")
            time.sleep(POLL)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self._lines.append(line)

    def stderr(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: a hung event loop never sees the SIGTERM."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._reader.join(STOP_TIMEOUT)


class Probe:
    """A frontend on device B that sends GET_FEATURES back to back (a short pause between)
    from its own thread and records every reply latency; a reply that does not come within
    `PROBE_TIMEOUT` is recorded as that timeout and ends the probing."""

    def __init__(self, path: str) -> None:
        self.client = VhostUserClient.connect(path, timeout=PROBE_TIMEOUT)
        self.expected = self.client.get_features()
        self.latencies: list[float] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Probe:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                value = self.client.get_features()
            except (TimeoutError, VhostUserError) as exc:
                self.latencies.append(time.monotonic() - started)
                self.error = f"{type(exc).__name__}: {exc}"
                return
            self.latencies.append(time.monotonic() - started)
            if value != self.expected:
                self.error = f"GET_FEATURES answered {value:#x}, not {self.expected:#x}"
                return
            self._stop.wait(PROBE_INTERVAL)

    def stop(self) -> None:
        """Stop probing (waits out a probe in progress) and close the connection."""
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(PROBE_TIMEOUT + 1)
        self.client.close()

    @property
    def worst(self) -> float:
        return max(self.latencies, default=0.0)

    def verdict(self) -> str:
        """What a failed latency assertion says."""
        n = len(self.latencies)
        text = f"device B: worst GET_FEATURES latency {self.worst:.3f}s over {n} probes"
        if self.error:
            text += f", probing ended by {self.error}"
        return text

    def assert_prompt(self, context: str = "") -> None:
        assert self.latencies, "device B was never probed"
        assert self.error is None and self.worst < LATENCY_BOUND, \
            f"{self.verdict()} (bound {LATENCY_BOUND}s){context}"
