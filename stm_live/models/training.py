"""`stm-live train`: teach MaskedUNet to fill what a sparse scan skipped.

Data: simulator frames (both traces of the recorded height, all surfaces and tip scenarios,
generated once into shards) plus, optionally, real scans (both traces). Each sample is a random
crop, flipped at random, under a random sampling mask: every-K-th line with a random phase
(K = 2..8, sometimes with lines lost in transfer), the first N rows of such a scan (a frame still
being acquired), a random fraction of pixels, or a coarse grid (super-resolution, K = 2 or 4).
The target is the full recorded crop; the loss (on the unmeasured pixels) is a Huber loss of the
predicted mean plus the Gaussian negative log-likelihood of the predicted variance, which so
becomes the per-pixel uncertainty.
Training is deterministic for a given seed and resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from stm_live.drivers.scanfiles import read_scan_file
from stm_live.engines.base import inferable_rows
from stm_live.models.architecture import MaskedUNet
from stm_live.models.normalize import network_input
from stm_live.models.weights import save_weights

log = logging.getLogger(__name__)

CLIP = 20.0  # normalised units: spikes of an unstable tip beyond this carry no shape to learn

# Real scans with a height channel (the Au/mica and qPlus files are constant-height scans, flat in
# Z); Si_7x7_051 and Si_7x7_032 are held out for evaluation.
DEFAULT_REAL_TRAINING = ("Si_7x7_028.sxm", "Si_7x7_012.sxm", "Au111_pySPM_test.sxm")


@dataclass
class TrainConfig:
    out_dir: str = "runs/masked-unet-prefill"
    weights: str = "stm_live/models/weights/masked_unet.safetensors"
    data_dir: str = "data/sim-train"
    sim_frames: int = 2048
    sim_size: int = 256
    real_dir: str = "../shared/data/real"
    real_files: list[str] = field(default_factory=lambda: list(DEFAULT_REAL_TRAINING))
    real_fraction: float = 0.15
    width: int = 32
    steps: int = 8000
    batch: int = 8
    crop: int = 128
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 500
    threads: int = 2


def random_mask(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """One of the sampling patterns the daemon meets, at a random phase."""
    mask = np.zeros((rows, cols), bool)
    kind = rng.random()
    if kind < 0.55:
        k = int(rng.choice([2, 3, 4, 4, 5, 6, 8, 8]))
        mask[int(rng.integers(k))::k] = True
        if rng.random() < 0.2:
            mask[rng.random(rows) < 0.1] = False
        if rng.random() < 0.15:
            mask[int(rng.integers(rows // 4, rows)):] = False
    elif kind < 0.75:
        mask = rng.random((rows, cols)) < rng.uniform(0.1, 0.5)
    else:
        k = int(rng.choice([2, 4, 4]))
        mask[int(rng.integers(k))::k, int(rng.integers(k))::k] = True
    if not mask.any():
        mask[0] = True
    return mask


class TrainingImages:
    """Full recorded frames held in memory, sampled as augmented, masked crops."""

    def __init__(self, sim: list[np.ndarray], real: list[np.ndarray], real_fraction: float) -> None:
        self.sim, self.real, self.real_fraction = sim, real, real_fraction if real else 0.0

    def batch(self, rng: np.random.Generator, size: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
        patches, masks, ignored = [], [], []
        for _ in range(size):
            pool = self.real if rng.random() < self.real_fraction else self.sim
            image = pool[int(rng.integers(len(pool)))]
            r0, c0 = (int(rng.integers(0, n - crop + 1)) for n in image.shape)
            patch = image[r0:r0 + crop, c0:c0 + crop]
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
            if rng.random() < 0.5:
                patch = patch[::-1]
            mask = random_mask(rng, crop, crop)
            top, bottom = inferable_rows(mask)
            beyond = mask.copy()
            beyond[:top] = beyond[bottom:] = True
            patches.append(patch)
            masks.append(mask)
            ignored.append(beyond)
        image, mask = torch.from_numpy(np.stack(patches).astype(np.float64)), torch.from_numpy(np.stack(masks))
        inputs, planes = network_input(image, mask)
        inputs = inputs.clamp(-CLIP, CLIP)
        truth = planes.forward(image).clamp(-CLIP, CLIP)
        return inputs, torch.stack([truth, torch.from_numpy(np.stack(ignored)).float()], 1)


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, variance_weight: float = 0.1) -> torch.Tensor:
    """Over the unmeasured pixels: Huber loss of the mean (MSE near the truth, robust to spikes)
    plus the Gaussian negative log-likelihood of the variance around the detached mean, so a
    confident wrong variance cannot push the mean around."""
    mean, log_var = prediction[:, :1], prediction[:, 1:2]
    truth, ignored = target[:, :1], target[:, 1:2]
    weight = 1.0 - ignored
    total = weight.sum().clamp_min(1.0)
    huber = torch.nn.functional.huber_loss(mean, truth, reduction="none", delta=1.0)
    squared = ((truth - mean.detach()) ** 2).clamp_max(100.0)
    nll = 0.5 * (log_var + squared * torch.exp(-log_var))
    return ((huber + variance_weight * nll) * weight).sum() / total


def load_images(config: TrainConfig, progress=None) -> TrainingImages:
    from stm_live.sim.dataset import generate, read_shard

    data_dir = Path(config.data_dir)
    if not (data_dir / "dataset.json").exists() or \
            json.loads((data_dir / "dataset.json").read_text()).get("frames") != config.sim_frames:
        log.info("simulating %d training frames into %s", config.sim_frames, data_dir)
        generate(data_dir, config.sim_frames, seed=config.seed, size_px=config.sim_size, workers=config.threads,
                 progress=progress)
    sim = []
    for shard in sorted(data_dir.glob("shard-*.h5")):
        z = read_shard(shard)["z"].astype(np.float64)
        sim.extend(z.reshape(-1, *z.shape[-2:]))
    real = []
    for name in config.real_files:
        path = Path(config.real_dir) / name
        if not path.exists():
            log.warning("real training scan %s not found; training without it", path)
            continue
        scan = read_scan_file(path)
        height = next((c for c in scan.channels if c.name in ("Z", "Topography")), scan.channels[0])
        for trace in (height.forward, height.backward):
            if trace is not None and np.isfinite(trace).all() and min(trace.shape) >= config.crop:
                real.append(trace.astype(np.float64))
    log.info("training images: %d simulated, %d real", len(sim), len(real))
    return TrainingImages(sim, real, config.real_fraction)


def train(config: TrainConfig, resume: bool = True) -> dict:
    from tqdm import tqdm

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = load_images(config)
    model = MaskedUNet(config.width)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, total_steps=config.steps,
                                                   pct_start=0.05)
    rng = np.random.default_rng(config.seed)
    step, history = 0, []
    checkpoint = out / "checkpoint.pt"
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        step, history = state["step"], state["history"]
        log.info("resumed from step %d", step)
    started = time.perf_counter()
    model.train()
    with tqdm(total=config.steps, initial=step, unit="step", desc="training") as bar:
        while step < config.steps:
            inputs, targets = images.batch(rng, config.batch, config.crop)
            loss = reconstruction_loss(model(inputs), targets)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            step += 1
            history.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(history[-100:]):.3f}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                            "schedule": schedule.state_dict(), "rng": rng.bit_generator.state,
                            "torch_rng": torch.get_rng_state(), "step": step, "history": history}, checkpoint)
    seconds = time.perf_counter() - started
    summary = {"steps": step, "seconds_this_run": round(seconds, 1), "final_loss": float(np.mean(history[-200:])),
               "config": asdict(config)}
    save_weights(model, Path(config.weights), {"width": config.width, "training": summary})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
