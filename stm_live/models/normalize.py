"""Per-frame normalisation from measured pixels only: remove a plane, divide by the spread.

The same transform maps the network's output back to physical units, so the model never sees
absolute heights, tilts or units, and a frame still being scanned is normalised by what has
been measured so far. Batched torch on any device: the engine prepares a batch where its
backend runs (on a GPU, nothing but the measurement and the mask crosses the bus), training
prepares its crops with the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from stm_live.models.prefill import Outline, prefill


@lru_cache(maxsize=64)
def _axes(height: int, width: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Powers 0..2 of the row (3, H) and column (W, 3) coordinates, float64, kept per device."""
    rows = torch.arange(height, dtype=torch.float64, device=device)
    cols = torch.arange(width, dtype=torch.float64, device=device)
    return torch.stack([torch.ones_like(rows), rows, rows * rows]), torch.stack([torch.ones_like(cols), cols, cols * cols], 1)


@dataclass(frozen=True)
class Planes:
    """Per frame of a batch: plane coefficients (B, 3: offset, per column, per row) and the
    spread of the measured pixels about it (B,), float64 on the batch's device."""

    coef: torch.Tensor
    scale: torch.Tensor

    def plane(self, height: int, width: int) -> torch.Tensor:
        row_powers, col_powers = _axes(height, width, str(self.coef.device))
        c = self.coef[:, :, None, None]
        return c[:, 0] + c[:, 1] * col_powers[:, 1] + c[:, 2] * row_powers[1, :, None]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, H, W) physical -> normalised float32."""
        return ((image.double() - self.plane(*image.shape[-2:])) / self.scale[:, None, None]).float()

    def inverse(self, normalised: torch.Tensor) -> torch.Tensor:
        """(B, H, W) normalised -> physical float64."""
        return normalised.double() * self.scale[:, None, None] + self.plane(*normalised.shape[-2:])


def summarize(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 15 + H + W) float64, on the device: per frame the sums a plane fit needs and the
    outline of the mask. Device work alone (no value read back), so it can be replayed as a
    CUDA graph; `fit` reads it back once.

    The sums over measured pixels: row^i col^j (i, j = 0..2), and dz row^i col^j (i, j = 0..1)
    and dz^2 with dz the height about the frame's first measured value (no cancellation when
    heights sit far from zero); that value; the rows and columns holding a measured pixel."""
    row_powers, col_powers = _axes(*image.shape[-2:], str(image.device))
    first = mask.flatten(1).to(torch.uint8).argmax(1, keepdim=True)
    reference = image.flatten(1).gather(1, first).double()
    dz = torch.where(mask, image.double() - reference[:, :, None], 0.0)
    moments = row_powers @ (mask.double() @ col_powers)
    dz_moments = row_powers[:2] @ (dz @ col_powers[:, :2])
    return torch.cat([moments.flatten(1), dz_moments.flatten(1), reference, dz.flatten(1).square().sum(1, keepdim=True),
                      mask.any(2), mask.any(1)], 1)


def fit(summary: torch.Tensor, height: int) -> tuple[Planes, Outline]:
    """Each frame's least-squares plane through its measured pixels, their spread about it, and
    the mask's outline (for the classical fill), from `summarize`'s sums: read back once and
    solved on the host (a 2 x 2 system per frame). A frame with nothing measured gets plane 0
    and spread 1; one measured along a single line gets no slope across it."""
    host = summary.cpu().numpy()
    (n0, sc, scc, sr, src, _, srr, _, _), (z, zc, zr, _), ref, zz = host[:, :9].T, host[:, 9:13].T, host[:, 13], host[:, 14]
    n = np.maximum(n0, 1.0)
    mean_r, mean_c, mean_dz = sr / n, sc / n, z / n
    a, b, d = scc - n * mean_c ** 2, src - n * mean_r * mean_c, srr - n * mean_r ** 2
    p, q = zc - n * mean_c * mean_dz, zr - n * mean_r * mean_dz
    det = a * d - b * b
    with np.errstate(divide="ignore", invalid="ignore"):
        solvable = det > 1e-9 * a * d
        # Pixels on one line: the minimum-norm solution of the rank-1 system, N m / trace(N)^2.
        trace2 = np.maximum((a + d) ** 2, 1e-300)
        slope_c = np.where(solvable, (d * p - b * q) / det, (a * p + b * q) / trace2)
        slope_r = np.where(solvable, (a * q - b * p) / det, (b * p + d * q) / trace2)
    mean_z = ref + mean_dz
    rss = zz - n * mean_dz ** 2 - slope_c * p - slope_r * q
    spread = np.sqrt(np.maximum(rss, 0.0) / n)
    empty = n0 == 0
    coef = np.where(empty[:, None], 0.0, np.stack([mean_z - slope_c * mean_c - slope_r * mean_r, slope_c, slope_r], 1))
    scale = np.where(empty | ~(spread > 0), 1.0, spread)
    fitted = torch.from_numpy(np.column_stack([coef, scale])).to(summary.device)
    outline = Outline(host[:, 15:15 + height] > 0, host[:, 15 + height:] > 0, n0.astype(np.int64))
    return Planes(fitted[:, :3], fitted[:, 3]), outline


def normalise(image: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float32: the measured pixels in normalised units, 0 where unmeasured."""
    return torch.where(mask, Planes(coef, scale).forward(image), 0.0)


@dataclass(frozen=True)
class DeviceSteps:
    """The fixed-shape device work of `network_input`: an engine on a GPU passes graph-replayed
    copies (engines.cuda_graphs), everything else the functions themselves."""

    summarize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = summarize
    normalise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = normalise


def network_input(image: torch.Tensor, mask: torch.Tensor, steps: DeviceSteps = DeviceSteps(),
                  ) -> tuple[torch.Tensor, Planes]:
    """(B, 3, H, W) float32: normalised measured values (0 where unmeasured), the mask, and the
    classical fill of the values that the network corrects (stm_live.models.prefill); and the
    planes that map the network's output back."""
    planes, outline = fit(steps.summarize(image, mask), image.shape[-2])
    values = steps.normalise(image, mask, planes.coef, planes.scale)
    return torch.stack([values, mask.float(), prefill(values, mask, outline).float()], 1), planes
