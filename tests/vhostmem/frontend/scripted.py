"""A scripted vhost-user backend for the frontend's unit tests: a thread that connects to the
frontend's `Listener` (a backend in client mode) and answers each message with a responder.
Used through the `scripted` fixture (conftest.py)."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator

from protocol import Framer, Message
from vhostmem.frontend.client import Listener, VhostUserClient

Responder = Callable[[Message], bytes | None]
Scripted = Callable[[Responder], tuple[VhostUserClient, list[Message]]]
HANG_UP = b""  # a responder returning this closes the backend's socket


def _serve(path: str, respond: Responder, seen: list[Message]) -> None:
    """A backend in client mode: connect to the frontend, answer with `respond` (which sees
    each message with its fds still open; they are closed after it returns)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    framer = Framer(sender="frontend")
    with sock:
        while True:
            data, fds, _, _ = socket.recv_fds(sock, 4096, 8)
            if not data:
                return
            for msg in framer.feed(data, fds):
                seen.append(msg)
                try:
                    out = respond(msg)
                finally:
                    for fd in msg.fds:
                        os.close(fd)
                if out == HANG_UP:
                    return
                if out is not None:
                    sock.sendall(out)


def scripted_backends() -> Iterator[Scripted]:
    """Yields `start(respond) -> (client, seen)`: each call runs one scripted backend and
    returns the frontend's connection to it and the list of messages it received."""
    workdir = tempfile.mkdtemp(prefix="vhm-cl-")
    path = os.path.join(workdir, "fe.sock")
    listener = Listener(path)
    threads, clients = [], []

    def start(respond: Responder) -> tuple[VhostUserClient, list[Message]]:
        seen: list[Message] = []
        t = threading.Thread(target=_serve, args=(path, respond, seen), daemon=True)
        t.start()
        threads.append(t)
        clients.append(listener.accept(timeout=5))
        clients[-1].timeout = 0.5
        return clients[-1], seen

    try:
        yield start
    finally:
        for c in clients:
            c.close()
        for t in threads:
            t.join(5)
        listener.close()
        os.rmdir(workdir)
