"""Localization-STM on one detected molecule: crop it, super-resolve the crop, localize there.

As in the STM super-resolution source, a molecule found in a large scan is cut out (with a
margin of one atom spacing), super-resolved `factor` times (the crop's pixels become every
`factor`-th pixel of a finer grid, the `sr:K` plan, and the engine fills the rest), and the
localization map runs on the fine grid, where each atom spans `factor` times more pixels. The
crop's measured values stay exactly as measured at their places on the fine grid.

Geometry: coarse pixel i covers [i, i + 1) * p, centre (i + 1/2) p; on the fine grid of pitch
p / k it sits at fine pixel k i, whose centre is (i + 1/(2k)) p. The fine grid is therefore
placed (1 - 1/k) p / 2 after the crop's corner, so measured samples keep their positions.
"""

from __future__ import annotations

import numpy as np

from stm_live.engines import Reconstructor
from stm_live.localize.locmap import Atoms, localization_map
from stm_live.plans import parse_plan


def in_box(xy_nm: np.ndarray, box_nm: np.ndarray) -> np.ndarray:
    """Which of the (K, 2) points lie in the box (x0, y0, x1, y1 in nm)."""
    return ((xy_nm[:, 0] >= box_nm[0]) & (xy_nm[:, 0] < box_nm[2])
            & (xy_nm[:, 1] >= box_nm[1]) & (xy_nm[:, 1] < box_nm[3]))


def crop_bounds(box_nm: np.ndarray, pixel_nm: float, shape: tuple[int, int], margin_nm: float) -> tuple[slice, slice]:
    """Rows and columns of the box (x0, y0, x1, y1 in nm) plus a margin, inside the frame."""
    x0, y0, x1, y1 = box_nm

    def span(low: float, high: float, size: int) -> slice:
        return slice(max(0, int(np.floor((low - margin_nm) / pixel_nm))),
                     min(size, int(np.ceil((high + margin_nm) / pixel_nm))))

    return span(y0, y1, shape[0]), span(x0, x1, shape[1])


def crop_atoms(engine: Reconstructor, image: np.ndarray, pixel_nm: float, box_nm: np.ndarray, spacing_nm: float,
               samples: int, rng: np.random.Generator, factor: int = 4) -> Atoms:
    """The atoms of one molecule's box, localized on its `factor`-times super-resolved crop, in
    frame coordinates (nm)."""
    rows, cols = crop_bounds(box_nm, pixel_nm, image.shape, spacing_nm)
    crop = np.asarray(image[rows, cols], dtype=np.float32)
    fine_shape = (crop.shape[0] * factor, crop.shape[1] * factor)
    mask = parse_plan(f"sr:{factor}").mask(*fine_shape)
    fine = np.full(fine_shape, np.nan, np.float32)
    fine[mask] = crop.ravel()
    atoms = localization_map(engine, fine, mask, pixel_nm / factor, spacing_nm, samples, rng).atoms
    shift = (1 - 1 / factor) * pixel_nm / 2
    x, y = atoms.x_nm + cols.start * pixel_nm + shift, atoms.y_nm + rows.start * pixel_nm + shift
    inside = in_box(np.stack([x, y], axis=1), box_nm)
    return Atoms(x[inside], y[inside], atoms.height[inside], atoms.precision_nm[inside], atoms.support[inside],
                 atoms.samples)
