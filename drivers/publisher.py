"""The instrument side of the wire: what every driver uses to publish scans."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import zmq

from stm_live.protocol import ChannelInfo, Heartbeat, Line, ScanEnd, ScanStart, Truth, encode
from stm_live.security import LOOPBACK_ONLY, Security

log = logging.getLogger(__name__)


class InstrumentPublisher:
    """Binds an XPUB socket and publishes scan_start / line / scan_end / heartbeat messages.

    XPUB (rather than PUB) lets a driver wait until a subscriber has joined, so the first
    scan_start of a session is not lost to ZeroMQ's late-joiner gap.
    """

    def __init__(self, endpoint: str, source: str, context: zmq.Context | None = None,
                 sndhwm: int = 1_000_000, security: Security = LOOPBACK_ONLY) -> None:
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.SNDHWM, sndhwm)
        self.socket.setsockopt(zmq.LINGER, 2000)
        security.bind(self.socket, endpoint)
        self.source = source
        self.subscriptions: set[bytes] = set()
        self._seq: dict[str, int] = {}
        self._heartbeat_seq = 0

    def _drain_subscriptions(self, timeout_ms: int) -> None:
        while self.socket.poll(timeout_ms, zmq.POLLIN):
            event = self.socket.recv()
            if event[:1] == b"\x01":
                self.subscriptions.add(event[1:])
            elif event[:1] == b"\x00":
                self.subscriptions.discard(event[1:])
            timeout_ms = 0

    def wait_for_subscriber(self, timeout_s: float, topics: Sequence[str] = ("line",)) -> bool:
        """Block until every topic has a subscriber (to it or a prefix of it); False on timeout."""
        deadline = time.monotonic() + timeout_s
        wanted = [t.encode() for t in topics]
        while True:
            if all(any(t.startswith(s) for s in self.subscriptions) for t in wanted):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._drain_subscriptions(int(min(left, 0.1) * 1000) + 1)

    def send(self, msg) -> None:
        self.socket.send_multipart(encode(msg), copy=False)

    def scan_start(self, start: ScanStart) -> None:
        self._seq[start.uid] = 0
        self.send(start)

    def line(self, uid: str, row: int, direction: str, channels: Sequence[ChannelInfo],
             values: Sequence[np.ndarray]) -> None:
        seq = self._seq.get(uid, 0)
        self._seq[uid] = seq + 1
        self.send(Line(uid, seq, row, direction, time.time(), tuple(c.name for c in channels), tuple(values)))

    def scan_end(self, uid: str, reason: str = "complete") -> None:
        self._seq.pop(uid, None)
        self.send(ScanEnd(uid, reason, time.time()))

    def heartbeat(self) -> None:
        self.send(Heartbeat(self.source, self._heartbeat_seq, time.time()))
        self._heartbeat_seq += 1

    def truth(self, uid: str, channels: Sequence[str], frames: Sequence[np.ndarray]) -> None:
        self.send(Truth(uid, tuple(channels), tuple(frames), time.time()))

    def close(self, linger_s: float = 2.0) -> None:
        """Close, waiting up to `linger_s` for queued messages to be delivered (None: until done)."""
        self.socket.close(linger=-1 if linger_s is None else int(linger_s * 1000))
