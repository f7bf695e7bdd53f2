"""The NBD wire format, sans-IO (no sockets, no asyncio): the client handshake
(:mod:`nbd.handshake`), the transmission phase (:mod:`nbd.transmission`), NBD URIs
(:mod:`nbd.uri`). Constants are named as in the NBD protocol document (:mod:`nbd.constants`)."""

from nbd.errors import NbdError, NbdOptionError, NbdProtocolError
from nbd.handshake import ClientHandshake, ExportInfo
from nbd.transmission import Completed, Transmission, encode_request
from nbd.uri import NbdAddress, NbdUriError, parse_nbd_uri

__all__ = [
    "ClientHandshake",
    "Completed",
    "ExportInfo",
    "NbdAddress",
    "NbdError",
    "NbdOptionError",
    "NbdProtocolError",
    "NbdUriError",
    "Transmission",
    "encode_request",
    "parse_nbd_uri",
]
