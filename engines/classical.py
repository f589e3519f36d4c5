"""Classical reconstruction: the baseline every learned model must beat.

The method follows the shape of the mask actually received (not the plan's name), so lines lost
on the way are handled like lines never planned. `auto` (the daemon's classical engine):

- whole rows measured (`lines:K`, `partial:N`, `full`): cubic spline along the slow axis, per column;
- a regular grid of rows x columns (`sr:K`): bicubic spline over the grid;
- anything else (`pixels:F`, damaged lines): biharmonic inpainting (scikit-image).

`linear` and `cubic` use the same three shapes with splines of degree 1 and 3 (scattered pixels:
Delaunay-based linear and Clough-Tocher cubic interpolation); `biharmonic` inpaints every mask.

Nothing is invented outside the scanned region: rows farther than one row spacing beyond the
first or last measured row stay NaN, so a frame still being scanned shows its unscanned part empty.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.interpolate import CloughTocher2DInterpolator, CubicSpline, LinearNDInterpolator, make_interp_spline
from skimage.restoration import inpaint_biharmonic

from stm_live.engines.base import Reconstruction, Reconstructor, inferable_rows


def _held(points: np.ndarray, size: int) -> np.ndarray:
    """Query coordinates 0..size-1 clipped to the measured span (nearest-edge hold outside it)."""
    return np.clip(np.arange(size), points[0], points[-1])


def spline_rows(image: np.ndarray, rows: np.ndarray, degree: int = 3,
                span: tuple[int, int] | None = None) -> np.ndarray:
    """Spline of the given degree (1 or 3) through the measured rows, at rows [top, bottom) of
    `span` (default: every row; edges held). Measured rows are returned as they are."""
    top, bottom = span or (0, image.shape[0])
    rows = np.asarray(rows, dtype=np.intp)
    missing, weights = row_spline_weights(rows.tobytes(), top, bottom, degree)
    out = image[top:bottom].copy()
    out[missing - top] = weights @ image[rows]
    return out


@lru_cache(maxsize=256)
def row_spline_weights(rows_key: bytes, top: int, bottom: int, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """The unmeasured rows in [top, bottom) and the (unmeasured x measured rows) weights that fill them.

    A spline is linear in the values it passes through, so filling every column is one matrix
    product. The matrix depends only on which rows were measured, which repeats from scan to
    scan, so it is built once per pattern: a live frame then costs one small matrix product for
    the rows it lacks instead of a spline fit per column.
    """
    rows = np.frombuffer(rows_key, dtype=np.intp)
    missing = np.setdiff1d(np.arange(top, bottom), rows)
    if rows.size == 1:
        return missing, np.ones((missing.size, 1))
    at = np.clip(missing, rows[0], rows[-1])
    if degree == 1:
        below = np.clip(np.searchsorted(rows, at, side="right") - 1, 0, rows.size - 2)
        frac = (at - rows[below]) / (rows[below + 1] - rows[below])
        weights = np.zeros((missing.size, rows.size))
        weights[np.arange(missing.size), below] = 1 - frac
        weights[np.arange(missing.size), below + 1] += frac
        return missing, weights
    kind = "not-a-knot" if rows.size > 3 else "natural"
    return missing, CubicSpline(rows, np.eye(rows.size), axis=0, bc_type=kind)(at)


def spline_grid(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, degree: int = 3) -> np.ndarray:
    """Tensor spline of the given degree over a measured grid, on the full frame (edges held):
    the interpolating spline along each axis (not-a-knot, as FITPACK's), one matrix per axis."""
    row_weights = grid_axis_weights(np.asarray(rows, dtype=np.intp).tobytes(), image.shape[0], degree)
    col_weights = grid_axis_weights(np.asarray(cols, dtype=np.intp).tobytes(), image.shape[1], degree)
    return row_weights @ image[np.ix_(rows, cols)] @ col_weights.T


@lru_cache(maxsize=256)
def grid_axis_weights(points_key: bytes, size: int, degree: int) -> np.ndarray:
    """(size x measured points) weights of the interpolating spline of degree min(degree, points - 1)
    through the measured points of one axis, at 0..size-1 held to the measured span. Like the
    row weights, it depends only on where the grid was measured, so it is built once per grid."""
    points = np.frombuffer(points_key, dtype=np.intp)
    if points.size == 1:
        return np.ones((size, 1))
    spline = make_interp_spline(points, np.eye(points.size), k=min(degree, points.size - 1))
    return spline(_held(points, size))


def biharmonic(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return inpaint_biharmonic(np.where(mask, image, 0.0), ~mask)


def scattered(image: np.ndarray, mask: np.ndarray, degree: int) -> np.ndarray:
    """Delaunay-based interpolation of scattered pixels; outside their hull, the nearest row fill."""
    points = np.argwhere(mask)
    interpolator = (LinearNDInterpolator if degree == 1 else CloughTocher2DInterpolator)(points, image[mask])
    out = interpolator(np.argwhere(np.ones_like(mask))).reshape(mask.shape)
    holes = ~np.isfinite(out)
    if holes.any():
        out[holes] = biharmonic(np.where(mask, image, 0.0), mask)[holes]
    return out


METHODS = ("auto", "linear", "cubic", "biharmonic")


def reconstruct_one(image: np.ndarray, mask: np.ndarray, method: str = "auto") -> np.ndarray:
    """Fill one frame (float64 in, float64 out; NaN where nothing can be inferred)."""
    out = np.full(image.shape, np.nan)
    row_any = mask.any(axis=1)
    rows = np.flatnonzero(row_any)
    if rows.size == 0:
        return out
    top, bottom = inferable_rows(mask)
    col_any = mask.any(axis=0)
    cols = np.flatnonzero(col_any)
    degree = 1 if method == "linear" else 3
    if method == "biharmonic":
        out[top:bottom] = biharmonic(image[top:bottom], mask[top:bottom])
    elif mask[rows].all():
        out[top:bottom] = spline_rows(image, rows, degree, (top, bottom))
    elif np.array_equal(mask, np.outer(row_any, col_any)):
        out[top:bottom] = spline_grid(image, rows, cols, degree)[top:bottom]
    elif method == "auto":
        out[top:bottom] = biharmonic(image[top:bottom], mask[top:bottom])
    else:
        out[top:bottom] = scattered(image[top:bottom], mask[top:bottom], degree)
    return out


class ClassicalReconstructor(Reconstructor):
    """Spline / biharmonic interpolation; no uncertainty estimate."""

    def __init__(self, method: str = "auto") -> None:
        if method not in METHODS:
            raise ValueError(f"unknown classical method {method!r}; expected one of {METHODS}")
        self.method = method
        self.name = "classical" if method == "auto" else f"classical-{method}"

    def reconstruct(self, measured: np.ndarray, mask: np.ndarray) -> Reconstruction:
        data = measured.astype(np.float64)
        return Reconstruction(np.stack([reconstruct_one(d, m, self.method) for d, m in zip(data, mask)]))
