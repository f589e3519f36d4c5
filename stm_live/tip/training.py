"""`stm-live train-tip`: fit the tip classifier on labelled windows from the simulator.

Windows come from frames of every surface and tip scenario (good, blunt, multi-apex, unstable,
tip change mid-frame), at strides 1, 2 and 4 (full and `lines:K` scans), with extra windows
just after each tip change so the network learns to call a change from its first rows. Windows
near the start of a scan hold the last rows of the scan before it, as the monitor's do on a
rescan (episodes.rescan_windows). The
loss is class-weighted cross-entropy (changes are rare lines); the checkpoint kept is the one
with the lowest loss on a validation set of other frames. Deterministic for a given seed.
`real_good` adds every window of recorded scans whose tip is known to be good (the shipped
weights: `stm-live train tip --epochs 8 --real-good Si_7x7_028.sxm Si_7x7_012.sxm
Au111_pySPM_test.sxm`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stm_live.protocol import TIP_STATES
from stm_live.tip import classifier, episodes, features
from stm_live.tip.classifier import TipNet, save_classifier
from stm_live.tip.episodes import rescan_windows, scan_file_sequences, training_windows

log = logging.getLogger(__name__)


@dataclass
class TipTrainConfig:
    weights: str = "stm_live/tip/weights/tip_classifier.safetensors"
    cache: str = "runs/tip-classifier/windows.npz"
    frames: int = 8000
    validation_frames: int = 400
    windows_per_frame: int = 10
    size: int = 256
    width: int = 24
    epochs: int = 10
    batch: int = 64
    lr: float = 2e-3
    seed: int = 0
    threads: int = 2
    workers: int = 2
    real_dir: str = "../shared/data/real"
    real_good: tuple[str, ...] = ()
    real_copies: int = 6


def _windows(cfg: TipTrainConfig, progress: Callable[[int], None]) -> dict[str, np.ndarray]:
    cache = Path(cfg.cache)
    sources = b"".join(Path(module.__file__).read_bytes() for module in (features, classifier, episodes))
    code = hashlib.sha1(sources).hexdigest()[:12]
    key = f"{cfg.seed}-{cfg.frames}-{cfg.validation_frames}-{cfg.windows_per_frame}-{cfg.size}-{code}"
    if cache.exists():
        data = dict(np.load(cache))
        if str(data.pop("key")) == key:
            return data
    train = training_windows(cfg.seed, cfg.frames, cfg.size, cfg.windows_per_frame, cfg.workers, progress)
    valid = training_windows(cfg.seed + 1, cfg.validation_frames, cfg.size, cfg.windows_per_frame, cfg.workers,
                             progress)
    data = {"x": train[0], "f": train[1], "y": train[2], "vx": valid[0], "vf": valid[1], "vy": valid[2]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, key=key, **data)
    return data


def _with_real(cfg: TipTrainConfig, x: np.ndarray, f: np.ndarray, y: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add every window the monitor reads of the recorded good-tip scans found in `real_dir` (the
    first ones read on from the scan's own last rows, as from a rescan), `real_copies` times."""
    parts = [(x, f, y)]
    for name in cfg.real_good:
        path = Path(cfg.real_dir) / name
        if not path.exists():
            log.warning("recorded scan %s not found; training without it", path)
            continue
        for sequence in scan_file_sequences(path):
            ends = np.arange(len(sequence.labels))
            parts.extend([rescan_windows(sequence, sequence, ends)] * cfg.real_copies)
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]


def _evaluate(net: TipNet, x: np.ndarray, f: np.ndarray, y: np.ndarray, loss_fn: nn.Module) -> tuple[float, float]:
    net.eval()
    losses, correct = [], 0
    with torch.inference_mode():
        for i in range(0, len(y), 256):
            logits = net(torch.from_numpy(x[i:i + 256].astype(np.float32)), torch.from_numpy(f[i:i + 256]))
            target = torch.from_numpy(y[i:i + 256])
            losses.append(float(loss_fn(logits, target)) * len(target))
            correct += int((logits.argmax(1) == target).sum())
    net.train()
    return sum(losses) / len(y), correct / len(y)


def train_tip(cfg: TipTrainConfig, progress: Callable[[int], None] = lambda n: None) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    data = _windows(cfg, progress)
    simulated = time.perf_counter() - started
    x, f, y = _with_real(cfg, data["x"], data["f"], data["y"])
    counts = np.bincount(y, minlength=len(TIP_STATES)).astype(np.float64)
    weights = torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(TIP_STATES), 0.0) ** 0.5,
                           dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    net = TipNet(cfg.width)
    net.feature_mean.copy_(torch.from_numpy(f.mean(axis=0)))
    net.feature_std.copy_(torch.from_numpy(f.std(axis=0) + 1e-3))
    optimiser = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * (len(y) // cfg.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, cfg.lr, total_steps=steps)
    rng = np.random.default_rng(cfg.seed)
    best = (np.inf, 0.0, -1)
    history = []
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(y))
        for i in range(len(y) // cfg.batch):
            idx = np.sort(order[i * cfg.batch:(i + 1) * cfg.batch])
            window = torch.from_numpy(x[idx].astype(np.float32))
            if rng.random() < 0.5:
                window = window.flip(-1)
            loss = loss_fn(net(window, torch.from_numpy(f[idx])), torch.from_numpy(y[idx]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        val_loss, val_accuracy = _evaluate(net, data["vx"], data["vf"], data["vy"], loss_fn)
        history.append({"epoch": epoch + 1, "validation_loss": round(val_loss, 4),
                        "validation_accuracy": round(val_accuracy, 4)})
        log.info("epoch %d: validation loss %.4f, accuracy %.3f", epoch + 1, val_loss, val_accuracy)
        if val_loss < best[0]:
            best = (val_loss, val_accuracy, epoch + 1)
            save_classifier(net, Path(cfg.weights), {"width": cfg.width, "training": asdict(cfg),
                                                     "epoch": epoch + 1, "validation_loss": round(val_loss, 4),
                                                     "validation_accuracy": round(val_accuracy, 4)})
    return {"windows": int(len(y)), "class_counts": dict(zip(TIP_STATES, counts.astype(int).tolist())),
            "simulation_s": round(simulated, 1), "total_s": round(time.perf_counter() - started, 1),
            "best_epoch": best[2], "validation_loss": round(best[0], 4), "validation_accuracy": round(best[1], 4),
            "history": history, "weights": cfg.weights}
