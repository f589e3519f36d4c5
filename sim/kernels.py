"""Compiled inner loops of the scan process (numba): per-pixel work that NumPy cannot vectorise well."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, fastmath=True)
def sample_scan(image: np.ndarray, out: np.ndarray, image_rows: np.ndarray, acquired_index: np.ndarray,
                backward: bool, start_s: float, line_time: float, pixel_nm: float, margin: int, drift_x: float, drift_y: float,
                creep_x: float, creep_y: float, creep_tau: float, hysteresis_nm: float,
                row_shift_px: np.ndarray, scale_x: float, scale_y: float, shear: float) -> None:
    """Sample the padded height map where the tip really was for each pixel of the given rows.

    The tip's position at time t is the nominal pixel centre, distorted by the piezo calibration
    (scales and shear about the frame centre), plus drift v t, creep c exp(-t / tau), the backward
    trace's hysteresis offset and the row's misalignment; a pixel of row r (scanned k-th) is
    measured at t = start + k T + its place along the trace. Bilinear, clamped at the edges.
    """
    h, w = image.shape
    cols = out.shape[1]
    half = 0.5 * line_time
    centre = 0.5 * cols * pixel_nm
    for i in range(image_rows.size):
        r = image_rows[i]
        t_row = start_s + acquired_index[i] * line_time + (half if backward else 0.0)
        for c in range(cols):
            along = (cols - 1 - c) if backward else c
            t = t_row + (along + 0.5) / cols * half
            creep = np.exp(-t / creep_tau)
            x0 = (c + 0.5) * pixel_nm - centre
            y0 = (r + 0.5) * pixel_nm - centre
            x = centre + scale_x * x0 + shear * y0 + drift_x * t + creep_x * creep + row_shift_px[r] * pixel_nm
            if backward:
                x += hysteresis_nm
            y = centre + scale_y * y0 + drift_y * t + creep_y * creep
            fr = min(max(y / pixel_nm - 0.5 + margin, 0.0), h - 1.000001)
            fc = min(max(x / pixel_nm - 0.5 + margin, 0.0), w - 1.000001)
            r0, c0 = int(fr), int(fc)
            dr, dc = fr - r0, fc - c0
            out[r, c] = ((1 - dr) * ((1 - dc) * image[r0, c0] + dc * image[r0, c0 + 1])
                         + dr * ((1 - dc) * image[r0 + 1, c0] + dc * image[r0 + 1, c0 + 1]))


@numba.njit(cache=True, fastmath=True)
def second_order(z: np.ndarray, a1: float, a2: float, reverse: bool) -> np.ndarray:
    """y[n] = g x[n] - a1 y[n-1] - a2 y[n-2] along each row (unity DC gain), settled at the row start."""
    out = np.empty_like(z)
    g = 1.0 + a1 + a2
    rows, cols = z.shape
    for r in range(rows):
        start = z[r, cols - 1] if reverse else z[r, 0]
        y1 = start
        y2 = start
        for k in range(cols):
            c = cols - 1 - k if reverse else k
            y = g * z[r, c] - a1 * y1 - a2 * y2
            out[r, c] = y
            y2 = y1
            y1 = y
    return out
