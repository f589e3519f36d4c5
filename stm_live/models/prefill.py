"""The classical fill the network corrects.

The network predicts a residual over an interpolation of the measured pixels, so where an
interpolation is already as good as it gets the network only has to learn to leave it alone.
The interpolation is the classical engine's own for the mask's shape: a cubic spline along the
slow axis when whole rows were measured (every fast-axis detail kept), a bicubic spline over a
measured grid, and for scattered pixels a masked Gaussian fill (2 px), the one classical choice
cheap enough to run per frame. Edges beyond the measured span are held, as in the classical engine.

Batched torch on the batch's device. The splines are the classical engine's weight matrices
(built once per pattern of measured rows or grid), so frames measured alike are filled by one
matrix product on the device whatever their number.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

from stm_live.engines.classical import grid_axis_weights, row_spline_weights


@lru_cache(maxsize=256)
def _row_weights(rows_key: bytes, height: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    missing, weights = row_spline_weights(rows_key, 0, height, 3)
    rows = np.frombuffer(rows_key, dtype=np.intp).copy()
    return (torch.as_tensor(rows, device=device), torch.as_tensor(missing, device=device),
            torch.as_tensor(weights, device=device))


@lru_cache(maxsize=256)
def _axis_weights(points_key: bytes, size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    points = np.frombuffer(points_key, dtype=np.intp).copy()
    return torch.as_tensor(points, device=device), torch.as_tensor(grid_axis_weights(points_key, size, 3), device=device)


def _symmetric(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of a 0..size-1 axis padded by `radius` with its mirror image, edge pixel repeated
    (scipy.ndimage's 'reflect'), for any radius."""
    index = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(index >= size, 2 * size - 1 - index, index)


def _gaussian_fill(values: torch.Tensor, mask: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """blur(values) / blur(mask): scipy.ndimage.gaussian_filter's kernel (truncated at 4 sigma)
    and edge mode, separable."""
    radius = int(4.0 * sigma_px + 0.5)
    x = torch.arange(-radius, radius + 1, device=values.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma_px) ** 2)
    kernel = kernel / kernel.sum()
    both = torch.cat([values, mask.double()])[:, None]
    height, width = both.shape[-2:]
    both = F.conv2d(both[..., _symmetric(height, radius, both.device), :], kernel.view(1, 1, -1, 1))
    both = F.conv2d(both[..., _symmetric(width, radius, both.device)], kernel.view(1, 1, 1, -1))[:, 0]
    filled, weight = both[: len(values)], both[len(values):]
    return filled / weight.clamp_min(1e-3)


@dataclass(frozen=True)
class Outline:
    """Where each frame of a batch was measured, on the host: rows (B, H) and columns (B, W)
    holding a measured pixel, and measured pixels per frame (B,). It picks each frame's fill."""

    rows: np.ndarray
    cols: np.ndarray
    count: np.ndarray

    @classmethod
    def of(cls, mask: torch.Tensor) -> Outline:
        return cls(mask.any(2).cpu().numpy(), mask.any(1).cpu().numpy(), mask.sum((1, 2)).cpu().numpy())

    def groups(self) -> dict[tuple, list[int]]:
        """Frames filled alike: ("rows", measured rows), ("grid", rows, columns) or ("scattered",)."""
        width = self.cols.shape[1]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (row_any, col_any, count) in enumerate(zip(self.rows, self.cols, self.count)):
            rows, cols = np.flatnonzero(row_any), np.flatnonzero(col_any)
            if rows.size == 0:
                continue
            if count == rows.size * width:
                groups["rows", rows.tobytes()].append(i)
            elif count == rows.size * cols.size:
                groups["grid", rows.tobytes(), cols.tobytes()].append(i)
            else:
                groups["scattered",].append(i)
        return groups


def _fill(kind: str, keys: list[bytes], values: torch.Tensor, mask: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """One group's fill; a row spline writes into `values` (the caller's own copy)."""
    height, width = values.shape[-2:]
    device = str(values.device)
    if kind == "rows":
        rows, missing, weights = _row_weights(keys[0], height, device)
        values[:, missing] = torch.einsum("mr,brw->bmw", weights, values[:, rows])
        return values
    if kind == "grid":
        (rows, row_weights), (cols, col_weights) = _axis_weights(keys[0], height, device), \
            _axis_weights(keys[1], width, device)
        return row_weights @ values[:, rows][:, :, cols] @ col_weights.T
    return _gaussian_fill(values, mask, sigma_px)


def prefill(values: torch.Tensor, mask: torch.Tensor, outline: Outline | None = None,
            sigma_px: float = 2.0) -> torch.Tensor:
    """(B, H, W) float64 interpolation of `values` (normalised, anything where unmeasured) from
    `mask` (B, H, W bool); zero for a frame with nothing measured. `outline`, when the caller
    has it, saves reading the mask back from the device."""
    values = torch.where(mask, values.double(), 0.0)
    groups = (outline or Outline.of(mask)).groups()
    if len(groups) == 1 and len(next(iter(groups.values()))) == len(values):
        (kind, *keys), = groups  # the whole batch measured alike: no gathering
        return _fill(kind, keys, values, mask, sigma_px)
    out = torch.zeros_like(values)
    for (kind, *keys), members in groups.items():
        index = torch.as_tensor(members, device=values.device)
        out[index] = _fill(kind, keys, values[index], mask[index], sigma_px)
    return out
