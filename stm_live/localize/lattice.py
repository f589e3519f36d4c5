"""Lattice vectors from the autocorrelation of a frame, and the 2D Bravais class they form.

The frame is line-levelled (row offsets are scan noise) and its slow background removed; its
autocorrelation, normalised by the overlap at each lag so that distant lags are not damped,
peaks at every lattice vector. Peaks at least half as strong as the strongest are candidates;
the two shortest non-collinear ones span the lattice, and every candidate that is an integer
combination of them (within 0.15) refines both by least squares, so the longer lags sharpen
the estimate. The basis is reduced (|a| <= |b|, |a.b| <= |a|^2 / 2) before classification.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max

MIN_LATTICE_PEAKS = 6  # lattice points in the half-frame lag window: fewer is a few objects, not a lattice


class LatticeError(ValueError):
    """No periodic lattice found in the frame."""


@dataclass(frozen=True)
class Lattice:
    a_nm: np.ndarray
    b_nm: np.ndarray
    bravais: str
    peaks: int

    @property
    def lengths_nm(self) -> tuple[float, float]:
        return float(np.linalg.norm(self.a_nm)), float(np.linalg.norm(self.b_nm))

    @property
    def angle_deg(self) -> float:
        a, b = self.lengths_nm
        return float(np.degrees(np.arccos(np.clip(self.a_nm @ self.b_nm / (a * b), -1, 1))))

    def describe(self) -> dict:
        a, b = self.lengths_nm
        return {"a_nm": round(a, 5), "b_nm": round(b, 5), "angle_deg": round(self.angle_deg, 2),
                "bravais": self.bravais, "a_vec_nm": self.a_nm.round(5).tolist(),
                "b_vec_nm": self.b_nm.round(5).tolist(), "peaks": self.peaks}


def _correlation_peaks(image: np.ndarray, pixel_nm: float, strength: float, floor: float) -> np.ndarray:
    """Lattice-vector candidates: maxima of the frame's autocorrelation (x, y in nm, upper half
    plane) at least `strength` times the strongest one away from the origin, and above `floor`
    (a fraction of the zero-lag value: noise alone stays near 1/sqrt(pixels))."""
    data = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=float(np.nanmedian(image)))
    rows, cols = data.shape
    data = data - np.median(data, axis=1, keepdims=True)  # line levelling: row offsets are scan noise
    data = data - ndimage.gaussian_filter(data, max(rows, cols) / 8, mode="nearest")
    data -= data.mean()
    shape = (2 * rows, 2 * cols)
    overlap = np.fft.irfft2(np.abs(np.fft.rfft2(np.ones_like(data), shape)) ** 2, shape)
    correlation = np.fft.irfft2(np.abs(np.fft.rfft2(data, shape)) ** 2, shape) / np.maximum(overlap, 1.0)
    correlation = np.fft.fftshift(correlation / correlation[0, 0])
    cy, cx = rows, cols
    yy, xx = np.indices(shape)
    lag = np.hypot(yy - cy, xx - cx)
    reach = (np.abs(yy - cy) <= rows // 2) & (np.abs(xx - cx) <= cols // 2)
    radial = ndimage.mean(correlation, labels=np.round(lag).astype(int), index=np.arange(min(rows, cols) // 2))
    falling = np.flatnonzero((np.diff(radial) >= 0) | (radial[1:] <= 0))
    central = int(falling[0]) + 1 if falling.size else 3  # the origin's own peak ends where the mean stops falling
    candidate = np.where(reach & (lag >= max(3, central)), correlation, -np.inf)
    found = peak_local_max(candidate, min_distance=2, exclude_border=1)
    found = found[(found[:, 0] < cy) | ((found[:, 0] == cy) & (found[:, 1] > cx))]
    values = correlation[tuple(found.T)]
    found = found[values >= max(floor, strength * values.max(initial=0.0))]
    offsets, peaked = [], np.ones(len(found), bool)
    for axis in (0, 1):
        step = np.eye(2, dtype=int)[axis]
        before, centre, after = (correlation[tuple((found + s * step).T)] for s in (-1, 0, 1))
        curvature = before - 2 * centre + after
        peaked &= curvature < -0.01 * centre  # a ridge (stripes) is flat along itself: not a lattice point
        with np.errstate(divide="ignore", invalid="ignore"):
            offsets.append(np.clip(np.where(curvature < 0, 0.5 * (before - after) / curvature, 0.0), -0.5, 0.5))
    found, offsets = found[peaked], [o[peaked] for o in offsets]
    return np.stack([(found[:, 1] + offsets[1] - cx) * pixel_nm, (found[:, 0] + offsets[0] - cy) * pixel_nm], axis=1)


def reduce_basis(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss (Lagrange) reduction: the shortest basis of the same lattice."""
    if a @ a > b @ b:
        a, b = b, a
    while True:
        b = b - np.round((a @ b) / (a @ a)) * a
        if b @ b >= a @ a:
            return a, b
        a, b = b, a


def classify(a: np.ndarray, b: np.ndarray, length_tol: float = 0.03, angle_tol_deg: float = 2.5) -> str:
    """The Bravais class of a reduced basis, within tolerances for measured lattices."""
    la, lb = np.linalg.norm(a), np.linalg.norm(b)
    angle = np.degrees(np.arccos(np.clip(abs(a @ b) / (la * lb), 0, 1)))  # in [0, 90]
    equal = abs(la - lb) / la < length_tol
    right = abs(angle - 90) < angle_tol_deg
    if equal and abs(angle - 60) < angle_tol_deg:
        return "hexagonal"
    if equal and right:
        return "square"
    if right:
        return "rectangular"
    centred = abs(abs(a @ b) / (la * la) - 0.5) < length_tol  # b projects onto a at half its length
    if equal or centred:
        return "centered_rectangular"
    return "oblique"


def analyze_lattice(image: np.ndarray, pixel_nm: float, strength: float = 0.5, floor: float = 0.15) -> Lattice:
    """Lattice vectors (nm) and Bravais class of the strongest periodic order in a frame."""
    lags = _correlation_peaks(image, pixel_nm, strength, floor)
    if len(lags) < 2:
        raise LatticeError(f"{len(lags)} strong autocorrelation peak(s); a 2D lattice needs two")
    order = np.argsort(np.linalg.norm(lags, axis=1))
    a1 = lags[order[0]]
    a2 = next((lags[i] for i in order[1:]
               if abs(a1[0] * lags[i][1] - a1[1] * lags[i][0]) > 0.3 * np.linalg.norm(a1) * np.linalg.norm(lags[i])),
              None)
    if a2 is None:
        raise LatticeError("every strong autocorrelation peak lies on one line: stripes, not a 2D lattice")
    indices = lags @ np.linalg.inv(np.stack([a1, a2]))
    on_lattice = np.all(np.abs(indices - np.round(indices)) < 0.15, axis=1)
    if on_lattice.sum() < MIN_LATTICE_PEAKS or on_lattice.mean() < 0.5:
        raise LatticeError(f"{on_lattice.sum()} of {len(lags)} strong autocorrelation peaks fit one lattice: "
                           "not a periodic frame")
    basis = np.linalg.lstsq(np.round(indices[on_lattice]), lags[on_lattice], rcond=None)[0]
    a, b = reduce_basis(basis[0], basis[1])
    return Lattice(a, b, classify(a, b), int(on_lattice.sum()))
