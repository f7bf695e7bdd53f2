"""Shared fixtures: `qsd`, a factory for qemu-storage-daemon peers torn down after the test."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.peers import QsdHandle, make_image, start_qsd

DEFAULT_IMAGE_SIZE = 16 << 20


@pytest.fixture
def qsd() -> Iterator[Callable[..., QsdHandle]]:
    """`qsd(size=..., num_queues=1, readonly=False, image=None)` starts a daemon on a fresh raw
    image (random contents, kept as `handle.initial`) in a short private directory."""
    workdir = Path(tempfile.mkdtemp(prefix="vhm-qsd-"))  # short: socket paths max 107 bytes
    handles: list[QsdHandle] = []

    def start(size: int = DEFAULT_IMAGE_SIZE, num_queues: int = 1, readonly: bool = False,
              image: str | None = None) -> QsdHandle:
        n = len(handles)
        image_path = image or str(workdir / f"disk{n}.raw")
        initial = None if image else make_image(image_path, size)
        handle = start_qsd(image_path, str(workdir / f"blk{n}.sock"), num_queues, readonly)
        handle.initial = initial  # type: ignore[attr-defined]
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()
    shutil.rmtree(workdir, ignore_errors=True)
