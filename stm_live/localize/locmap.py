"""Localization maps: many stochastic reconstructions of one sparse scan, their atoms pooled.

As in Localization-STM, each of N reconstructions gives a set of local maxima; maxima of
different reconstructions that lie within `pool_radius` of each other are one atom, whose
position is their mean, whose localization precision is their scatter, and whose support is the
number of reconstructions that found it. The density map renders every maximum as a Gaussian of
width `sigma_nm`, divided by N, so an atom found in every reconstruction integrates to 1.

Where the variety comes from (all N inputs go to the engine in one batched call):
- the measured pixels of each input carry fresh noise of the scan's own pixel noise level (a
  parametric bootstrap: how far measurement noise moves each atom);
- an engine that predicts its uncertainty adds to each reconstruction a draw of that standard
  deviation, correlated over an eighth of the atom spacing, on the inferred pixels.
The measured frame itself is never changed: these are inferred products, labelled as such.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from stm_live.engines import Reconstructor, reconstruct_exact
from stm_live.localize.peaks import Peaks, find_peaks, pixel_noise


@dataclass(frozen=True)
class Atoms:
    """Pooled atoms: positions (nm), mean flattened height, precision (nm, 1 sigma per axis),
    support (reconstructions that found the atom, out of `samples`)."""

    x_nm: np.ndarray
    y_nm: np.ndarray
    height: np.ndarray
    precision_nm: np.ndarray
    support: np.ndarray
    samples: int

    def __len__(self) -> int:
        return int(self.x_nm.size)

    @property
    def xy_nm(self) -> np.ndarray:
        return np.stack([self.x_nm, self.y_nm], axis=1)


@dataclass(frozen=True)
class LocalizationMap:
    density: np.ndarray
    density_pixel_nm: float
    atoms: Atoms
    sigma_nm: float


def stochastic_reconstructions(engine: Reconstructor, measured: np.ndarray, mask: np.ndarray, samples: int,
                               spacing_nm: float, pixel_nm: float, rng: np.random.Generator) -> np.ndarray:
    """(samples, H, W) reconstructions of one (H, W) frame from one batched engine call."""
    noise = pixel_noise(np.where(mask, measured, np.nan))
    batch = np.repeat(np.where(mask, measured, 0.0)[None].astype(np.float32), samples, axis=0)
    batch += (noise * rng.standard_normal(batch.shape)).astype(np.float32) * mask[None]
    masks = np.repeat(mask[None], samples, axis=0)
    result = reconstruct_exact(engine, batch, masks)
    images = result.images.astype(np.float64)
    if result.uncertainty is not None:
        correlation_px = max(0.5, spacing_nm / 8.0 / pixel_nm)
        draws = ndimage.gaussian_filter(rng.standard_normal(images.shape), (0, correlation_px, correlation_px))
        draws /= draws.std(axis=(1, 2), keepdims=True)
        images += np.nan_to_num(result.uncertainty) * draws * ~mask[None]
    return images


def pool(found: list[Peaks], radius_nm: float, min_support: float) -> Atoms:
    """Group maxima of different reconstructions within `radius_nm`; keep groups found by at
    least `min_support` (a fraction) of the reconstructions."""
    samples = len(found)
    xy = np.concatenate([p.xy_nm for p in found]) if found else np.zeros((0, 2))
    height = np.concatenate([p.height for p in found]) if found else np.zeros(0)
    source = np.concatenate([np.full(len(p), i) for i, p in enumerate(found)]) if found else np.zeros(0, int)
    empty = Atoms(*(np.zeros(0) for _ in range(4)), np.zeros(0, int), samples)
    if len(xy) == 0:
        return empty
    pairs = cKDTree(xy).query_pairs(radius_nm, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(xy), len(xy)))
    count, label = connected_components(graph, directed=False)
    support = np.array([np.unique(source[label == k]).size for k in range(count)])
    keep = np.flatnonzero(support >= min_support * samples)
    if keep.size == 0:
        return empty
    sizes = np.bincount(label, minlength=count)[keep]
    mean = np.stack([np.bincount(label, xy[:, a], count)[keep] / sizes for a in (0, 1)], axis=1)
    spread = np.zeros(keep.size)
    for a in (0, 1):
        square = np.bincount(label, xy[:, a] ** 2, count)[keep] / sizes
        spread += np.maximum(square - mean[:, a] ** 2, 0.0)
    return Atoms(mean[:, 0], mean[:, 1], np.bincount(label, height, count)[keep] / sizes, np.sqrt(spread / 2),
                 support[keep], samples)


def trace_offset(forward: np.ndarray, backward: np.ndarray, spacing_nm: float, rounds: int = 3) -> np.ndarray:
    """Median displacement (nm, x and y) of the forward trace's atoms from the backward trace's.

    Along the fast-scan axis it is twice the feedback loop's lag plus the piezo's hysteresis;
    it is the median over nearest neighbours closer than half a spacing (unambiguous on any
    lattice), re-paired after each shift, so an offset up to half a spacing is recovered."""
    offset = np.zeros(2)
    if len(forward) == 0 or len(backward) == 0:
        return offset
    tree = cKDTree(backward)
    for _ in range(rounds):
        distance, nearest = tree.query(forward - offset, distance_upper_bound=0.5 * spacing_nm)
        paired = np.isfinite(distance)
        if not paired.any():
            break
        offset = np.median(forward[paired] - backward[nearest[paired]], axis=0)
    return offset


def combine_traces(forward: Atoms, backward: Atoms, spacing_nm: float) -> tuple[Atoms, np.ndarray]:
    """The atoms of both traces of a frame with the feedback lag removed, and the traces' offset
    (`trace_offset`).

    The feedback loop lags behind the tip, shifting every feature along the fast-scan direction
    of travel: forward one way, backward the other by the same amount, half the offset each.
    Atoms closer than 0.3 spacings once the offset is removed are one atom at the mean of the
    pair (the lag cancels); an atom only one trace found is kept, moved back by half the offset.
    Precision (1 sigma per axis): the bootstrap scatter of both traces, halved as for a mean of
    two, plus what the two traces disagree on beyond the offset, r: a mean of two estimates r
    apart is uncertain by r / 2 along r, r / (2 sqrt 2) per axis. The bootstrap alone sees only
    pixel noise; the disagreement also sees systematic shifts that differ between the traces.
    A lone atom gets its trace's scatter plus the frame's median disagreement."""
    from scipy.optimize import linear_sum_assignment

    samples = min(forward.samples, backward.samples)
    offset = trace_offset(forward.xy_nm, backward.xy_nm, spacing_nm)
    f = b = np.zeros(0, int)
    if len(forward) and len(backward):
        distance = np.linalg.norm(forward.xy_nm[:, None] - offset - backward.xy_nm[None], axis=-1)
        rows, cols = linear_sum_assignment(np.where(distance <= 0.3 * spacing_nm, distance, 1e9))
        keep = distance[rows, cols] <= 0.3 * spacing_nm
        f, b = rows[keep], cols[keep]
    lone_f = np.setdiff1d(np.arange(len(forward)), f)
    lone_b = np.setdiff1d(np.arange(len(backward)), b)

    def column(name: str) -> np.ndarray:
        one, other = getattr(forward, name), getattr(backward, name)
        return np.concatenate([(one[f] + other[b]) / 2, one[lone_f], other[lone_b]])

    shift = np.concatenate([np.zeros((len(f), 2)), np.tile(-offset / 2, (len(lone_f), 1)),
                            np.tile(offset / 2, (len(lone_b), 1))])
    disagreement = np.linalg.norm(forward.xy_nm[f] - offset - backward.xy_nm[b], axis=1) / (2 * np.sqrt(2))
    typical = float(np.median(disagreement)) if disagreement.size else 0.0
    precision = np.concatenate([np.sqrt((forward.precision_nm[f] ** 2 + backward.precision_nm[b] ** 2) / 4
                                        + disagreement**2),
                                np.hypot(forward.precision_nm[lone_f], typical),
                                np.hypot(backward.precision_nm[lone_b], typical)])
    support = np.concatenate([np.minimum(forward.support[f], backward.support[b]), forward.support[lone_f],
                              backward.support[lone_b]])
    return Atoms(column("x_nm") + shift[:, 0], column("y_nm") + shift[:, 1], column("height"), precision,
                 support.astype(int), samples), offset


def render_density(found: list[Peaks], shape: tuple[int, int], pixel_nm: float, sigma_nm: float,
                   upsample: int = 2) -> np.ndarray:
    """Every maximum as a unit Gaussian of `sigma_nm`, on a grid `upsample` times finer, over N."""
    rows, cols = shape[0] * upsample, shape[1] * upsample
    step = pixel_nm / upsample
    density = np.zeros((rows, cols))
    if found:
        xy = np.concatenate([p.xy_nm for p in found])
        density, _, _ = np.histogram2d(xy[:, 1], xy[:, 0], bins=(rows, cols), range=((0, rows * step), (0, cols * step)))
        density = ndimage.gaussian_filter(density, sigma_nm / step, mode="constant")
    return (density / max(1, len(found))).astype(np.float32)


def localization_map(engine: Reconstructor, measured: np.ndarray, mask: np.ndarray, pixel_nm: float,
                     spacing_nm: float, samples: int, rng: np.random.Generator, sigma_nm: float | None = None,
                     min_support: float = 0.5, upsample: int = 2) -> LocalizationMap:
    """The whole method for one frame: N reconstructions, maxima in each, pooled and rendered."""
    sigma_nm = sigma_nm or spacing_nm / 10.0
    images = stochastic_reconstructions(engine, measured, mask, samples, spacing_nm, pixel_nm, rng)
    rows = np.flatnonzero(mask.any(axis=1))
    valid = np.zeros(mask.shape, bool)
    if rows.size:
        valid[rows[0]:rows[-1] + 1] = True
    found = [find_peaks(image, pixel_nm, spacing_nm, valid=valid) for image in images]
    return LocalizationMap(render_density(found, mask.shape, pixel_nm, sigma_nm, upsample), pixel_nm / upsample,
                           pool(found, 0.3 * spacing_nm, min_support), sigma_nm)
