"""Per-frame normalisation from measured pixels only: remove a plane, divide by the spread.

The same transform maps the network's output back to physical units, so the model never sees
absolute heights, tilts or units, and a frame still being scanned is normalised by what has
been measured so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stm_live.models.prefill import prefill


@dataclass(frozen=True)
class Transform:
    coef: np.ndarray
    scale: float

    def plane(self, shape: tuple[int, int]) -> np.ndarray:
        rows, cols = np.indices(shape)
        return self.coef[0] + self.coef[1] * cols + self.coef[2] * rows

    def forward(self, image: np.ndarray) -> np.ndarray:
        return ((image - self.plane(image.shape)) / self.scale).astype(np.float32)

    def inverse(self, normalised: np.ndarray) -> np.ndarray:
        return normalised.astype(np.float64) * self.scale + self.plane(normalised.shape)


def fit_transform(image: np.ndarray, mask: np.ndarray, max_points: int = 4096) -> Transform:
    """Plane and spread of the measured pixels (a fixed subsample keeps it cheap)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return Transform(np.zeros(3), 1.0)
    if rows.size > max_points:
        pick = np.linspace(0, rows.size - 1, max_points).astype(int)
        rows, cols = rows[pick], cols[pick]
    values = image[rows, cols].astype(np.float64)
    design = np.column_stack([np.ones(rows.size), cols, rows])
    coef = np.linalg.lstsq(design, values, rcond=None)[0] if rows.size >= 3 else np.array([values.mean(), 0, 0])
    spread = float(np.std(values - design @ coef))
    return Transform(coef, spread if spread > 0 else 1.0)


def network_input(image: np.ndarray, mask: np.ndarray, transform: Transform) -> np.ndarray:
    """(3, H, W) float32: normalised measured values (0 where unmeasured), the mask, and the
    classical fill of the values that the network corrects (stm_live.models.prefill)."""
    values = np.where(mask, transform.forward(np.where(mask, image, 0.0)), 0.0)
    return np.stack([values, mask, prefill(values, mask)]).astype(np.float32)
