"""Devices served by vhostmem."""

from vhostmem.devices.blk import BlkDevice
from vhostmem.devices.blk_backend import BlkBackend, open_image, ram_disk

__all__ = ["BlkBackend", "BlkDevice", "open_image", "ram_disk"]
