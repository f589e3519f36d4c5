"""Thermal drift from successive frames of one area.

Drift moves the sample under the tip at a nearly constant velocity, so two frames of the same
area taken one frame period apart show the same pattern shifted by v dt; the distortion drift
causes within each frame is the same in both and drops out of the shift. The shift is the peak
of the cross-correlation (refined by a parabola through its neighbours) of both frames low-passed
at half an atom spacing: on the atomic lattice itself every lattice vector matches as well as the
true shift, so only what breaks the periodicity (defects, steps, clusters, the slow background)
may decide it. A shift is reported only when the correlation is strong (the frames show the same
area), within a quarter of the frame (the frame was not moved), and clearly better than any other
shift (the runner-up peak, often a lattice translation, below `MAX_AMBIGUITY` of the best; the
correlation is computed here rather than by skimage's phase correlation because that ratio is
what decides). Creep after a frame move shows as drift until it has decayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from stm_live.localize.peaks import parabola_offsets
from stm_live.metrics import fit_plane

MAX_SHIFT_FRACTION = 0.25
MIN_CORRELATION = 0.3  # normalised: frames of unrelated areas correlate near 0
MAX_AMBIGUITY = 0.8  # a runner-up peak this close to the best: a lattice translation could be the shift
MAX_DISAGREEMENT_PX = 1.0


@dataclass(frozen=True)
class Drift:
    """How far the image content moved (nm, x right, y down in image rows) between two frames
    `interval_s` apart."""

    shift_nm: tuple[float, float]
    interval_s: float

    @property
    def velocity_nm_s(self) -> tuple[float, float]:
        return (self.shift_nm[0] / self.interval_s, self.shift_nm[1] / self.interval_s)


def _prepared(image: np.ndarray, sigma_px: tuple[float, float]) -> np.ndarray:
    data = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=float(np.nanmedian(image)))
    data = ndimage.gaussian_filter(data, sigma_px, mode="nearest")
    return (data - fit_plane(data)) * np.outer(np.hanning(data.shape[0]), np.hanning(data.shape[1]))


def _correlation(earlier: np.ndarray, later: np.ndarray) -> np.ndarray:
    """Circular cross-correlation, zero shift at the centre: its peak sits where `later` shows
    the content of `earlier` moved by (row, column) - centre."""
    product = np.fft.fft2(later) * np.conj(np.fft.fft2(earlier))
    return np.fft.fftshift(np.fft.ifft2(product).real)


def _peak_shift(earlier: np.ndarray, later: np.ndarray,
                sigma_px: tuple[float, float]) -> np.ndarray | None:
    """(d_row, d_col) in pixels, or None when no clear peak stands out."""
    rows, cols = earlier.shape
    a, b = _prepared(earlier, sigma_px), _prepared(later, sigma_px)
    norm = float(np.sqrt(np.sum(a * a) * np.sum(b * b)))
    if norm == 0:
        return None
    corr = _correlation(a, b) / norm
    reach = (int(MAX_SHIFT_FRACTION * rows), int(MAX_SHIFT_FRACTION * cols))
    centre = (rows // 2, cols // 2)
    window = corr[centre[0] - reach[0]:centre[0] + reach[0] + 1, centre[1] - reach[1]:centre[1] + reach[1] + 1]
    r, c = np.unravel_index(np.argmax(window), window.shape)
    best = float(window[r, c])
    footprint = (2 * max(1, int(round(sigma_px[0]))) + 1, 2 * max(1, int(round(sigma_px[1]))) + 1)
    maxima = window == ndimage.maximum_filter(window, size=footprint)
    maxima[r, c] = False
    runner_up = float(window[maxima].max(initial=0.0))
    if best < MIN_CORRELATION or runner_up > MAX_AMBIGUITY * best or r in (0, window.shape[0] - 1) \
            or c in (0, window.shape[1] - 1):
        return None
    dr, dc = parabola_offsets(window, np.array([r]), np.array([c]))
    return np.array([r - reach[0] + dr[0], c - reach[1] + dc[0]])


def frame_shift(earlier: np.ndarray, later: np.ndarray, size_nm: tuple[float, float],
                spacing_nm: float) -> tuple[float, float] | None:
    """(dx, dy) in nm that the content moved from `earlier` to `later` (frames of `size_nm`,
    width and height).

    None when the frames do not show one area, when another shift matches nearly as well, or
    when the top and bottom halves of the frames, correlated on their own, disagree with the
    whole by more than `MAX_DISAGREEMENT_PX` (a peak that locked onto noise, stripes or a
    lattice translation does not repeat in both halves)."""
    if earlier.shape != later.shape or earlier.shape[0] < 8:
        return None
    rows, cols = earlier.shape
    pixel_y, pixel_x = size_nm[1] / rows, size_nm[0] / cols
    sigma_px = (max(1.0, 0.5 * spacing_nm / pixel_y), max(1.0, 0.5 * spacing_nm / pixel_x))
    whole = _peak_shift(earlier, later, sigma_px)
    if whole is None:
        return None
    half = rows // 2
    for part in (slice(0, half), slice(half, rows)):
        found = _peak_shift(earlier[part], later[part], sigma_px)
        if found is None or np.abs(found - whole).max() > MAX_DISAGREEMENT_PX:
            return None
    dy, dx = whole
    return float(dx * pixel_x), float(dy * pixel_y)


@dataclass
class _Seen:
    image: np.ndarray
    size_nm: tuple[float, float]
    t: float


class DriftTracker:
    """The drift between each frame and the previous one of the same channel and direction.

    `t` is the frame's start time on the instrument's clock; frames of another size are a new
    area and restart the comparison."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], _Seen] = {}

    def update(self, key: tuple[str, str], image: np.ndarray, size_nm: tuple[float, float], t: float,
               spacing_nm: float) -> Drift | None:
        previous = self._last.get(key)
        self._last[key] = _Seen(image, size_nm, t)
        if previous is None or previous.size_nm != size_nm or not t > previous.t:
            return None
        shift = frame_shift(previous.image, image, size_nm, spacing_nm)
        return None if shift is None else Drift(shift, t - previous.t)
