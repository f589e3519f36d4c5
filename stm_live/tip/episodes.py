"""Labelled row sequences from the simulator, for training and evaluating the tip monitor.

A sequence is what the monitor sees of one frame: the rows in acquisition order (every
`stride`-th one for a `lines:K` plan), forward and backward heights in nm, with the tip-state
label of each row. Frames are drawn from (seed, index), so a set is reproducible. Recorded scans
with a known good tip give `good` sequences the same way. Since the monitor's window carries on
from one scan into the next, a sequence can be read on from the scan before it (`continuing`).
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
from stm_live.sim.frames import simulate_sequence as simulate_frames
from stm_live.sim.scan import TipScenario, TipSegment, acquisition_rows
from stm_live.tip.classifier import WINDOW_ROWS, summarize, window_image
from stm_live.tip.features import N_FEATURES, features_of, prepare_row

TRAINING_SCENARIOS = {"good": 0.3, "blunt": 0.15, "multi": 0.2, "unstable": 0.15, "change": 0.2}
CHANGE_ROWS = 2  # acquired rows from a tip change on that are labelled `changed`, whatever the stride


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
    seam: int = 0  # the first row of this scan, when the rows before it are the scan before's

    def features(self) -> np.ndarray:
        """Each row's features against the row before it; the first row of a scan has none."""
        rows = [prepare_row(f, b) for f, b in zip(self.forward, self.backward)]
        out = np.empty((len(rows), N_FEATURES), np.float32)
        for i, row in enumerate(rows):
            out[i] = features_of(row, rows[i - 1] if i and i != self.seam else None, self.pixel_nm)
        return out

    def continuing(self, previous: RowSequence) -> RowSequence:
        """This scan with the last WINDOW_ROWS rows of the scan before it in front, as the
        monitor's window holds them at the start of a rescan; indices shift by WINDOW_ROWS."""
        tail = slice(len(previous.labels) - WINDOW_ROWS, None)

        def joined(name: str) -> np.ndarray | None:
            mine, theirs = getattr(self, name), getattr(previous, name)
            return None if mine is None or theirs is None else np.concatenate([theirs[tail], mine])

        return RowSequence(joined("forward"), joined("backward"), joined("labels"), self.pixel_nm, self.scenario,
                           self.surface, None if self.change_at is None else self.change_at + WINDOW_ROWS,
                           joined("visibility"), WINDOW_ROWS)


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
    return simulate_scans(seed, index, size, scenario, stride, visibility)[-1]


def simulate_scans(seed: int, index: int, size: int = 256, scenario: str | None = None, stride: int | None = None,
                   visibility: bool = False, before: int = 0, after: int = 0) -> list[RowSequence]:
    """`before` scans of one area with the tip the frame starts with, the frame itself, then
    `after` scans with the tip it ends with (with neither, the frame simulate_sequence gives):
    the rescans a user runs, through which the monitor's window and state carry on."""
    rng = np.random.default_rng([seed, index, 7])
    spec = random_spec(rng, size, scenario=scenario, scenario_weights=TRAINING_SCENARIOS)
    if before or after:
        first, last = spec.scenario.segments[0], spec.scenario.segments[-1]
        steady = [TipScenario(spec.scenario.name, (TipSegment(0, segment.tip, segment.unstable),),
                              spec.scenario.event_probability) for segment in (first, last)]
        frames = simulate_frames(spec, rng, before + 1 + after,
                                 [steady[0]] * before + [spec.scenario] + [steady[1]] * after)
    else:
        frames = [simulate_frame(spec, rng)]
    stride = stride or int(rng.choice([1, 1, 2, 4]))
    offset = int(rng.integers(stride))
    order = acquisition_rows(size, spec.scan.scan_direction)[offset::stride]
    out = []
    for frame in frames:
        z = frame.measurement.z
        labels = frame.measurement.tip_state[order]
        segments = frame.spec.scenario.segments
        change_at = None
        if len(segments) > 1:  # the first acquired row scanned by the new tip
            change_at = int(np.searchsorted(np.arange(offset, size, stride), segments[1].start))
            labels[change_at:change_at + CHANGE_ROWS] = tips.STATE_CODE["changed"]
        out.append(RowSequence(z[0][order], z[1][order], labels, spec.frame_nm / size, frame.spec.scenario.name,
                               spec.surface, change_at, degradation_visibility(frame)[order] if visibility else None))
    return out


def windows(sequence: RowSequence, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Network inputs and labels for the WINDOW_ROWS-row windows ending at each row index in `ends`."""
    features = sequence.features()
    spans = [slice(e - WINDOW_ROWS + 1, e + 1) for e in ends]
    images = np.stack([window_image(sequence.forward[s], sequence.backward[s]) for s in spans])
    summaries = np.stack([summarize(features[s]) for s in spans])
    return images.astype(np.float16), summaries, sequence.labels[ends].astype(np.int64)


def rescan_windows(sequence: RowSequence, previous: RowSequence, ends: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows ending at rows `ends` of a scan whose first rows the monitor reads on from the scan before."""
    return windows(sequence.continuing(previous), np.asarray(ends) + WINDOW_ROWS)


def _training_windows(task: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows of one frame, read on from the scan before it: for a tip change, a scan of the
    same area with the tip before the change; otherwise the frame's own last rows stand for it
    (the same area and tip). Extra windows just after a change."""
    seed, index, size, per_frame = task
    rng = np.random.default_rng([seed, index, 11])
    names = list(TRAINING_SCENARIOS)
    scenario = str(rng.choice(names, p=np.array([TRAINING_SCENARIOS[n] for n in names])))
    scans = simulate_scans(seed, index, size, scenario, before=1 if scenario == "change" else 0)
    sequence = scans[-1]
    n = len(sequence.labels)
    ends = rng.integers(0, n, per_frame)
    if sequence.change_at is not None:
        near = sequence.change_at + rng.integers(0, 6, per_frame // 2)
        ends = np.concatenate([ends, near[near < n]])
    return rescan_windows(sequence, scans[0], ends)


def training_windows(seed: int, frames: int, size: int = 256, per_frame: int = 16, workers: int = 2,
                     progress: Callable[[int], None] = lambda n: None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows from `frames` simulated frames, spread over worker processes."""
    tasks = [(seed, i, size, per_frame) for i in range(frames)]
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for part in pool.imap(_training_windows, tasks, chunksize=4):
            parts.append(part)
            progress(1)
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]


def evaluation_sequences(seed: int, count: int, scenario: str | None = None, size: int = 256, stride: int = 1,
                         visibility: bool = False, before: int = 0, after: int = 0) -> Iterator[list[RowSequence]]:
    """Episodes: each the frame with `before` and `after` scans of the same area (simulate_scans)."""
    for index in range(count):
        yield simulate_scans(seed, index, size, scenario, stride, visibility, before, after)
