"""Shared harness: a real daemon on loopback TCP, a real instrument publisher, real files."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from stm_live.config import Settings
from stm_live.daemon import Daemon
from stm_live.demo import free_tcp_endpoint
from stm_live.drivers.publisher import InstrumentPublisher
from stm_live.protocol import TYPES, ChannelInfo, Decoder, Frame, Message, ScanStart, Status


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Listener:
    """Subscribes to the daemon's output and keeps every decoded message and the topic it came
    on: every message type, and the viewers' paced `view:` copies of the frames only if asked.
    Its receive queue is unbounded (set before connecting, when ZeroMQ applies it): a test that
    pumps late still gets every message the daemon sent it."""

    def __init__(self, context: zmq.Context, endpoint: str, topics: tuple[str, ...] = TYPES) -> None:
        self.sock = context.socket(zmq.SUB)
        for topic in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(endpoint)
        self.decoder = Decoder()
        self.messages: list[Message] = []
        self.topics: list[str] = []

    def pump(self, seconds: float = 0.05) -> None:
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if not self.sock.poll(max(0, int(left * 1000))):
                return
            frames = self.sock.recv_multipart()
            self.messages.append(self.decoder.decode(frames))
            self.topics.append(frames[0].decode())

    def until(self, predicate: Callable[[list[Message]], bool], timeout: float = 30.0, what: str = "messages") -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {len(self.messages)} messages")
            self.pump(0.05)

    def frames(self, **match) -> list[Frame]:
        return [m for m in self.messages if isinstance(m, Frame)
                and all(getattr(m, k) == v for k, v in match.items())]

    def last_status(self) -> Status | None:
        statuses = [m for m in self.messages if isinstance(m, Status)]
        return statuses[-1] if statuses else None

    def close(self) -> None:
        self.sock.close()


class Harness:
    def __init__(self, settings: Settings, context: zmq.Context, with_publisher: bool = True) -> None:
        self.settings = settings
        self.context = context
        self.daemon = Daemon(settings, context)
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)
        self.listener = Listener(context, settings.daemon.output)
        self.publisher = (InstrumentPublisher(settings.daemon.input, "test-instrument", context=context)
                          if with_publisher else None)

    def start(self) -> Harness:
        """Start the daemon and wait until it serves; if it does not, stop what was started, so
        no socket is left open to block the context's termination (and the test run) forever."""
        self.thread.start()
        try:
            assert self.daemon.wait_ready(10), "the daemon was not ready within 10 s"
            if self.publisher is not None:
                assert self.publisher.wait_for_subscriber(10), "the daemon did not subscribe within 10 s"
            self.listener.until(lambda ms: any(m.type == "heartbeat" for m in ms), what="daemon heartbeat")
        except BaseException:
            self.stop()
            raise
        return self

    def status_after(self, predicate: Callable[[Status], bool], timeout: float = 20.0) -> Status:
        def ok(messages: list[Message]) -> bool:
            status = self.listener.last_status()
            return status is not None and predicate(status)
        self.listener.until(ok, timeout, "status")
        return self.listener.last_status()

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(60)
        self.listener.close()
        if self.publisher is not None:
            self.publisher.close(linger_s=0)


@pytest.fixture
def settings(tmp_path) -> Settings:
    s = Settings()
    s.daemon.input = free_tcp_endpoint()
    s.daemon.output = free_tcp_endpoint()
    s.daemon.record_dir = str(tmp_path / "rec")
    s.daemon.heartbeat_interval_s = 0.1
    s.daemon.status_interval_s = 0.1
    s.daemon.reconstruct_every_lines = 8
    return s


# Test contexts end with destroy(linger=0), not term(): term() waits for every socket to be
# closed, so a test failing with one open (a REQ socket mid-exchange, a daemon that never
# started) would hang the whole run instead of reporting the failure.


@pytest.fixture
def harness(settings) -> Iterator[Harness]:
    context = zmq.Context()
    h = Harness(settings, context).start()
    try:
        yield h
    finally:
        h.stop()
        context.destroy(linger=0)


CHANNELS = (ChannelInfo("Z", "m", "float32"), ChannelInfo("Current", "A", "float32"))
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


def scan_start(uid: str, rows: int = 32, cols: int = 32, plan: str = "full",
               directions: tuple[str, ...] = ("forward",), scan_direction: str = "down") -> ScanStart:
    return ScanStart(uid, "test", CHANNELS, rows, cols, (5.0, 5.0), scan_direction, plan, directions,
                     0.01, 1.0, 1e-10, time.time())


def make_frame(rows: int = 32, cols: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth lattice-like frame, float32."""
    y, x = np.mgrid[0:rows, 0:cols]
    rng = np.random.default_rng(seed)
    return (np.sin(x / 3.0 + rng.uniform(0, 6)) * np.cos(y / 4.0) + 0.01 * rng.normal(size=(rows, cols))).astype(np.float32)


def run_scan(harness, uid, frame, rows=None, end=True):
    """A scan of `frame`'s shape: its first `rows` rows (all by default), forward, then its end."""
    pub = harness.publisher
    pub.scan_start(scan_start(uid, rows=frame.shape[0], cols=frame.shape[1]))
    for row in range(frame.shape[0] if rows is None else rows):
        pub.line(uid, row, "forward", CHANNELS, [frame[row], frame[row]])
    if end:
        pub.scan_end(uid)
