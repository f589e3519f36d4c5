"""The classical fill the network corrects.

The network predicts a residual over an interpolation of the measured pixels, so where an
interpolation is already as good as it gets the network only has to learn to leave it alone.
The interpolation is the classical engine's own for the mask's shape: a cubic spline along the
slow axis when whole rows were measured (every fast-axis detail kept), a bicubic spline over a
measured grid, and for scattered pixels a masked Gaussian fill (2 px), the one classical choice
cheap enough to run per frame. Edges beyond the measured span are held, as in the classical engine.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from stm_live.engines.classical import spline_grid, spline_rows


def prefill(values: np.ndarray, mask: np.ndarray, sigma_px: float = 2.0) -> np.ndarray:
    """A full-frame interpolation of `values` (normalised, anything where unmeasured) from `mask`."""
    row_any, col_any = mask.any(axis=1), mask.any(axis=0)
    rows, cols = np.flatnonzero(row_any), np.flatnonzero(col_any)
    if rows.size == 0:
        return np.zeros(mask.shape)
    values = np.where(mask, values, 0.0).astype(np.float64)
    if mask[rows].all():
        return spline_rows(values, rows)
    if np.array_equal(mask, np.outer(row_any, col_any)):
        return spline_grid(values, rows, cols)
    weight = gaussian_filter(mask.astype(np.float64), sigma_px, mode="reflect")
    return gaussian_filter(values, sigma_px, mode="reflect") / np.maximum(weight, 1e-3)
