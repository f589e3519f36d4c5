"""The scan process: how a constant-current image of a surface becomes the recorded lines.

Each pixel is measured at a time t on the fast (x) and slow (y) axes; where the tip actually is
at t includes the piezo calibration error (x and y scale, shear), thermal drift (constant
velocity), piezo creep after the frame was moved
(exponentially decaying displacement), a hysteresis offset of the backward trace, and random
line-to-line misalignment. The feedback loop follows the height with a second-order response
(ringing after steep steps), and the tracking error appears in the current channel. Noise is
white plus 1/f in time. Tip scenarios switch the tip at a line (a height step, a few streaky
lines, then another resolution) or make it unstable (spikes, noisy lines, jumps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import fft

from stm_live.sim import tip as tips
from stm_live.sim.kernels import sample_scan, second_order
from stm_live.sim.surfaces import Topography
from stm_live.sim.tip import KAPPA_PER_NM, STATE_CODE, Tip


@dataclass(frozen=True)
class ScanSettings:
    line_time_s: float = 0.2
    scan_direction: str = "down"
    drift_nm_per_s: tuple[float, float] = (0.0, 0.0)
    creep_nm: tuple[float, float] = (0.0, 0.0)
    creep_tau_s: float = 10.0
    hysteresis_nm: float = 0.0
    calibration: tuple[float, float, float] = (1.0, 1.0, 0.0)
    misalign_probability: float = 0.0
    misalign_sigma_px: float = 0.8
    white_noise_nm: float = 0.002
    flicker_noise_nm: float = 0.002
    feedback_period_px: float = 6.0
    feedback_damping: float = 0.5
    start_s: float = 0.0  # time since drift and creep began: successive frames of one area start later
    setpoint_a: float = 50e-12
    current_noise: float = 0.02

    def describe(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class TipSegment:
    """From `start_row` on (in acquisition order) the scan uses `tip`; `unstable` adds events."""

    start: int
    tip: Tip
    unstable: bool = False
    height_step_nm: float = 0.0
    streak_lines: int = 0


@dataclass(frozen=True)
class TipScenario:
    name: str
    segments: tuple[TipSegment, ...]
    event_probability: float = 0.3

    def describe(self) -> dict:
        return {"name": self.name, "event_probability": self.event_probability,
                "segments": [{"start": s.start, "tip": s.tip.describe(), "unstable": s.unstable,
                              "height_step_nm": s.height_step_nm, "streak_lines": s.streak_lines}
                             for s in self.segments]}


SCENARIOS = ("good", "blunt", "multi", "unstable", "change")


def random_scenario(name: str, rows: int, rng: np.random.Generator, frame_nm: float = 10.0) -> TipScenario:
    """A tip history for one frame of the named kind."""
    if name in tips.TIP_MAKERS:
        return TipScenario(name, (TipSegment(0, tips.TIP_MAKERS[name](rng, frame_nm=frame_nm)),))
    if name == "unstable":
        base = tips.good_tip(rng) if rng.random() < 0.7 else tips.blunt_tip(rng)
        return TipScenario(name, (TipSegment(0, base, unstable=True),), float(rng.uniform(0.15, 0.5)))
    if name == "change":
        before = tips.good_tip(rng)
        after = tips.TIP_MAKERS[str(rng.choice(["blunt", "multi", "good"], p=[0.45, 0.45, 0.1]))](rng, frame_nm=frame_nm)
        at = int(rng.integers(rows // 5, 4 * rows // 5))
        step = float(rng.choice([-1, 1]) * rng.uniform(0.05, 0.3))
        return TipScenario(name, (TipSegment(0, before), TipSegment(at, after, height_step_nm=step,
                                                                       streak_lines=int(rng.integers(1, 5)))))
    raise ValueError(f"unknown tip scenario {name!r}; expected one of {SCENARIOS}")


def episode_scenario(tip: Tip, rows: int, rng: np.random.Generator, degrade_probability: float,
                     frame_nm: float = 10.0) -> TipScenario:
    """One frame of a tip that lives on between frames: a good tip degrades (blunt or multi) at a
    random row with `degrade_probability`; a degraded one stays as it is until conditioned."""
    if tip.state != "good" or rng.random() >= degrade_probability:
        return TipScenario(tip.state, (TipSegment(0, tip),))
    after = tips.TIP_MAKERS[str(rng.choice(["blunt", "multi"]))](rng, frame_nm=frame_nm)
    at = int(rng.integers(rows // 5, 4 * rows // 5))
    step = float(rng.choice([-1, 1]) * rng.uniform(0.05, 0.3))
    return TipScenario("change", (TipSegment(0, tip), TipSegment(at, after, height_step_nm=step,
                                                               streak_lines=int(rng.integers(1, 5)))))


def tip_at(scenario: TipScenario, index: int) -> Tip:
    """The tip scanning the index-th acquired row."""
    return [s.tip for s in scenario.segments if s.start <= index][-1]


def random_settings(rng: np.random.Generator, rows: int, pixel_nm: float) -> ScanSettings:
    """Artefact strengths drawn from ranges seen on room- and low-temperature instruments."""
    line_time = float(rng.uniform(0.05, 0.5))
    frame_time = rows * line_time
    drift_speed = rng.uniform(0.0, 0.05) * pixel_nm * rows / frame_time
    drift_angle = rng.uniform(0, 2 * np.pi)
    creep = rng.uniform(0, 0.05) * pixel_nm * rows * rng.choice([-1, 1], 2) if rng.random() < 0.3 else np.zeros(2)
    return ScanSettings(
        line_time_s=line_time,
        scan_direction="down" if rng.random() < 0.7 else "up",
        drift_nm_per_s=(float(drift_speed * np.cos(drift_angle)), float(drift_speed * np.sin(drift_angle))),
        creep_nm=(float(creep[0]), float(creep[1])), creep_tau_s=float(rng.uniform(0.05, 0.3) * frame_time),
        hysteresis_nm=float(rng.uniform(0.0, 2.0) * pixel_nm),
        calibration=(float(rng.uniform(0.93, 1.07)), float(rng.uniform(0.93, 1.07)), float(rng.uniform(-0.07, 0.07)))
        if rng.random() < 0.5 else (1.0, 1.0, 0.0),
        misalign_probability=float(rng.uniform(0.0, 0.4)), misalign_sigma_px=float(rng.uniform(0.3, 1.2)),
        white_noise_nm=float(rng.uniform(0.0005, 0.004)), flicker_noise_nm=float(rng.uniform(0.0, 0.004)),
        feedback_period_px=float(rng.uniform(3.0, 12.0)), feedback_damping=float(rng.uniform(0.25, 0.9)),
    )


@dataclass
class Measurement:
    """Both traces of a frame, in image orientation (row 0 at the top), heights in nm."""

    z: np.ndarray
    current: np.ndarray
    tip_state: np.ndarray
    events: np.ndarray
    shift_px: np.ndarray = field(default_factory=lambda: np.zeros(0))


def acquisition_rows(rows: int, direction: str) -> np.ndarray:
    """order[k] = image row scanned k-th."""
    return np.arange(rows)[::-1] if direction == "up" else np.arange(rows)


def _flicker(n: int, rng: np.random.Generator, decimation: int = 8) -> np.ndarray:
    """Unit-RMS 1/f noise of length n, drawn in the frequency domain at 1/decimation of the
    pixel rate and interpolated: 1/f power sits at low frequencies, the white noise covers the rest."""
    m = n // decimation + 2
    bins = m // 2 + 1
    noise = rng.standard_normal(2 * bins, dtype=np.float32).view(np.complex64)
    f = np.arange(bins, dtype=np.float32)
    f[0] = np.inf
    coarse = fft.irfft(noise / np.sqrt(f), m)
    weights = np.arange(decimation, dtype=np.float32) / decimation
    series = (coarse[:-1, None] + np.diff(coarse)[:, None] * weights[None, :]).ravel()[:n]
    return series / series.std()


def feedback(z: np.ndarray, period_px: float, damping: float, reverse: bool = False) -> np.ndarray:
    """Second-order, unity-gain response along each row in the direction of travel, settled at start."""
    omega = 2 * np.pi / period_px
    r = np.exp(-damping * omega)
    theta = omega * np.sqrt(max(1e-6, 1 - damping**2))
    return second_order(np.ascontiguousarray(z), -2 * r * np.cos(theta), r * r, reverse)


def measure(topo: Topography, scenario: TipScenario, settings: ScanSettings, rng: np.random.Generator) -> Measurement:
    canvas = topo.canvas
    rows = cols = canvas.size
    order = acquisition_rows(rows, settings.scan_direction)
    misaligned = rng.random(rows) < settings.misalign_probability
    shift_px = np.where(misaligned, rng.normal(0, settings.misalign_sigma_px, rows), 0.0)

    z = np.empty((2, rows, cols), dtype=np.float32)
    state = np.empty(rows, np.uint8)
    step = np.zeros(rows)
    streak = np.zeros(rows, bool)
    unstable = np.zeros(rows, bool)
    for i, segment in enumerate(scenario.segments):
        end = scenario.segments[i + 1].start if i + 1 < len(scenario.segments) else rows
        acquired = order[segment.start:end]
        heights = tips.image(topo, segment.tip)
        for trace in (0, 1):
            sample_scan(heights, z[trace], acquired, np.arange(segment.start, end), trace == 1, settings.start_s,
                        settings.line_time_s, canvas.pixel_nm, canvas.margin, *settings.drift_nm_per_s, *settings.creep_nm,
                        settings.creep_tau_s, settings.hysteresis_nm, shift_px, *settings.calibration)
        state[acquired] = STATE_CODE["unstable" if segment.unstable else segment.tip.state]
        unstable[acquired] = segment.unstable
        if i > 0:
            step[order[segment.start:]] += segment.height_step_nm
            changed = order[segment.start:segment.start + segment.streak_lines]
            streak[changed] = True
            state[changed] = STATE_CODE["changed"]
    z += step[None, :, None].astype(np.float32)

    ideal = z.copy()
    z[0] = feedback(z[0], settings.feedback_period_px, settings.feedback_damping)
    z[1] = feedback(z[1], settings.feedback_period_px, settings.feedback_damping, reverse=True)
    error = np.clip(2 * KAPPA_PER_NM * (ideal - z), -20, 20)
    current = np.float32(settings.setpoint_a) * np.exp(error)

    # 1/f noise runs in acquisition time: row after row, forward left to right, backward right to left.
    flicker = (settings.flicker_noise_nm * _flicker(z.size, rng)).reshape(rows, 2, cols)
    z[0][order] += flicker[:, 0]
    z[1][order] += flicker[:, 1, ::-1]
    z += np.float32(settings.white_noise_nm) * rng.standard_normal(z.shape, dtype=np.float32)
    current *= 1 + np.float32(settings.current_noise) * rng.standard_normal(current.shape, dtype=np.float32)

    events = np.zeros((2, rows), bool)
    for row in np.flatnonzero(streak):
        for trace in (0, 1):
            _spikes(z[trace, row], current[trace, row], rng, count=int(rng.integers(2, 6)))
            events[trace, row] = True
    for row in np.flatnonzero(unstable):
        for trace in (0, 1):
            if rng.random() < scenario.event_probability:
                _instability(z[trace, row], current[trace, row], rng, settings)
                events[trace, row] = True
    return Measurement(z, current, state, events, shift_px)


def _spikes(z: np.ndarray, current: np.ndarray, rng: np.random.Generator, count: int) -> None:
    cols = z.size
    for _ in range(count):
        start = int(rng.integers(0, cols))
        width = int(rng.integers(1, 9))
        amplitude = rng.choice([-1, 1]) * rng.uniform(0.05, 0.4)
        z[start:start + width] += amplitude
        current[start:start + width] *= np.exp(rng.uniform(-2, 2))


def _instability(z: np.ndarray, current: np.ndarray, rng: np.random.Generator, settings: ScanSettings) -> None:
    """One of: a spike burst, a noisy line, or a jump of the tip for the rest of the line."""
    kind = rng.integers(3)
    if kind == 0:
        _spikes(z, current, rng, count=int(rng.integers(1, 4)))
    elif kind == 1:
        z += rng.normal(0, rng.uniform(5, 15) * max(settings.white_noise_nm, 0.002), z.size)
        current *= 1 + rng.normal(0, 0.2, z.size)
    else:
        start = int(rng.integers(0, z.size))
        z[start:] += rng.choice([-1, 1]) * rng.uniform(0.03, 0.2)
