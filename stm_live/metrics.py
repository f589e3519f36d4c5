"""Image-quality metrics and latency statistics.

Reconstruction quality uses one fixed definition everywhere (demo, eval, docs): subtract a
least-squares plane from the original, map its 0.5th..99.5th percentiles to [0, 1] (clipped),
apply the same affine map to the reconstruction, then PSNR and SSIM with data range 1.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def fit_plane(image: np.ndarray) -> np.ndarray:
    """Least-squares plane a + b*x + c*y through the finite pixels of an image."""
    rows, cols = np.indices(image.shape)
    ok = np.isfinite(image)
    design = np.column_stack([np.ones(ok.sum()), cols[ok], rows[ok]])
    coef, *_ = np.linalg.lstsq(design, image[ok].astype(np.float64), rcond=None)
    return coef[0] + coef[1] * cols + coef[2] * rows


@dataclass(frozen=True)
class Normalizer:
    """The affine map fixed by the original image, applied to anything compared with it."""

    plane: np.ndarray
    low: float
    high: float

    @classmethod
    def from_original(cls, original: np.ndarray) -> Normalizer:
        plane = fit_plane(original)
        flat = original - plane
        low, high = np.nanpercentile(flat, [0.5, 99.5])
        if not high > low:
            high = low + 1.0
        return cls(plane, float(low), float(high))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return np.clip((image - self.plane - self.low) / (self.high - self.low), 0.0, 1.0)


@dataclass(frozen=True)
class Quality:
    psnr: float
    ssim: float


def quality(original: np.ndarray, reconstruction: np.ndarray) -> Quality:
    """PSNR (dB) and SSIM of a reconstruction against the full original frame."""
    if original.shape != reconstruction.shape:
        raise ValueError(f"shapes differ: {original.shape} vs {reconstruction.shape}")
    if not np.isfinite(reconstruction).all():
        raise ValueError("reconstruction has non-finite pixels; score only complete frames")
    norm = Normalizer.from_original(original)
    ref, rec = norm(original), norm(reconstruction)
    return Quality(
        psnr=float(peak_signal_noise_ratio(ref, rec, data_range=1.0)),
        ssim=float(structural_similarity(ref, rec, data_range=1.0)),
    )


class LatencyWindow:
    """The most recent latencies (seconds), summarised as percentiles; safe across threads."""

    def __init__(self, size: int = 10_000) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)

    def summary(self) -> dict[str, float]:
        with self._lock:
            values = np.fromiter(self._values, dtype=np.float64)
        if not values.size:
            return {}
        p50, p99 = np.percentile(values, [50, 99])
        return {"p50": float(p50), "p99": float(p99), "max": float(values.max()), "n": float(values.size)}


def worth_logging(count: int) -> bool:
    """For repeated events: log the 1st, 10th, 100th, 1000th and every 10,000th, not each one."""
    return count in (1, 10, 100, 1000) or count % 10_000 == 0
