"""A `vhostmem serve --rpc-socket` subprocess and a line-level JSON-RPC connection to it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.vhostmem.test_cli import REPO

TIMEOUT = 20.0


class RpcFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Rpc:
    """One client connection: requests and replies, one JSON object per line."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self._buf = b""
        self._next_id = 0

    def send_line(self, data: bytes) -> None:
        self.sock.sendall(data + b"\n")

    def reply(self) -> dict[str, Any] | None:
        """The next reply line, parsed; None at EOF."""
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:  # closed with our unread bytes in its buffer
                return None
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        obj = json.loads(line)
        assert isinstance(obj, dict) and obj["jsonrpc"] == "2.0"
        return obj

    def call(self, method: str, **params: Any) -> Any:
        self._next_id += 1
        req = {"jsonrpc": "2.0", "method": method, "params": params, "id": self._next_id}
        self.send_line(json.dumps(req).encode())
        reply = self.reply()
        assert reply is not None, f"{method}: connection closed without a reply"
        assert reply["id"] == self._next_id
        if "error" in reply:
            raise RpcFailed(reply["error"]["code"], reply["error"]["message"])
        return reply["result"]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Serve:
    """`python -m vhostmem.cli serve ARGS --rpc-socket DIR/rpc.sock`, run in ``cwd``."""

    def __init__(self, tmp: Path, *argv: str, cwd: Path | None = None) -> None:
        self.rpc_path = tmp / "rpc.sock"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vhostmem.cli", "serve", *argv,
             "--rpc-socket", str(self.rpc_path)],
            cwd=cwd or REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + TIMEOUT
        # Until it accepts: the socket file appears at bind(), a moment before listen() (a
        # connect in between is refused).
        while not self._accepts():
            if self.proc.poll() is not None:
                raise AssertionError(self.proc.stderr.read().decode())  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the management socket did not appear"
            time.sleep(0.05)

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.rpc_path))
            except (FileNotFoundError, ConnectionRefusedError):
                return False
        return True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rpc(self) -> Rpc:
        return Rpc(self.rpc_path)

    def call(self, method: str, **params: Any) -> Any:
        with self.rpc() as rpc:
            return rpc.call(method, **params)

    def fds(self) -> dict[int, str]:
        """The process's open fds and what they point to."""
        out = {}
        base = f"/proc/{self.pid}/fd"
        for name in os.listdir(base):
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                out[int(name)] = os.readlink(f"{base}/{name}")
        return out

    def fd_summary(self) -> list[str]:
        """What the open fds point to, sorted (sockets without their inode number: a client
        reconnecting gets a new one), to compare before and after."""
        return sorted("socket" if t.startswith("socket:") else t for t in self.fds().values())

    def stop(self) -> str:
        """SIGTERM; asserts a clean exit; the log."""
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=TIMEOUT)
        finally:
            self.proc.kill()
        assert self.proc.returncode == 0, err.decode()
        return err.decode()

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()


def wait_until(predicate: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
