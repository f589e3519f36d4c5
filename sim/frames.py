"""One simulated frame, end to end: surface -> tip -> scan process, with its ground truth."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from stm_live.sim import tip as tips
from stm_live.sim.render import Canvas
from stm_live.sim.scan import Measurement, ScanSettings, TipScenario, measure, random_scenario, random_settings
from stm_live.sim.surfaces import BIAS_V, FRAME_NM, SURFACES, Topography

REFERENCE_RESOLUTION_NM = 0.03


@dataclass(frozen=True)
class FrameSpec:
    surface: str
    size_px: int
    frame_nm: float
    bias_v: float
    scenario: TipScenario
    scan: ScanSettings
    steps: bool = True

    def describe(self) -> dict:
        return {"surface": self.surface, "size_px": self.size_px, "frame_nm": self.frame_nm, "bias_v": self.bias_v,
                "steps": self.steps, "tip": self.scenario.describe(), "scan": self.scan.describe()}


@dataclass
class SimFrame:
    """What the instrument recorded (heights in nm, current in A) and what was really there."""

    spec: FrameSpec
    measurement: Measurement
    clean_nm: np.ndarray
    topography: Topography

    @property
    def forward_z_nm(self) -> np.ndarray:
        return self.measurement.z[0]


def random_spec(rng: np.random.Generator, size_px: int = 256, surface: str | None = None,
                scenario: str | None = None, frame_nm: float | None = None, bias_v: float | None = None,
                scenario_weights: dict[str, float] | None = None, artefacts: bool = True,
                steps: bool = True) -> FrameSpec:
    """Draw a frame: surface, size, bias, tip history and scan artefacts (each may be fixed)."""
    surface = surface or str(rng.choice(list(SURFACES)))
    if surface not in SURFACES:
        raise ValueError(f"unknown surface {surface!r}; expected one of {', '.join(SURFACES)}")
    if scenario is None:
        weights = scenario_weights or {"good": 0.5, "blunt": 0.125, "multi": 0.125, "unstable": 0.125, "change": 0.125}
        names = list(weights)
        probabilities = np.array([weights[n] for n in names], dtype=float)
        scenario = str(rng.choice(names, p=probabilities / probabilities.sum()))
    frame_nm = frame_nm or float(np.exp(rng.uniform(*np.log(FRAME_NM[surface]))))
    bias_v = bias_v if bias_v is not None else float(rng.uniform(*BIAS_V[surface]))
    if abs(bias_v) < 0.02:
        bias_v = 0.02 if bias_v >= 0 else -0.02
    settings = random_settings(rng, size_px, frame_nm / size_px) if artefacts else ScanSettings(
        white_noise_nm=0.0, flicker_noise_nm=0.0, feedback_period_px=2.0, feedback_damping=0.9, current_noise=0.0)
    return FrameSpec(surface, size_px, frame_nm, bias_v, random_scenario(scenario, size_px, rng, frame_nm), settings,
                     steps)


def margin_px(spec: FrameSpec, frames: int = 1) -> int:
    """Padding that covers every shift the scan can apply to `frames` successive frames: apices,
    drift, creep, misalignment."""
    p = spec.frame_nm / spec.size_px
    scan = spec.scan
    frame_time = spec.size_px * scan.line_time_s
    reach = max(tips.max_offset_nm(s.tip) + 3 * s.tip.resolution_nm for s in spec.scenario.segments)
    reach += np.hypot(*scan.drift_nm_per_s) * (scan.start_s + frames * frame_time) + np.hypot(*scan.creep_nm) + scan.hysteresis_nm
    sx, sy, shear = scan.calibration
    reach += spec.frame_nm / 2 * (max(abs(sx - 1), abs(sy - 1)) + abs(shear))
    reach += 5 * scan.misalign_sigma_px * p + FEATURE_REACH_NM
    return int(np.ceil(reach / p)) + 2


FEATURE_REACH_NM = 0.7  # about three sigma of the common apparent-height profiles (adatoms, molecules)


def simulate_frame(spec: FrameSpec, rng: np.random.Generator) -> SimFrame:
    return simulate_sequence(spec, rng, 1)[0]


def simulate_sequence(spec: FrameSpec, rng: np.random.Generator, frames: int,
                      scenarios: Sequence[TipScenario] | None = None) -> list[SimFrame]:
    """`frames` successive scans of one area, each starting one frame period after the last:
    drift carries on from frame to frame and creep decays, as when a user rescans a region.
    Each scan has the spec's tip history unless `scenarios` gives one per scan."""
    scenarios = list(scenarios) if scenarios is not None else [spec.scenario] * frames
    if len(scenarios) != frames:
        raise ValueError(f"{len(scenarios)} tip scenarios for {frames} frames")
    margin = max(margin_px(replace(spec, scenario=scenario), frames) for scenario in scenarios)
    canvas = Canvas(spec.size_px, spec.frame_nm, margin)
    topo = SURFACES[spec.surface](canvas, rng, spec.bias_v, steps=spec.steps)
    canvas.add_smooth_random(rng, rms_nm=float(rng.uniform(0.0, 0.008)), correlation_nm=float(rng.uniform(2.0, 10.0)))
    clean = canvas.crop(tips.image(topo, tips.Tip("good", REFERENCE_RESOLUTION_NM))).astype(np.float32)
    period = spec.size_px * spec.scan.line_time_s
    sequence = []
    for k in range(frames):
        scan = replace(spec.scan, start_s=spec.scan.start_s + k * period)
        measurement = measure(topo, scenarios[k], scan, rng)
        sequence.append(SimFrame(replace(spec, scan=scan, scenario=scenarios[k]), measurement, clean, topo))
    return sequence

