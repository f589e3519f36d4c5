"""Classical reconstruction: the baseline every learned model must beat.

The method follows the shape of the mask actually received (not the plan's name), so lines lost
on the way are handled like lines never planned:

- whole rows measured (`lines:K`, `partial:N`, `full`): cubic spline along the slow axis, per column;
- a regular grid of rows x columns (`sr:K`): bicubic spline over the grid;
- anything else (`pixels:F`, damaged lines): biharmonic inpainting (scikit-image).

Nothing is invented outside the scanned region: rows farther than one row spacing beyond the
first or last measured row stay NaN, so a frame still being scanned shows its unscanned part empty.
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import CubicSpline, RectBivariateSpline
from skimage.restoration import inpaint_biharmonic

from stm_live.engines.base import Reconstruction, Reconstructor


def _reach(measured_rows: np.ndarray) -> int:
    """How far beyond the first/last measured row we still fill: one typical row spacing."""
    if measured_rows.size < 2:
        return 0
    return int(np.max(np.diff(measured_rows)))


def _held(points: np.ndarray, size: int) -> np.ndarray:
    """Query coordinates 0..size-1 clipped to the measured span (nearest-edge hold outside it)."""
    return np.clip(np.arange(size), points[0], points[-1])


def cubic_rows(image: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Cubic spline through the measured rows, evaluated at every row (edges held)."""
    height = image.shape[0]
    if rows.size == 1:
        return np.repeat(image[rows], height, axis=0)
    kind = "not-a-knot" if rows.size > 3 else "natural"
    spline = CubicSpline(rows, image[rows], axis=0, bc_type=kind)
    return spline(_held(rows, height))


def bicubic_grid(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bicubic spline over a measured grid, evaluated on the full frame (edges held)."""
    grid = image[np.ix_(rows, cols)]
    row_degree, col_degree = min(3, rows.size - 1), min(3, cols.size - 1)
    if row_degree < 1 or col_degree < 1:
        return np.broadcast_to(grid.mean(), image.shape).copy()
    spline = RectBivariateSpline(rows, cols, grid, kx=row_degree, ky=col_degree)
    return spline(_held(rows, image.shape[0]), _held(cols, image.shape[1]))


def biharmonic(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return inpaint_biharmonic(np.where(mask, image, 0.0), ~mask)


def reconstruct_one(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill one frame (float64 in, float64 out; NaN where nothing can be inferred)."""
    out = np.full(image.shape, np.nan)
    row_any = mask.any(axis=1)
    rows = np.flatnonzero(row_any)
    if rows.size == 0:
        return out
    reach = _reach(rows)
    top, bottom = max(0, rows[0] - reach), min(image.shape[0], rows[-1] + reach + 1)
    col_any = mask.any(axis=0)
    cols = np.flatnonzero(col_any)
    if mask[rows].all():
        out[top:bottom] = cubic_rows(image, rows)[top:bottom]
    elif np.array_equal(mask, np.outer(row_any, col_any)):
        out[top:bottom] = bicubic_grid(image, rows, cols)[top:bottom]
    else:
        out[top:bottom] = biharmonic(image[top:bottom], mask[top:bottom])
    return out


class ClassicalReconstructor(Reconstructor):
    """Spline / biharmonic interpolation; no uncertainty estimate."""

    name = "classical"

    def reconstruct(self, measured: np.ndarray, mask: np.ndarray) -> Reconstruction:
        data = measured.astype(np.float64)
        return Reconstruction(np.stack([reconstruct_one(d, m) for d, m in zip(data, mask)]))
