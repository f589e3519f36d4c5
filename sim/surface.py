"""A simple atomic surface: a hexagonal lattice of atom-shaped bumps with vacancies and a tilt.

Heights are built the AtomVision way: atom centres are splatted onto the pixel grid with
bilinear weights (so positions keep their sub-pixel offsets) and convolved with a Gaussian
apparent-height profile. Heights are in metres, like a controller's Z channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter


@dataclass(frozen=True)
class SurfaceParams:
    size_px: int = 256
    frame_nm: float = 10.0
    lattice_nm: float = 0.77
    corrugation_pm: float = 60.0
    atom_fwhm_nm: float = 0.35
    vacancy_fraction: float = 0.02
    tilt_pm_per_nm: float = 20.0


def hexagonal_sites(frame_nm: float, lattice_nm: float, angle: float, offset: np.ndarray) -> np.ndarray:
    """Sites (x, y) in nm of a rotated hexagonal lattice covering the frame (plus a margin)."""
    a1 = lattice_nm * np.array([np.cos(angle), np.sin(angle)])
    a2 = lattice_nm * np.array([np.cos(angle + np.pi / 3), np.sin(angle + np.pi / 3)])
    n = int(np.ceil(2 * frame_nm / lattice_nm)) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    sites = i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2 + offset
    margin = 2 * lattice_nm
    keep = np.all((sites > -margin) & (sites < frame_nm + margin), axis=1)
    return sites[keep]


def render_atoms(sites_nm: np.ndarray, weights: np.ndarray, size_px: int, frame_nm: float,
                 fwhm_nm: float) -> np.ndarray:
    """Sum of Gaussian bumps of unit peak height at the given sites (pixel centres at k+0.5)."""
    px = size_px / frame_nm
    pad = int(np.ceil(3 * fwhm_nm * px)) + 2
    grid = np.zeros((size_px + 2 * pad, size_px + 2 * pad))
    x = sites_nm[:, 0] * px - 0.5 + pad
    y = sites_nm[:, 1] * px - 0.5 + pad
    inside = (x >= 0) & (y >= 0) & (x < grid.shape[1] - 1) & (y < grid.shape[0] - 1)
    x, y, w = x[inside], y[inside], weights[inside]
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    for dy, dx, share in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(grid, (y0 + dy, x0 + dx), w * share)
    sigma_px = fwhm_nm * px / 2.3548
    peak = 1.0 / (2 * np.pi * sigma_px**2)
    return gaussian_filter(grid, sigma_px, mode="constant")[pad:-pad, pad:-pad] / peak


def hexagonal_surface(params: SurfaceParams, rng: np.random.Generator) -> np.ndarray:
    """Topography in metres, shape (size_px, size_px), row 0 at the top of the frame."""
    angle = rng.uniform(0, np.pi / 3)
    offset = rng.uniform(0, params.lattice_nm, size=2)
    sites = hexagonal_sites(params.frame_nm, params.lattice_nm, angle, offset)
    weights = (rng.random(len(sites)) >= params.vacancy_fraction).astype(float)
    bumps = render_atoms(sites, weights, params.size_px, params.frame_nm, params.atom_fwhm_nm)
    coords = (np.arange(params.size_px) + 0.5) * params.frame_nm / params.size_px
    slope = rng.normal(0, params.tilt_pm_per_nm, size=2)
    tilt = slope[0] * coords[None, :] + slope[1] * coords[:, None]
    return (bumps * params.corrugation_pm + tilt) * 1e-12
