"""Figures of a localization: the scan as measured, its reconstruction, the localization map."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from stm_live.localize.locmap import LocalizationMap


def plot_locate(report: dict[str, Any], locmap: LocalizationMap, image: np.ndarray, mask: np.ndarray,
                path: str, truth_nm: np.ndarray | None = None) -> None:
    """Three panels in nm: measured pixels (unmeasured blank), the reconstruction (labelled
    inferred), and the density map with the pooled atoms (and the truth, when known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = image.shape
    pixel = report["pixel_nm"]
    extent = (0, cols * pixel, rows * pixel, 0)
    with warnings.catch_warnings():  # rows never scanned are all NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        image = image - np.nanmedian(image, axis=1, keepdims=True)  # line levelling, for display only
    finite = image[np.isfinite(image)]
    low, high = np.percentile(finite, [0.5, 99.5]) if finite.size else (0, 1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4), constrained_layout=True)
    axes[0].imshow(np.where(mask, image, np.nan), cmap="afmhot", vmin=low, vmax=high, extent=extent,
                   interpolation="nearest")
    axes[0].set_title(f"measured ({report['plan']}, {mask.any(axis=1).sum()} of {rows} rows)")
    axes[1].imshow(image, cmap="afmhot", vmin=low, vmax=high, extent=extent)
    axes[1].set_title(f"reconstruction ({report['engine']}) — INFERRED" if not mask.all() else "measured (full)")
    density = locmap.density
    axes[2].imshow(density, cmap="magma", extent=extent, vmax=np.percentile(density, 99.9) or None)
    atoms = locmap.atoms
    axes[2].scatter(atoms.x_nm, atoms.y_nm, s=6, facecolors="none", edgecolors="cyan", linewidths=0.5,
                    label=f"{len(atoms)} atoms (support >= half of {atoms.samples})")
    if truth_nm is not None:
        axes[2].scatter(truth_nm[:, 0], truth_nm[:, 1], s=4, marker="+", c="lime", linewidths=0.5, label="truth")
    for molecule in report.get("molecules", []):
        x0, y0, x1, y1 = molecule["box_nm"]
        for ax in axes[1:]:
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", linewidth=1.0))
    axes[2].set_xlim(0, cols * pixel)
    axes[2].set_ylim(rows * pixel, 0)
    axes[2].legend(loc="lower right", fontsize=8)
    precision = np.median(atoms.precision_nm) * 1000 if len(atoms) else float("nan")
    axes[2].set_title(f"localization map — INFERRED\n(median precision {precision:.1f} pm)")
    for ax in axes:
        ax.set_xlabel("x (nm)")
        ax.set_ylabel("y (nm)")
    lattice = report.get("lattice", {})
    summary = (f"lattice {lattice['bravais']}: a = {lattice['a_nm']:.4f} nm, b = {lattice['b_nm']:.4f} nm, "
               f"angle {lattice['angle_deg']:.1f} deg" if "bravais" in lattice else f"lattice: {lattice.get('error')}")
    fig.suptitle(f"{report['file']} — {summary}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
