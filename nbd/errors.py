"""NBD errors: a broken or hostile peer (:class:`NbdProtocolError`), an option the server
refused (:class:`NbdOptionError`)."""

from __future__ import annotations


class NbdError(Exception):
    """Anything that ends an NBD connection or handshake."""


class NbdProtocolError(NbdError):
    """The peer broke the NBD protocol; ``reason`` names what was wrong. The connection cannot
    go on (the byte stream is no longer understood)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NbdOptionError(NbdError):
    """The server answered an option with an error reply (``NBD_REP_ERR_*``)."""

    def __init__(self, option: str, reply_type: int, name: str, message: str) -> None:
        text = f"server refused {option}: {name}"
        if message:
            text += f" ({message})"
        super().__init__(text)
        self.option = option
        self.reply_type = reply_type
        self.name = name
        self.message = message
