"""Notifier eventfds from a frontend that may try to stall the backend (vhostmem/eventfd.py)."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Callable

import pytest

from vhostmem.eventfd import EventfdError, KickReader, check_eventfd, signal_eventfd

SATURATED = 0xFFFF_FFFF_FFFF_FFFE  # the largest counter value: one more write would block
HANG_TIMEOUT = 2.0


def returns_promptly(fn: Callable[[], object]) -> object:
    """Run ``fn`` on a thread; fail (instead of hanging the test) if it blocks."""
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    t.start()
    t.join(HANG_TIMEOUT)
    assert not t.is_alive(), "the call blocked"
    return result[0]


def test_check_eventfd_accepts_an_eventfd_and_makes_it_non_blocking() -> None:
    fd = os.eventfd(0)  # blocking, as a careless frontend might send it
    try:
        check_eventfd(fd, "SET_VRING_CALL ring 0")
        assert not os.get_blocking(fd)
    finally:
        os.close(fd)


def wrong_fds() -> list[tuple[str, int]]:
    r, w = os.pipe()
    os.close(w)
    with tempfile.TemporaryFile() as f:
        file_fd = os.dup(f.fileno())
    a, b = socket.socketpair()
    b.close()
    return [("pipe:", r), ("/", file_fd), ("socket:", a.detach())]


def test_check_eventfd_names_what_the_fd_really_is() -> None:
    for kind, fd in wrong_fds():
        try:
            with pytest.raises(EventfdError, match=f"SET_VRING_KICK ring 1: fd is {kind}"):
                check_eventfd(fd, "SET_VRING_KICK ring 1")
        finally:
            os.close(fd)


def test_kick_drain_never_blocks_even_if_the_frontend_clears_o_nonblock() -> None:
    fd = os.eventfd(0)
    frontend = os.dup(fd)  # the same open file description, as over SCM_RIGHTS
    reader = KickReader(fd)
    try:
        os.set_blocking(frontend, True)  # the frontend flips the shared flag back
        assert os.get_blocking(fd)
        assert returns_promptly(reader.drain) is False
        os.eventfd_write(frontend, 3)
        assert returns_promptly(reader.drain) is True
        assert returns_promptly(reader.drain) is False  # the whole counter was consumed
    finally:
        os.close(fd)
        os.close(frontend)


def test_signalling_a_saturated_counter_does_not_block() -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        os.eventfd_write(fd, SATURATED)
        returns_promptly(lambda: signal_eventfd(fd))
        assert os.eventfd_read(fd) == SATURATED  # already pending: nothing was lost
    finally:
        os.close(fd)


def test_the_plain_read_fallback_drains_too() -> None:
    """What kernels without RWF_NOWAIT on eventfds get: a non-blocking read of the counter."""
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    reader = KickReader(fd)
    try:
        assert reader._drain_plain() is False
        os.eventfd_write(fd, 2)
        assert reader._drain_plain() is True
        assert reader._drain_plain() is False
    finally:
        os.close(fd)
