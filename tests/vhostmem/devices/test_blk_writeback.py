"""The writeback byte of vhost-user-blk across negotiations, device resets and backend
restarts (virtio 1.2 5.2.5; QEMU 7.2 caches the config it showed the guest, docs/hostile.md)."""

from __future__ import annotations

import os

from protocol import FrontendRequest
from tests.vhostmem.test_inflight import Watcher, reply_of, send
from vhostmem.devices import BlkDevice, ram_disk
from vhostmem.devices.blk import (
    CFG_WRITEBACK,
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_FLUSH,
)
from vhostmem.memmap import MemRegistry
from vhostmem.session import BASE_PROTOCOL_FEATURES, Session

WCE = 1 << VIRTIO_BLK_F_CONFIG_WCE
FLUSH = 1 << VIRTIO_BLK_F_FLUSH
SEABIOS = 1 << 32  # VERSION_1 only: no FLUSH, no CONFIG_WCE
LINUX = (1 << 32) | WCE | FLUSH


def device() -> BlkDevice:
    return BlkDevice(ram_disk(1 << 20))


def test_wce_without_flush_starts_write_through() -> None:
    """5.2.5.2: CONFIG_WCE negotiated and FLUSH not: writeback MUST start at 0."""
    dev = device()
    dev.set_features((1 << 32) | WCE)
    assert dev.get_config(CFG_WRITEBACK, 1) == b"\x00" and not dev.writeback


def test_firmware_without_flush_does_not_leave_linux_write_through() -> None:
    """SeaBIOS drives the device first without FLUSH (write-through meanwhile), then Linux
    negotiates CONFIG_WCE + FLUSH on the same connection and sees writeback 1: it must get
    write-back, as QEMU shows it. QEMU 7.2 sends no RESET_DEVICE / RESET_OWNER in between
    (only SET_STATUS 0 and GET_VRING_BASE)."""
    dev = device()
    dev.set_features(SEABIOS)
    assert not dev.writeback
    dev.set_features(LINUX)
    assert dev.writeback and dev.get_config(CFG_WRITEBACK, 1) == b"\x01"


def test_the_guests_choice_survives_device_reset_and_renegotiation() -> None:
    dev = device()
    dev.set_features(LINUX)
    dev.set_config(CFG_WRITEBACK, b"\x00", 0)
    assert not dev.writeback
    dev.set_features(LINUX)  # QEMU sends SET_FEATURES again at every start
    assert not dev.writeback
    dev.reset()  # a guest reboot: QEMU still shows the guest its cached 0
    dev.set_features(LINUX)
    assert not dev.writeback and dev.get_config(CFG_WRITEBACK, 1) == b"\x00"
    dev.forget_guest()  # a new frontend starts from power-on
    dev.set_features(LINUX)
    assert dev.writeback and dev.get_config(CFG_WRITEBACK, 1) == b"\x01"


def _session(dev: BlkDevice) -> Session:
    s = Session(dev, MemRegistry(), Watcher())
    send(s, FrontendRequest.SET_OWNER)
    send(s, FrontendRequest.SET_PROTOCOL_FEATURES, BASE_PROTOCOL_FEATURES)
    return s


def _get_inflight_fd(s: Session) -> tuple[int, int]:
    """GET_INFLIGHT_FD for 1 queue of 128: (a dup of the region's fd, the region's size)."""
    msg = reply_of(send(s, FrontendRequest.GET_INFLIGHT_FD, {
        "mmap_size": 0, "mmap_offset": 0, "num_queues": 1, "queue_size": 128}),
        FrontendRequest.GET_INFLIGHT_FD)
    return os.dup(msg.fds[0]), msg.payload.mmap_size  # type: ignore[attr-defined]


def test_write_through_survives_a_backend_restart_through_the_inflight_region() -> None:
    """QEMU's order on (re)connect: SET_FEATURES, SET_INFLIGHT_FD (the region it kept),
    SET_FEATURES again; it never replays SET_CONFIG. The restarted backend must come back
    write-through from the region alone."""
    dev0 = device()
    s0 = _session(dev0)
    send(s0, FrontendRequest.SET_FEATURES, LINUX)
    qemu_fd, size = _get_inflight_fd(s0)
    inflight = {"mmap_size": size, "mmap_offset": 0, "num_queues": 1, "queue_size": 128}
    send(s0, FrontendRequest.SET_INFLIGHT_FD, inflight, [os.dup(qemu_fd)])
    send(s0, FrontendRequest.SET_FEATURES, LINUX)
    send(s0, FrontendRequest.SET_CONFIG, {"offset": CFG_WRITEBACK, "size": 1, "flags": 0,
                                          "payload": b"\x00"})
    assert not dev0.writeback
    s0.close()  # the backend dies (a new process: a new device object)

    dev1 = device()
    s1 = _session(dev1)
    send(s1, FrontendRequest.SET_FEATURES, LINUX)
    send(s1, FrontendRequest.SET_INFLIGHT_FD, inflight, [os.dup(qemu_fd)])
    send(s1, FrontendRequest.SET_FEATURES, LINUX)
    assert not dev1.writeback and dev1.get_config(CFG_WRITEBACK, 1) == b"\x00"
    s1.close()

    # A fresh region (a new guest, or QEMU after a guest reset) restores nothing.
    dev2 = device()
    s2 = _session(dev2)
    send(s2, FrontendRequest.SET_FEATURES, LINUX)
    fresh, _ = _get_inflight_fd(s2)
    send(s2, FrontendRequest.SET_INFLIGHT_FD, inflight, [fresh])
    assert dev2.writeback
    s2.close()
    os.close(qemu_fd)


def test_a_corrupt_saved_state_is_not_restored() -> None:
    dev = device()
    s = _session(dev)
    send(s, FrontendRequest.SET_FEATURES, LINUX)
    fd, size = _get_inflight_fd(s)
    # A frontend scribbles a saved state with a bogus writeback value into the trailer.
    from vhostmem.inflight import DEVICE_STATE_MAGIC, DEVICE_STATE_SIZE

    os.pwrite(fd, DEVICE_STATE_MAGIC.to_bytes(4, "little") + b"\x01\x00\x00\x00\x07",
              size - DEVICE_STATE_SIZE)
    send(s, FrontendRequest.SET_INFLIGHT_FD, {"mmap_size": size, "mmap_offset": 0,
                                             "num_queues": 1, "queue_size": 128}, [fd])
    assert dev.writeback and dev.get_config(CFG_WRITEBACK, 1) == b"\x01"
    s.close()
