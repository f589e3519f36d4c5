"""Labelled row sequences from the simulator, for training and evaluating the tip monitor.

A sequence is what the monitor sees of one frame: the rows in acquisition order (every
`stride`-th one for a `lines:K` plan), forward and backward heights in nm, with the tip-state
label of each row. Frames are drawn from (seed, index), so a set is reproducible. Recorded scans
with a known good tip give `good` sequences the same way.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stm_live.drivers.scanfiles import read_scan_file
from stm_live.sim import tip as tips
from stm_live.sim.frames import SimFrame, random_spec, simulate_frame
from stm_live.sim.scan import acquisition_rows
from stm_live.tip.classifier import WINDOW_ROWS, full_window, summarize, window_image
from stm_live.tip.features import N_FEATURES, row_features

TRAINING_SCENARIOS = {"good": 0.3, "blunt": 0.15, "multi": 0.2, "unstable": 0.15, "change": 0.2}


@dataclass
class RowSequence:
    forward: np.ndarray
    backward: np.ndarray
    labels: np.ndarray
    pixel_nm: float
    scenario: str
    surface: str
    change_at: int | None
    visibility: np.ndarray | None = None

    def features(self) -> np.ndarray:
        out = np.empty((len(self.labels), N_FEATURES), np.float32)
        for i in range(len(self.labels)):
            out[i] = row_features(self.forward[i], self.backward[i], self.forward[i - 1] if i else None, self.pixel_nm)
        return out


def scan_file_sequences(path: str | Path, strides: tuple[int, ...] = (1, 2, 4)) -> list[RowSequence]:
    """A recorded scan's height rows in acquisition order, at each stride, labelled `good`: for
    scans whose tip is known to be good throughout."""
    scan = read_scan_file(path)
    z = next(c for c in scan.channels if c.name == "Z" and c.unit == "m")
    rows, cols = z.forward.shape
    backward = z.backward if z.backward is not None else z.forward
    order = acquisition_rows(rows, scan.scan_direction)
    out = []
    for stride in strides:
        taken = order[::stride]
        out.append(RowSequence(z.forward[taken].astype(np.float64) * 1e9, backward[taken].astype(np.float64) * 1e9,
                               np.zeros(len(taken), np.uint8), scan.size_nm[0] / cols, "recorded",
                               Path(path).stem, None))
    return out


SHARP_RESOLUTION_NM = float(np.mean(tips.GOOD_RESOLUTION_NM))


def degradation_visibility(frame: SimFrame) -> np.ndarray:
    """Per frame row, how visible the tip's degradation is: the noise-free difference between the
    row as imaged through the tip in use and through one sharp apex (a multi-apex tip's main apex
    alone; a blunt tip's place taken by a good one), as the signal-to-noise ratio a detector that
    knew the sharp image would have: sqrt(sum of squared differences) / the scan's noise per
    pixel. A second apex over a flat terrace, or a blunt tip over a surface with no fine
    structure, changes nothing to see: no monitor can tell such rows from a good tip's.
    Drift and the scan's other distortions are left out. Rows of unstable or changing tips are
    infinitely visible (their events are the degradation); good tips' rows 0."""
    spec, topo = frame.spec, frame.topography
    order = acquisition_rows(spec.size_px, spec.scan.scan_direction)
    noise = float(np.hypot(spec.scan.white_noise_nm, spec.scan.flicker_noise_nm))
    out = np.zeros(spec.size_px)
    segments = spec.scenario.segments
    for k, segment in enumerate(segments):
        rows = order[segment.start:segments[k + 1].start if k + 1 < len(segments) else None]
        tip = segment.tip
        if segment.unstable:
            out[rows] = np.inf
        elif tip.state == "multi" or tip.state == "blunt":
            sharp = tips.Tip("good", tip.resolution_nm if tip.state == "multi" else SHARP_RESOLUTION_NM)
            difference = topo.canvas.crop(tips.image(topo, tip) - tips.image(topo, sharp))[rows]
            difference -= difference.mean(axis=1, keepdims=True)  # a constant offset is not visible
            out[rows] = np.sqrt((difference.astype(np.float64) ** 2).sum(axis=1)) / noise
        if k > 0:
            out[order[segment.start:segment.start + segment.streak_lines]] = np.inf
    return out


def simulate_sequence(seed: int, index: int, size: int = 256, scenario: str | None = None,
                      stride: int | None = None, visibility: bool = False) -> RowSequence:
    """One simulated frame as the monitor sees it; the stride is drawn (1, 1, 2, 4) unless given.
    With `visibility`, each row's degradation_visibility too (it renders the frame again)."""
    rng = np.random.default_rng([seed, index, 7])
    spec = random_spec(rng, size, scenario=scenario, scenario_weights=TRAINING_SCENARIOS)
    frame = simulate_frame(spec, rng)
    stride = stride or int(rng.choice([1, 1, 2, 4]))
    order = acquisition_rows(size, spec.scan.scan_direction)[int(rng.integers(stride))::stride]
    z = frame.measurement.z
    change_at = None
    if len(spec.scenario.segments) > 1:
        change_at = int(np.searchsorted(np.arange(0, size, stride), spec.scenario.segments[1].start))
    return RowSequence(z[0][order], z[1][order], frame.measurement.tip_state[order],
                       spec.frame_nm / size, spec.scenario.name, spec.surface, change_at,
                       degradation_visibility(frame)[order] if visibility else None)


def windows(sequence: RowSequence, ends: np.ndarray, lengths: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Network inputs and labels for the windows ending at each acquired-row index in `ends`, of
    WINDOW_ROWS rows or `lengths` (fewer, as at the start of a scan: mirrored to full size)."""
    features = sequence.features()
    lengths = np.full(len(ends), WINDOW_ROWS) if lengths is None else lengths
    spans = [slice(e - n + 1, e + 1) for e, n in zip(ends, lengths)]
    images = np.stack([window_image(full_window(sequence.forward[s]), full_window(sequence.backward[s])) for s in spans])
    summaries = np.stack([summarize(full_window(features[s])) for s in spans])
    return images.astype(np.float16), summaries, sequence.labels[ends].astype(np.int64)


def _training_windows(task: tuple[int, int, int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows of one frame; with min_rows < WINDOW_ROWS, half of them as short as the first
    min_rows..WINDOW_ROWS rows a scan gives the monitor (the other half full)."""
    seed, index, size, per_frame, min_rows = task
    sequence = simulate_sequence(seed, index, size)
    rng = np.random.default_rng([seed, index, 11])
    n = len(sequence.labels)
    ends = rng.integers(min_rows - 1, n, per_frame)
    if sequence.change_at is not None:
        near = sequence.change_at + rng.integers(0, 6, per_frame // 2)
        ends = np.concatenate([ends, near[(near >= min_rows - 1) & (near < n)]])
    short = rng.integers(min_rows, WINDOW_ROWS + 1, len(ends))
    lengths = np.where(rng.random(len(ends)) < 0.5, short, WINDOW_ROWS)
    return windows(sequence, ends, np.minimum(lengths, ends + 1))


def training_windows(seed: int, frames: int, size: int = 256, per_frame: int = 16, workers: int = 2,
                     progress: Callable[[int], None] = lambda n: None, min_rows: int = WINDOW_ROWS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows from `frames` simulated frames, spread over worker processes."""
    tasks = [(seed, i, size, per_frame, min_rows) for i in range(frames)]
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for part in pool.imap(_training_windows, tasks, chunksize=4):
            parts.append(part)
            progress(1)
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]


def evaluation_sequences(seed: int, count: int, scenario: str | None = None, size: int = 256,
                         stride: int = 1, visibility: bool = False) -> Iterator[RowSequence]:
    for index in range(count):
        yield simulate_sequence(seed, index, size, scenario=scenario, stride=stride, visibility=visibility)
