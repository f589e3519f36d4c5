"""Molecule detection in a large scan: a small centre-heatmap network, trained on the simulator.

The frame is resampled to a fixed 0.1 nm per pixel (molecules then have one size in pixels
whatever the scan size), flattened (a 3 nm blur removed) and scaled by its robust spread. A
fully convolutional network (four stride-2 stages, dilated context, back up to 1/4 resolution)
predicts a heatmap of supramolecule centres and, at each centre, the box half-size in nm.
Detections are heatmap maxima above a threshold, boxes centred there. Other molecules in the
scan (rods, single molecules) are what it learns to ignore. Weights are trained by
`stm-live train molecules` on simulated `supramolecules` scans, full and sparse (`lines:4`
reconstructed classically), and shipped in `stm_live/localize/weights/`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy import ndimage
from torch import nn

log = logging.getLogger(__name__)

GRID_NM = 0.1
STRIDE = 4
DEFAULT_WEIGHTS = Path(__file__).with_name("weights") / "molecule_detector.safetensors"


@dataclass(frozen=True)
class Molecules:
    """Boxes (K, 4: x0, y0, x1, y1 in nm, frame coordinates) and detection scores."""

    boxes_nm: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(len(self.scores))


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CentreNet(nn.Module):
    """Heatmap logit and half-size (nm) at 1/4 resolution."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(_block(1, w, 2), _block(w, w))
        self.down1 = nn.Sequential(_block(w, 2 * w, 2), _block(2 * w, 2 * w))
        self.down2 = nn.Sequential(_block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, dilation=2),
                                   _block(4 * w, 4 * w, dilation=4))
        self.up = nn.Sequential(_block(4 * w + 2 * w, 2 * w), _block(2 * w, 2 * w))
        self.head = nn.Conv2d(2 * w, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quarter = self.down1(self.stem(x))
        eighth = self.down2(quarter)
        up = nn.functional.interpolate(eighth, size=quarter.shape[-2:], mode="nearest")
        return self.head(self.up(torch.cat([up, quarter], dim=1)))


def prepare(image: np.ndarray, pixel_nm: float) -> np.ndarray:
    """Resampled to GRID_NM per pixel, background removed, robustly scaled, padded to a multiple of 8."""
    data = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=float(np.nanmedian(image)))
    data = data - np.median(data, axis=1, keepdims=True)
    grid = ndimage.zoom(data, pixel_nm / GRID_NM, order=1)
    grid = grid - ndimage.gaussian_filter(grid, 3.0 / GRID_NM, mode="nearest")
    spread = 1.4826 * np.median(np.abs(grid - np.median(grid))) or 1.0
    grid = (grid - np.median(grid)) / spread
    pad = [(0, -n % 8) for n in grid.shape]
    return np.pad(grid, pad, mode="reflect").astype(np.float32)


class MoleculeDetector:
    def __init__(self, weights: Path = DEFAULT_WEIGHTS, threshold: float = 0.4) -> None:
        self.net = CentreNet()
        self.net.load_state_dict(load_file(str(weights)))
        self.net.eval()
        self.threshold = threshold

    def detect(self, image: np.ndarray, pixel_nm: float) -> Molecules:
        grid = prepare(image, pixel_nm)
        with torch.inference_mode():
            out = self.net(torch.from_numpy(grid)[None, None])[0].numpy()
        return decode(out, self.threshold, image.shape[1] * pixel_nm, image.shape[0] * pixel_nm)


def decode(out: np.ndarray, threshold: float, width_nm: float, height_nm: float) -> Molecules:
    """Heatmap maxima above `threshold` (3x3 non-maximum suppression) -> boxes in nm."""
    heat = 1.0 / (1.0 + np.exp(-out[0]))
    peaks = (heat == ndimage.maximum_filter(heat, size=5)) & (heat >= threshold)
    rows, cols = np.nonzero(peaks)
    cell = GRID_NM * STRIDE
    x, y = (cols + 0.5) * cell, (rows + 0.5) * cell
    half = np.maximum(out[1][rows, cols], 0.2)
    boxes = np.stack([x - half, y - half, x + half, y + half], axis=1) if rows.size else np.zeros((0, 4))
    inside = (x < width_nm) & (y < height_nm)
    return Molecules(boxes[inside], heat[rows, cols][inside])


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union of (N, 4) and (M, 4) boxes."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


# -- training --------------------------------------------------------------------------------

