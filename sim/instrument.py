"""A simulated STM that scans synthetic surfaces and streams them over the protocol.

It behaves like a driver: scan_start, then the plan's rows in acquisition order (forward and
backward line per row, one row per line time), then scan_end, with heartbeats. Before the lines
of a frame it publishes, on the `truth` topic, what a full scan would have recorded (`Z`,
`Current`), the ideal topography (`clean`) and the per-line tip-state labels (`tip_state`), so
demos and tests can score themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import zmq

from stm_live.drivers.publisher import InstrumentPublisher
from stm_live.plans import parse_plan
from stm_live.protocol import ChannelInfo, ScanStart
from stm_live.sim.frames import SimFrame, random_spec, simulate_frame

log = logging.getLogger(__name__)

CHANNELS = (ChannelInfo("Z", "m", "float32"), ChannelInfo("Current", "A", "float32"))
NM = 1e-9


class SimInstrument:
    """Publishes `frames` simulated scans; each frame is drawn from (seed, frame index).

    With `line_rate_hz = 0` each frame is streamed at its own simulated line time (0.05-0.5 s per
    line, as on a conventional STM); a positive rate overrides it (demos, tests, video rate).
    """

    def __init__(self, endpoint: str, *, size: int = 256, plan: str = "lines:4", line_rate_hz: float = 0.0,
                 seed: int = 0, surface: str = "si111_7x7", tip: str = "good", frame_nm: float = 0.0,
                 bias_v: float | None = None, artefacts: bool = True, context: zmq.Context | None = None) -> None:
        self.publisher = InstrumentPublisher(endpoint, source="stm-live-sim", context=context)
        self.plan = parse_plan(plan)
        self.size = size
        self.line_rate_hz = line_rate_hz
        self.seed = seed
        self.surface = surface
        self.tip = tip
        self.frame_nm = frame_nm or None
        self.bias_v = bias_v
        self.artefacts = artefacts

    def frame(self, index: int) -> SimFrame:
        rng = np.random.default_rng([self.seed, index])
        spec = random_spec(rng, self.size, surface=self.surface, scenario=self.tip, frame_nm=self.frame_nm,
                           bias_v=self.bias_v, artefacts=self.artefacts)
        return simulate_frame(spec, rng)

    def run(self, frames: int, wait_subscriber_s: float = 10.0, should_stop: Callable[[], bool] = lambda: False,
            wait_topics: Sequence[str] = ("line",)) -> int:
        """Scan `frames` frames; returns the number of line messages sent."""
        if wait_subscriber_s and not self.publisher.wait_for_subscriber(wait_subscriber_s, wait_topics):
            log.warning("no subscriber to %s after %.1f s; scanning anyway", "/".join(wait_topics), wait_subscriber_s)
        sent = 0
        for index in range(frames):
            if should_stop():
                break
            sent += self.scan(f"sim-{self.seed}-{index:04d}", self.frame(index), should_stop)
        return sent

    def scan(self, uid: str, frame: SimFrame, should_stop: Callable[[], bool]) -> int:
        spec = frame.spec
        direction = spec.scan.scan_direction
        period = 1.0 / self.line_rate_hz if self.line_rate_hz else spec.scan.line_time_s
        mask = self.plan.mask(self.size, self.size, direction)
        z = (frame.measurement.z * NM).astype(np.float32)
        current = frame.measurement.current.astype(np.float32)
        pub = self.publisher
        pub.truth(uid, ["Z", "Current", "clean", "tip_state"],
                  [z[0], current[0], (frame.clean_nm * NM).astype(np.float32), frame.measurement.tip_state])
        pub.scan_start(ScanStart(
            uid=uid, instrument="stm-live-sim", channels=CHANNELS, rows=self.size, cols=self.size,
            size_nm=(spec.frame_nm, spec.frame_nm), scan_direction=direction, plan=str(self.plan),
            line_directions=("forward", "backward"), line_time_s=period,
            bias_v=spec.bias_v, setpoint_a=spec.scan.setpoint_a, t=time.time(),
            extra={"surface": spec.surface, "tip_scenario": spec.scenario.name, "simulated": True},
        ))
        start = time.perf_counter()
        next_heartbeat = start
        sent = 0
        for i, row in enumerate(self.plan.row_order(self.size, self.size, direction)):
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
            for trace, direction_name in ((0, "forward"), (1, "backward")):
                pub.line(uid, int(row), direction_name, CHANNELS, [z[trace, row, cols], current[trace, row, cols]])
                sent += 1
        pub.scan_end(uid, "complete")
        return sent

    def close(self) -> None:
        self.publisher.close()
