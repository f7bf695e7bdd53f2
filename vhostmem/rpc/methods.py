"""The management methods: parameters checked (a wrong one is named in an INVALID_PARAMS error),
then the work done by the :class:`~vhostmem.manager.DeviceManager`.

Every method returns a JSON-serialisable value or raises :class:`RpcError`; nothing a request
holds can reach a running device unless it passed the same checks as ``vhostmem serve --blk``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import vhostmem
from vhostmem.devices.nbd_conn import connect_uri as connect_nbd
from vhostmem.devspec import UsageError, spec_from_params
from vhostmem.gc_stats import GC_STATS
from vhostmem.manager import (
    DeviceBusyError,
    DeviceError,
    DeviceExistsError,
    DeviceManager,
    NoSuchDeviceError,
)
from vhostmem.rpc.protocol import (
    DEVICE_BUSY,
    DEVICE_EXISTS,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    NO_SUCH_DEVICE,
    OPERATION_FAILED,
    RpcError,
)

log = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEL_MODES = ("safe", "hard")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class Methods:
    """Method name -> coroutine over one manager."""

    def __init__(self, manager: DeviceManager) -> None:
        self.manager = manager
        self.table: dict[str, Handler] = {
            "device_add": self.device_add,
            "device_del": self.device_del,
            "device_list": self.device_list,
            "device_stats": self.device_stats,
            "log_set_level": self.log_set_level,
            "process_stats": self.process_stats,
            "version": self.version,
        }

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        handler = self.table.get(method)
        if handler is None:
            raise RpcError(METHOD_NOT_FOUND, f"unknown method {method!r} (methods: "
                           f"{', '.join(sorted(self.table))})")
        try:
            return await handler(params)
        except UsageError as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from None
        except DeviceBusyError as exc:
            raise RpcError(DEVICE_BUSY, str(exc)) from None
        except NoSuchDeviceError as exc:
            raise RpcError(NO_SUCH_DEVICE, str(exc)) from None
        except DeviceExistsError as exc:
            raise RpcError(DEVICE_EXISTS, str(exc)) from None
        except DeviceError as exc:
            raise RpcError(OPERATION_FAILED, str(exc)) from None
        except OSError as exc:  # e.g. a missing disk or a socket path in use
            raise RpcError(OPERATION_FAILED, f"{method}: {exc}") from None
        except ValueError as exc:  # e.g. an unknown socket group
            raise RpcError(OPERATION_FAILED, f"{method}: {exc}") from None

    # ---------------------------------------------------------------- devices

    async def device_add(self, params: dict[str, Any]) -> dict[str, str]:
        spec = spec_from_params(params)
        connection = None
        if spec.nbd is not None:
            # The handshake on the event loop, awaited: the other devices keep being served
            # while a slow or silent server is waited for (up to CONNECT_TIMEOUT).
            connection = await connect_nbd(spec.nbd)
        md = self.manager.add(spec, connection)
        log.info("%s: added by the management socket", md.name)
        return {"name": md.name}

    async def device_del(self, params: dict[str, Any]) -> dict[str, str]:
        _allowed(params, "name", "mode")
        name = _required_str(params, "name")
        mode = params.get("mode", "safe")
        if mode not in DEL_MODES:
            raise RpcError(INVALID_PARAMS, f"mode: expected one of {', '.join(DEL_MODES)}, "
                           f"got {mode!r}")
        await self.manager.remove(name, hard=mode == "hard")
        return {"name": name}

    async def device_list(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        _allowed(params, "name")
        if "name" in params:
            return [self.manager.describe(self.manager.get(_required_str(params, "name")))]
        return [self.manager.describe(md) for md in self.manager.devices.values()]

    async def device_stats(self, params: dict[str, Any]) -> dict[str, Any]:
        _allowed(params, "name", "reset")
        name = _required_str(params, "name")
        return self.manager.stats(name, _reset_flag(params))

    # ---------------------------------------------------------------- process

    async def log_set_level(self, params: dict[str, Any]) -> dict[str, str]:
        _allowed(params, "level")
        level = _required_str(params, "level").upper()
        if level not in LOG_LEVELS:
            raise RpcError(INVALID_PARAMS, f"level: expected one of {', '.join(LOG_LEVELS)}, "
                           f"got {params['level']!r}")
        logging.getLogger().setLevel(level)
        log.warning("log level set to %s by the management socket", level)
        return {"level": level}

    async def process_stats(self, params: dict[str, Any]) -> dict[str, Any]:
        _allowed(params, "reset")
        return {"pid": os.getpid(), "gc": GC_STATS.snapshot(_reset_flag(params))}

    async def version(self, params: dict[str, Any]) -> dict[str, Any]:
        _allowed(params)
        return {"version": vhostmem.__version__, "methods": sorted(self.table)}


def _reset_flag(params: dict[str, Any]) -> bool:
    reset = params.get("reset", False)
    if not isinstance(reset, bool):
        raise RpcError(INVALID_PARAMS, f"reset: expected true or false, got {reset!r}")
    return reset


def _allowed(params: dict[str, Any], *names: str) -> None:
    unknown = sorted(set(params) - set(names))
    if unknown:
        accepted = ", ".join(names) or "none"
        raise RpcError(INVALID_PARAMS, f"unknown parameter {unknown[0]!r} (parameters: "
                       f"{accepted})")


def _required_str(params: dict[str, Any], key: str) -> str:
    if key not in params:
        raise RpcError(INVALID_PARAMS, f"{key}: missing")
    value = params[key]
    if not isinstance(value, str):
        raise RpcError(INVALID_PARAMS, f"{key}: expected a string, got "
                       f"{type(value).__name__} {value!r}")
    return value
