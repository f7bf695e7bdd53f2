"""The NBD wire format, sans-IO (no sockets, no asyncio): the client handshake
(:mod:`nbd.handshake`), requests (:mod:`nbd.requests`), the transmission phase
(:mod:`nbd.transmission`, with the chunk checks of :mod:`nbd.chunks`), NBD URIs
(:mod:`nbd.uri`). Constants are named as in the NBD protocol document (:mod:`nbd.constants`)."""

from nbd.errors import NbdError, NbdOptionError, NbdProtocolError
from nbd.handshake import ClientHandshake, ExportInfo
from nbd.requests import REQUEST_SIZE, Request, encode_request
from nbd.transmission import Transmission
from nbd.uri import NbdAddress, NbdUriError, parse_nbd_uri

__all__ = [
    "REQUEST_SIZE",
    "ClientHandshake",
    "ExportInfo",
    "NbdAddress",
    "NbdError",
    "NbdOptionError",
    "NbdProtocolError",
    "NbdUriError",
    "Request",
    "Transmission",
    "encode_request",
    "parse_nbd_uri",
]
