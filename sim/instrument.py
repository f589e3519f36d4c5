"""A simulated STM that scans synthetic surfaces and streams them over the protocol.

It behaves like a driver: scan_start, then the plan's rows in acquisition order (forward and
backward line per row, one row per line time), then scan_end, with heartbeats. Before the lines
of a frame it publishes, on the `truth` topic, what a full scan would have recorded (`Z`,
`Current`), the ideal topography (`clean`) and the per-line tip-state labels (`tip_state`), so
demos and tests can score themselves.

With the `episode` tip, one tip lives on from frame to frame: a good tip may degrade during a
frame and stays degraded until conditioned. Conditioning requests arrive on the action channel
(drivers/actions.py), are checked against the instrument's limits, and an executed one ends the
current frame (the instrument moves on to a fresh area, as a user would after a pulse) and
restores, blunts, multiplies or leaves the tip with the configured chances.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import zmq

from stm_live.drivers.actions import ActionServer
from stm_live.drivers.conditioning import ConditioningGate
from stm_live.drivers.publisher import InstrumentPublisher
from stm_live.plans import parse_plan
from stm_live.protocol import ChannelInfo, ScanStart
from stm_live.security import LOOPBACK_ONLY, Security
from stm_live.sim import tip as tips
from stm_live.sim.frames import SimFrame, random_spec, simulate_frame
from stm_live.sim.scan import acquisition_rows, episode_scenario, tip_at

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
                 bias_v: float | None = None, artefacts: bool = True, context: zmq.Context | None = None,
                 actions: str = "", gate: ConditioningGate | None = None, degrade_probability: float = 0.3,
                 pulse_outcomes: Sequence[float] = (0.55, 0.15, 0.15, 0.15), security: Security = LOOPBACK_ONLY) -> None:
        self.publisher = InstrumentPublisher(endpoint, source="stm-live-sim", context=context, security=security)
        self.plan = parse_plan(plan)
        self.size = size
        self.line_rate_hz = line_rate_hz
        self.seed = seed
        self.surface = surface
        self.tip = tip
        self.frame_nm = frame_nm or None
        self.bias_v = bias_v
        self.artefacts = artefacts
        self.tip_rng = np.random.default_rng([seed, 1_000])
        self.episode_tip = tips.good_tip(self.tip_rng) if tip == "episode" else None
        self.degrade_probability = degrade_probability
        self.pulse_outcomes = np.asarray(pulse_outcomes, float) / np.sum(pulse_outcomes)
        self.actions = ActionServer(actions, gate, self._condition, context, security) if actions and gate else None
        self.conditioned: list[dict] = []
        self._scanning: tuple[SimFrame, int] | None = None
        self._interrupted = False

    def frame(self, index: int) -> SimFrame:
        rng = np.random.default_rng([self.seed, index])
        scenario = "good" if self.episode_tip is not None else self.tip
        spec = random_spec(rng, self.size, surface=self.surface, scenario=scenario, frame_nm=self.frame_nm,
                           bias_v=self.bias_v, artefacts=self.artefacts)
        if self.episode_tip is not None:
            spec = replace(spec, scenario=episode_scenario(self.episode_tip, self.size, self.tip_rng,
                                                           self.degrade_probability, spec.frame_nm))
            self.episode_tip = spec.scenario.segments[-1].tip
        return simulate_frame(spec, rng)

    def _condition(self, request: dict) -> None:
        """An accepted action on the episode tip: a new tip from the next frame on."""
        if self.episode_tip is None:
            raise RuntimeError("this simulated instrument has no episode tip to condition")
        current = self.episode_tip
        if self._scanning is not None:
            frame, index = self._scanning
            current = tip_at(frame.spec.scenario, index)
        outcome = str(self.tip_rng.choice(["restored", "blunt", "multi", "unchanged"], p=self.pulse_outcomes))
        makers = {"restored": tips.good_tip, "blunt": tips.blunt_tip, "multi": tips.multi_tip}
        self.episode_tip = makers[outcome](self.tip_rng) if outcome in makers else current
        self.conditioned.append({"request": dict(request), "before": current.state, "outcome": outcome,
                                 "after": self.episode_tip.state})
        self._interrupted = True
        log.warning("simulated tip conditioned by %s: %s -> %s (%s)", request, current.state,
                    self.episode_tip.state, outcome)

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
        acquired = np.argsort(acquisition_rows(self.size, direction))
        self._interrupted = False
        for i, row in enumerate(self.plan.row_order(self.size, self.size, direction)):
            if self.actions is not None:
                self._scanning = (frame, int(acquired[row]))
                self.actions.poll()
            if should_stop() or self._interrupted:
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

    def close(self, linger_s: float = 60.0) -> None:
        """Stop; lines still queued for a subscriber that lags get up to `linger_s` to be delivered."""
        if self.actions is not None:
            self.actions.close()
        self.publisher.close(linger_s)
