"""The control channel against a scripted backend on a real Unix socket (backend in client
mode: the frontend listens), for what qemu-storage-daemon does not offer: STATUS, RESET_DEVICE,
refused REPLY_ACKs, silence and disconnects."""

from __future__ import annotations

import pytest

from protocol import FrontendRequest, Message, ProtocolFeature, encode_reply
from tests.vhostmem.frontend.scripted import HANG_UP, Responder
from vhostmem.frontend.client import VhostUserClient, VhostUserError

REPLY_ACK_MASK = 1 << ProtocolFeature.REPLY_ACK
STATUS_VALUE = 0xF


def _ack_all(status: int) -> Responder:
    def respond(msg: Message) -> bytes | None:
        if msg.request == FrontendRequest.GET_PROTOCOL_FEATURES:
            return encode_reply(msg.request, REPLY_ACK_MASK | 1 << ProtocolFeature.STATUS)
        if msg.request == FrontendRequest.GET_STATUS:
            return encode_reply(msg.request, STATUS_VALUE)
        return encode_reply(msg.request, status) if msg.need_reply else None
    return respond


def test_status_reset_and_reply_ack_through_listener(scripted) -> None:
    client, seen = scripted(_ack_all(0))
    client.set_protocol_features(client.get_protocol_features())
    client.set_status(STATUS_VALUE)
    client.reset_device()
    assert client.get_status() == STATUS_VALUE
    requests = [m.request for m in seen]
    assert requests == [FrontendRequest.GET_PROTOCOL_FEATURES,
                        FrontendRequest.SET_PROTOCOL_FEATURES, FrontendRequest.SET_STATUS,
                        FrontendRequest.RESET_DEVICE, FrontendRequest.GET_STATUS]
    assert [m.need_reply for m in seen] == [False, False, True, True, False]
    assert seen[2].payload == STATUS_VALUE


def test_refused_ack_names_the_request(scripted) -> None:
    client, _ = scripted(_ack_all(1))
    client.set_protocol_features(REPLY_ACK_MASK)
    with pytest.raises(VhostUserError, match="refused SET_VRING_NUM"):
        client.set_vring_num(0, 128)


def test_silent_backend_times_out(scripted) -> None:
    client, _ = scripted(lambda msg: None)
    with pytest.raises(TimeoutError, match="no message"):
        client.get_features()


def test_disconnect_is_reported(scripted) -> None:
    client, _ = scripted(lambda msg: HANG_UP)
    with pytest.raises(VhostUserError, match="closed the connection"):
        client.get_features()


def test_wrong_reply_is_rejected(scripted) -> None:
    client, _ = scripted(lambda msg: encode_reply(FrontendRequest.GET_QUEUE_NUM, 1))
    with pytest.raises(VhostUserError, match="expected a reply to GET_FEATURES"):
        client.get_features()


def test_connect_to_missing_socket_fails_clearly(tmp_path) -> None:
    with pytest.raises(VhostUserError, match="no vhost-user backend listening"):
        VhostUserClient.connect(str(tmp_path / "absent.sock"), timeout=0.1)
