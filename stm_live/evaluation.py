"""`stm-live eval`: reconstruction quality on real or simulated images against classical baselines.

For each image (.sxm: forward height channel; .npy: a 2-D array) the plan's mask is applied, the
default model and the classical baselines (linear, cubic, biharmonic) fill the rest, and PSNR and
SSIM are computed with the fixed definition of stm_live.metrics (plane removed from the original,
0.5-99.5 % range mapped to [0, 1], same map for every reconstruction, data range 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stm_live.drivers.scanfiles import read_scan_file
from stm_live.engines import reconstruct_exact
from stm_live.engines.classical import ClassicalReconstructor
from stm_live.metrics import Normalizer, quality
from stm_live.plans import parse_plan

BASELINES = ("linear", "cubic", "biharmonic")


def load_height(path: str | Path) -> np.ndarray:
    """The forward height channel of a scan file, or a 2-D .npy array, as float64."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        data = np.load(path, allow_pickle=False)
        if data.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D array, got shape {data.shape}")
        return data.astype(np.float64)
    scan = read_scan_file(path)
    height = next((c for c in scan.channels if c.name in ("Z", "Topography")), scan.channels[0])
    return height.forward.astype(np.float64)


def _complete(original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Finite rows only: rows with NaN (an aborted scan) are not scored."""
    rows = np.isfinite(original).all(axis=1)
    return original[rows], mask[rows]


def evaluate_image(original: np.ndarray, plan: str, model: Any | None) -> dict[str, Any]:
    """Scores of the model and every baseline on one image; also returns the reconstructions."""
    mask = parse_plan(plan).mask(*original.shape)
    original, mask = _complete(original, mask)
    if original.size == 0 or np.ptp(original) == 0:
        raise ValueError("the height channel is constant (a constant-height scan?): nothing to score")
    measured = np.where(mask, original, np.nan)
    engines = {name: ClassicalReconstructor("auto" if name == "cubic" else name) for name in BASELINES}
    if model is not None:
        engines["model"] = model
    results, images = {}, {}
    for name, engine in engines.items():
        image = reconstruct_exact(engine, measured[None], mask[None]).images[0]
        image = np.where(np.isfinite(image), image, np.nanmean(original))
        images[name] = image
        q = quality(original, image)
        results[name] = {"psnr": round(q.psnr, 3), "ssim": round(q.ssim, 4)}
    return {"scores": results, "images": images, "original": original, "mask": mask}


def evaluate(paths: list[str], plan: str, model: Any | None, plot: str | None = None) -> dict[str, Any]:
    images, rows_for_plot = [], []
    for path in paths:
        try:
            result = evaluate_image(load_height(path), plan, model)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        scores = result.pop("scores")
        entry = {"name": Path(path).name, "plan": plan,
                 "baselines": {b: scores[b] for b in BASELINES}}
        if "model" in scores:
            entry["model"] = scores["model"]
            best = max(BASELINES, key=lambda b: scores[b]["psnr"])
            entry["gain_db_over_best_baseline"] = round(scores["model"]["psnr"] - scores[best]["psnr"], 3)
            entry["best_baseline"] = best
        images.append(entry)
        rows_for_plot.append((Path(path).name, result))
    summary: dict[str, Any] = {"plan": plan, "images": len(images)}
    by_method: dict[str, list[dict]] = {}
    for entry in images:
        for method, score in {**entry["baselines"], **({"model": entry["model"]} if "model" in entry else {})}.items():
            by_method.setdefault(method, []).append(score)
    for method, scores in by_method.items():
        summary[method] = {"psnr": round(float(np.mean([s["psnr"] for s in scores])), 3),
                           "ssim": round(float(np.mean([s["ssim"] for s in scores])), 4)}
    if plot:
        _plot(rows_for_plot, plan, plot)
    return {"images": images, "summary": summary}


def _plot(rows: list[tuple[str, dict]], plan: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["model", *BASELINES]
    fig, axes = plt.subplots(2 * len(rows), 2 + 4, figsize=(18, 6 * len(rows)), squeeze=False)
    for r, (title, result) in enumerate(rows):
        original, mask = result["original"], result["mask"]
        norm = Normalizer.from_original(original)
        shown = [("original", norm(original)), (f"measured ({plan})", np.where(mask, norm(original), np.nan))]
        shown += [(n, norm(result["images"][n])) for n in names if n in result["images"]]
        for c, (label, image) in enumerate(shown):
            axes[2 * r, c].imshow(image, cmap="afmhot", vmin=0, vmax=1)
            axes[2 * r, c].set_title(f"{title}: {label}", fontsize=8)
        for c, n in enumerate([n for n in names if n in result["images"]], start=2):
            error = np.abs(norm(result["images"][n]) - norm(original))
            axes[2 * r + 1, c].imshow(error, cmap="magma", vmin=0, vmax=0.3)
            axes[2 * r + 1, c].set_title(f"|error| {n}", fontsize=8)
        for ax in axes[2 * r:2 * r + 2].ravel():
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
