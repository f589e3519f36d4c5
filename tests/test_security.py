"""Loopback by default; CURVE with an allow-list: strangers can neither inject, listen nor act."""

import threading
import time

import numpy as np
import pytest
import zmq
import zmq.auth

from stm_live.demo import free_tcp_endpoint
from stm_live.drivers.actions import ActionClient, ActionError, ActionServer
from stm_live.drivers.conditioning import ConditioningGate, ConditioningLimits
from stm_live.drivers.publisher import InstrumentPublisher
from stm_live.protocol import Decoder, Heartbeat
from stm_live.security import Security, SecurityError, generate_keys, is_loopback

from conftest import CHANNELS, Harness, scan_start, wait_for


@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp://127.0.0.1:5550", True), ("tcp://localhost:1", True), ("tcp://[::1]:5550", True),
    ("tcp://127.0.0.1:*", True), ("inproc://x", True), ("ipc:///tmp/x", True),
    ("tcp://0.0.0.0:5550", False), ("tcp://*:5550", False), ("tcp://192.168.1.20:5550", False),
    ("tcp://eth0:5550", False), ("udp://127.0.0.1:5", False),
])
def test_loopback_is_recognised(endpoint, loopback):
    assert is_loopback(endpoint) is loopback


def test_remote_binds_need_curve():
    context = zmq.Context()
    sock = context.socket(zmq.PUB)
    with pytest.raises(SecurityError, match="not loopback"):
        Security().bind(sock, "tcp://0.0.0.0:0")
    with pytest.raises(SecurityError, match="not loopback"):
        InstrumentPublisher("tcp://*:0", "x", context=context)
    sock.close(0)
    context.destroy(linger=0)


@pytest.fixture
def keys(tmp_path):
    generate_keys(tmp_path / "keys")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    zmq.auth.create_certificates(str(stranger), "server")
    zmq.auth.create_certificates(str(stranger), "client")
    (stranger / "authorized").mkdir()
    return tmp_path / "keys", stranger


def received(sock: zmq.Socket, seconds: float) -> list:
    deadline, out = time.monotonic() + seconds, []
    while time.monotonic() < deadline:
        if sock.poll(50):
            out.append(Decoder().decode(sock.recv_multipart()))
    return out


def test_curve_daemon_serves_only_allowed_clients_and_trusts_only_its_instrument(settings, keys):
    good, stranger = keys
    settings.security.curve, settings.security.keys_dir = True, str(good)
    context, elsewhere = zmq.Context(), zmq.Context()
    impostor_keys = Security(stranger)
    impostor = InstrumentPublisher(settings.daemon.input, "impostor", context=elsewhere, security=impostor_keys)
    h = Harness(settings, context, with_publisher=False)
    h.listener.close()
    h.thread.start()
    assert h.daemon.wait_ready(10)
    try:
        impostor.wait_for_subscriber(1.0)  # the daemon's handshake fails: it never subscribes here
        start = scan_start("injected")
        impostor.scan_start(start)
        for row in range(8):
            impostor.line("injected", row, "forward", CHANNELS, [np.zeros(32, np.float32)] * 2)
        time.sleep(0.5)
        assert h.daemon.counters["received"] == 0

        listeners = {}
        for name, where in (("no keys", None), ("unlisted keys", stranger), ("allowed keys", good)):
            sock = context.socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, b"heartbeat")
            sock.setsockopt(zmq.LINGER, 0)
            (Security(where) if where else Security()).connect(sock, settings.daemon.output)
            listeners[name] = sock
        heard = {name: received(sock, 1.5) for name, sock in listeners.items()}
        assert heard["no keys"] == [] and heard["unlisted keys"] == []
        assert any(isinstance(m, Heartbeat) for m in heard["allowed keys"])
        for sock in listeners.values():
            sock.close()
    finally:
        impostor.close(linger_s=0)
        impostor_keys.close()
        h.daemon.stop()
        h.thread.join(30)
        context.destroy(linger=0)
        elsewhere.destroy(linger=0)


def test_curve_action_channel_answers_only_allowed_clients(keys):
    good, stranger = keys
    context = zmq.Context()
    gate = ConditioningGate(ConditioningLimits(dry_run=True, min_interval_s=0))
    endpoint = free_tcp_endpoint()
    server_keys = Security(good)
    server = ActionServer(endpoint, gate, lambda request: None, context, server_keys)
    request = {"action": "bias_pulse", "bias_v": 1.0, "width_s": 0.01}
    try:
        for who in (Security(), Security(stranger)):
            client = ActionClient(endpoint, 0.5, context, who)
            with pytest.raises(ActionError, match="no reply"):
                client.request(request, "stranger")
            client.close()
        server.poll(200)
        assert gate.log == []
        allowed = ActionClient(endpoint, 5.0, context, Security(good))
        replies = []
        thread = threading.Thread(target=lambda: replies.append(allowed.request(request, "operator")))
        thread.start()
        wait_for(lambda: server.poll(50) > 0 or not thread.is_alive(), 10, "the allowed request")
        thread.join(10)
        allowed.close()
        assert replies == [{"outcome": "dry_run", "detail": "within limits; dry run, nothing executed"}]
        assert [entry["origin"] for entry in gate.log] == ["operator"]
    finally:
        server.close()
        server_keys.close()
        context.destroy(linger=0)


def test_missing_keys_are_named(tmp_path):
    context = zmq.Context()
    sock = context.socket(zmq.PUB)
    with pytest.raises(SecurityError, match="stm-live keys"):
        Security(tmp_path / "nowhere").bind(sock, "tcp://127.0.0.1:0")
    sock.close(0)
    context.destroy(linger=0)