def _sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One simulated scan (full, or lines:4 reconstructed), its network input and targets."""
    from stm_live.engines import reconstruct_exact
    from stm_live.engines.classical import ClassicalReconstructor
    from stm_live.localize.evaluation import truth_frame
    from stm_live.plans import parse_plan

    frame = truth_frame("supramolecules", rng, 256)
    image = frame.forward_z_nm.astype(np.float32)
    if rng.random() < 0.5:
        mask = parse_plan("lines:4").mask(*image.shape)
        image = reconstruct_exact(ClassicalReconstructor(), np.where(mask, image, np.nan)[None], mask[None]).images[0]
    grid = prepare(image, frame.topography.canvas.pixel_nm)
    topo = frame.topography
    boxes = topo.molecules_nm[topo.molecule_kinds == "supramolecule"]
    heat = np.zeros((grid.shape[0] // STRIDE, grid.shape[1] // STRIDE), np.float32)
    size = np.zeros_like(heat)
    cell = GRID_NM * STRIDE
    yy, xx = np.indices(heat.shape)
    for x0, y0, x1, y1 in boxes:
        cx, cy = (x0 + x1) / 2 / cell - 0.5, (y0 + y1) / 2 / cell - 0.5
        heat = np.maximum(heat, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 1.0**2)))
        r, c = int(round(cy)), int(round(cx))
        if 0 <= r < heat.shape[0] and 0 <= c < heat.shape[1]:
            heat[r, c] = 1.0
            size[r, c] = (x1 - x0) / 2
    return grid, heat, size


def _loss(out: torch.Tensor, heat: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Penalty-reduced focal loss on the heatmap (CenterNet) plus L1 on the size at centres."""
    p = torch.sigmoid(out[:, 0]).clamp(1e-4, 1 - 1e-4)
    centre = heat == 1.0
    positive = -((1 - p) ** 2 * torch.log(p))[centre].sum()
    negative = -((1 - heat) ** 4 * p**2 * torch.log(1 - p))[~centre].sum()
    count = centre.sum().clamp(min=1)
    return (positive + negative) / count + (out[:, 1] - size).abs()[centre].sum() / count


def train_detector(frames: int = 2000, epochs: int = 15, seed: int = 0, out: Path = DEFAULT_WEIGHTS,
                   progress: Any = None) -> dict[str, Any]:
    """Simulate `frames` scans, train, and save the weights with a JSON descriptor."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    started = time.perf_counter()
    samples = []
    for _ in range(frames):
        samples.append(_sample(rng))
        if progress:
            progress(1)
    net = CentreNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * frames
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    crop = 128
    losses = []
    for epoch in range(epochs):
        for index in rng.permutation(frames):
            grid, heat, size = samples[index]
            top = int(rng.integers(0, max(1, grid.shape[0] - crop) // STRIDE + 1)) * STRIDE
            left = int(rng.integers(0, max(1, grid.shape[1] - crop) // STRIDE + 1)) * STRIDE
            g = grid[top:top + crop, left:left + crop]
            h = heat[top // STRIDE:(top + crop) // STRIDE, left // STRIDE:(left + crop) // STRIDE]
            s = size[top // STRIDE:(top + crop) // STRIDE, left // STRIDE:(left + crop) // STRIDE]
            if rng.random() < 0.5:
                g, h, s = g[:, ::-1], h[:, ::-1], s[:, ::-1]
            if rng.random() < 0.5:
                g, h, s = g[::-1], h[::-1], s[::-1]
            tensors = [torch.from_numpy(np.ascontiguousarray(a))[None] for a in (g, h, s)]
            loss = _loss(net(tensors[0][None]), tensors[1], tensors[2])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        log.info("epoch %d: loss %.3f", epoch, np.mean(losses[-frames:]))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(out))
    summary = {"frames": frames, "epochs": epochs, "seed": seed, "final_loss": round(float(np.mean(losses[-frames:])), 4),
               "seconds": round(time.perf_counter() - started, 1),
               "parameters": sum(p.numel() for p in net.parameters())}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate_detector(detector: MoleculeDetector, frames: int, seed: int, plan: str = "lines:4") -> dict[str, Any]:
    """Precision and recall of supramolecule boxes (IoU >= 0.5) on simulated scans."""
    from stm_live.engines import reconstruct_exact
    from stm_live.engines.classical import ClassicalReconstructor
    from stm_live.localize.evaluation import truth_frame
    from stm_live.plans import parse_plan

    rng = np.random.default_rng(seed)
    found = true = matched = 0
    for _ in range(frames):
        frame = truth_frame("supramolecules", rng, 256)
        image = frame.forward_z_nm.astype(np.float32)
        mask = parse_plan(plan).mask(*image.shape)
        if not mask.all():
            image = reconstruct_exact(ClassicalReconstructor(), np.where(mask, image, np.nan)[None],
                                      mask[None]).images[0]
        result = detector.detect(image, frame.topography.canvas.pixel_nm)
        topo = frame.topography
        truth = topo.molecules_nm[topo.molecule_kinds == "supramolecule"]
        found, true = found + len(result), true + len(truth)
        if len(result) and len(truth):
            from scipy.optimize import linear_sum_assignment

            overlap = iou(result.boxes_nm, truth)
            rows, cols = linear_sum_assignment(-overlap)
            matched += int((overlap[rows, cols] >= 0.5).sum())
    return {"frames": frames, "plan": plan, "supramolecules": true, "detections": found,
            "precision": round(matched / max(1, found), 4), "recall": round(matched / max(1, true), 4)}
