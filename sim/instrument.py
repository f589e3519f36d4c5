"""A simulated STM that scans synthetic surfaces and streams them over the protocol.

It behaves like a driver: scan_start, then the plan's rows in acquisition order (forward and
backward line per row, one row per 1/line_rate seconds), then scan_end, with heartbeats. The
full-resolution frame a `full` scan would have measured is published first on the `truth`
topic, so demos and tests can score reconstructions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import zmq

from stm_live.drivers.publisher import InstrumentPublisher
from stm_live.plans import parse_plan
from stm_live.protocol import ChannelInfo, ScanStart
from stm_live.sim.surface import SurfaceParams, hexagonal_surface

log = logging.getLogger(__name__)

CHANNELS = (ChannelInfo("Z", "m", "float32"), ChannelInfo("Current", "A", "float32"))
BIAS_V = 1.5
SETPOINT_A = 50e-12


@dataclass(frozen=True)
class SimScan:
    """One simulated frame: what a full scan measures, per direction and channel."""

    forward: tuple[np.ndarray, np.ndarray]
    backward: tuple[np.ndarray, np.ndarray]


def simulate_scan(params: SurfaceParams, noise_pm: float, rng: np.random.Generator) -> SimScan:
    """Z (m) and Current (A) for forward and backward traces of one frame."""
    topo = hexagonal_surface(params, rng)
    slope = np.gradient(topo, axis=1)
    slope /= max(np.abs(slope).max(), 1e-30)

    def trace() -> tuple[np.ndarray, np.ndarray]:
        z = topo + rng.normal(0, noise_pm * 1e-12, topo.shape)
        current = SETPOINT_A * (1 + 0.05 * slope + rng.normal(0, 0.01, topo.shape))
        return z.astype(np.float32), current.astype(np.float32)

    return SimScan(trace(), trace())


class SimInstrument:
    """Publishes `frames` simulated scans at `line_rate_hz` rows per second."""

    def __init__(self, endpoint: str, *, size: int = 256, plan: str = "lines:4", line_rate_hz: float = 200.0,
                 seed: int = 0, frame_nm: float = 10.0, lattice_nm: float = 0.77, noise_pm: float = 3.0,
                 context: zmq.Context | None = None) -> None:
        self.publisher = InstrumentPublisher(endpoint, source="stm-live-sim", context=context)
        self.plan = parse_plan(plan)
        self.size = size
        self.line_rate_hz = line_rate_hz
        self.seed = seed
        self.params = SurfaceParams(size_px=size, frame_nm=frame_nm, lattice_nm=lattice_nm)
        self.noise_pm = noise_pm

    def run(self, frames: int, wait_subscriber_s: float = 10.0, should_stop: Callable[[], bool] = lambda: False,
            wait_topics: Sequence[str] = ("line",)) -> int:
        """Scan `frames` frames; returns the number of line messages sent."""
        if wait_subscriber_s and not self.publisher.wait_for_subscriber(wait_subscriber_s, wait_topics):
            log.warning("no subscriber to %s after %.1f s; scanning anyway", "/".join(wait_topics), wait_subscriber_s)
        rng = np.random.default_rng(self.seed)
        sent = 0
        for index in range(frames):
            if should_stop():
                break
            sent += self.scan(f"sim-{self.seed}-{index:04d}", rng, should_stop)
        return sent

    def scan(self, uid: str, rng: np.random.Generator, should_stop: Callable[[], bool]) -> int:
        scan = simulate_scan(self.params, self.noise_pm, rng)
        mask = self.plan.mask(self.size, self.size, "down")
        pub = self.publisher
        pub.truth(uid, [c.name for c in CHANNELS], scan.forward)
        pub.scan_start(ScanStart(
            uid=uid, instrument="stm-live-sim", channels=CHANNELS, rows=self.size, cols=self.size,
            size_nm=(self.params.frame_nm, self.params.frame_nm), scan_direction="down", plan=str(self.plan),
            line_directions=("forward", "backward"), line_time_s=1.0 / self.line_rate_hz,
            bias_v=BIAS_V, setpoint_a=SETPOINT_A, t=time.time(),
            extra={"surface": "hexagonal", "lattice_nm": self.params.lattice_nm, "noise_pm": self.noise_pm},
        ))
        period = 1.0 / self.line_rate_hz
        start = time.perf_counter()
        next_heartbeat = start
        sent = 0
        for i, row in enumerate(self.plan.row_order(self.size, self.size, "down")):
            if should_stop():
                pub.scan_end(uid, "aborted")
                return sent
            delay = start + i * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if time.perf_counter() >= next_heartbeat:
                pub.heartbeat()
                next_heartbeat += 1.0
            cols = mask[row]
            for direction, traces in (("forward", scan.forward), ("backward", scan.backward)):
                pub.line(uid, int(row), direction, CHANNELS, [t[row, cols] for t in traces])
                sent += 1
        pub.scan_end(uid, "complete")
        return sent

    def close(self) -> None:
        self.publisher.close()
