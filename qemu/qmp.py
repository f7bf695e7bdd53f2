"""A minimal synchronous QMP client over a Unix socket (just what hot-plug needs)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

RECV_SIZE = 65536


class QMPError(RuntimeError):
    """QEMU answered with an error, or the connection broke; the message names the command."""


class QMPClient:
    """``execute`` sends a command and returns its ``return`` value; events are kept in order."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buffer = b""
        self._timeout = timeout
        self.events: list[dict[str, Any]] = []
        try:
            self._connect(path, timeout)
            self._sock.settimeout(timeout)
            greeting = self._read_message()
            if "QMP" not in greeting:
                raise QMPError(f"not a QMP greeting: {greeting}")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def _connect(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock.connect(str(path))
                return
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() > deadline:
                    raise QMPError(f"QMP socket {path} did not accept a connection") from exc
                time.sleep(0.05)

    def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(RECV_SIZE)
            if not chunk:
                raise QMPError("QMP connection closed by QEMU")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read_message()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                error = message["error"]
                raise QMPError(f"{command}: {error.get('class')}: {error.get('desc')}")
            elif "return" in message:
                return message["return"]

    def wait_event(self, name: str, timeout: float, **data: Any) -> dict[str, Any]:
        """The first event ``name`` whose data contains ``data``, seen before or within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                fields = event.get("data", {})
                if event["event"] == name and all(fields.get(k) == v for k, v in data.items()):
                    return self.events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPError(f"no {name} event {data} within {timeout:.0f} s")
            self._sock.settimeout(remaining)
            try:
                self.events.append(self._read_message())
            except TimeoutError:
                continue
            finally:
                self._sock.settimeout(self._timeout)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
