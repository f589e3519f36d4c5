"""`stm-live train-tip`: fit the tip classifier on labelled windows from the simulator.

Windows come from frames of every surface and tip scenario (good, blunt, multi-apex, unstable,
tip change mid-frame), at strides 1, 2 and 4 (full and `lines:K` scans), with extra windows
just after each tip change so the network learns to call a change from its first rows. Windows
near the start of a scan hold the last rows of the scan before it, as the monitor's do on a
rescan (episodes.rescan_windows). The
loss is class-weighted cross-entropy (changes are rare lines); the checkpoint kept is the one
with the lowest loss on a validation set of other frames. Deterministic for a given seed.
Some frames have longer lines (`long_size`, 512 pixels of a frame the same size in nm): the
network pools over the whole line, so the monitor on a 512-pixel line must have seen such lines
in training. Their windows keep their full width and go through in batches of their own.
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
    long_size: int = 512
    long_frames: int = 1500
    long_validation_frames: int = 100
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


def _windows(cfg: TipTrainConfig, size: int, frames: int, validation_frames: int, cache: Path,
             progress: Callable[[int], None]) -> dict[str, np.ndarray]:
    """Training and validation windows of frames with `size`-pixel lines, cached under `cache`."""
    sources = b"".join(Path(module.__file__).read_bytes() for module in (features, classifier, episodes))
    code = hashlib.sha1(sources).hexdigest()[:12]
    key = f"{cfg.seed}-{frames}-{validation_frames}-{cfg.windows_per_frame}-{size}-{code}"
    if cache.exists():
        data = dict(np.load(cache))
        if str(data.pop("key")) == key:
            progress(frames + validation_frames)
            return data
    train = training_windows(cfg.seed, frames, size, cfg.windows_per_frame, cfg.workers, progress)
    valid = training_windows(cfg.seed + 1, validation_frames, size, cfg.windows_per_frame, cfg.workers, progress)
    data = {"x": train[0], "f": train[1], "y": train[2], "vx": valid[0], "vf": valid[1], "vy": valid[2]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, key=key, **data)
    return data


def frames_to_simulate(cfg: TipTrainConfig) -> int:
    """The frames _window_sets simulates (or reads back from its caches): the progress total."""
    return cfg.frames + cfg.validation_frames + (cfg.long_frames + cfg.long_validation_frames if cfg.long_frames else 0)


def _window_sets(cfg: TipTrainConfig, progress: Callable[[int], None]) -> list[dict[str, np.ndarray]]:
    """One set of windows per line length: `size` (with the recorded scans), then `long_size`."""
    cache = Path(cfg.cache)
    sets = [_windows(cfg, cfg.size, cfg.frames, cfg.validation_frames, cache, progress)]
    if cfg.long_frames:
        sets.append(_windows(cfg, cfg.long_size, cfg.long_frames, cfg.long_validation_frames,
                             cache.with_name(f"{cache.stem}-{cfg.long_size}{cache.suffix}"), progress))
    return sets


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


def _evaluate(net: TipNet, sets: list[dict[str, np.ndarray]], loss_fn: nn.Module) -> tuple[float, float]:
    """Validation loss and accuracy over every window of every set."""
    net.eval()
    losses, correct, count = [], 0, 0
    with torch.inference_mode():
        for data in sets:
            x, f, y = data["vx"], data["vf"], data["vy"]
            for i in range(0, len(y), 256):
                logits = net(torch.from_numpy(x[i:i + 256].astype(np.float32)), torch.from_numpy(f[i:i + 256]))
                target = torch.from_numpy(y[i:i + 256])
                losses.append(float(loss_fn(logits, target)) * len(target))
                correct += int((logits.argmax(1) == target).sum())
            count += len(y)
    net.train()
    return sum(losses) / count, correct / count


def epoch_batches(sizes: list[int], batch: int, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
    """One epoch: (set, window indices) batches, each from one set (one line length), in random order."""
    out = []
    for k, n in enumerate(sizes):
        order = rng.permutation(n)
        out.extend((k, np.sort(order[i * batch:(i + 1) * batch])) for i in range(n // batch))
    return [out[i] for i in rng.permutation(len(out))]


def train_tip(cfg: TipTrainConfig, progress: Callable[[int], None] = lambda n: None) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    sets = _window_sets(cfg, progress)
    simulated = time.perf_counter() - started
    train = [_with_real(cfg, sets[0]["x"], sets[0]["f"], sets[0]["y"])]
    train += [(data["x"], data["f"], data["y"]) for data in sets[1:]]
    y = np.concatenate([part[2] for part in train])
    f = np.concatenate([part[1] for part in train])
    counts = np.bincount(y, minlength=len(TIP_STATES)).astype(np.float64)
    weights = torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(TIP_STATES), 0.0) ** 0.5,
                           dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    net = TipNet(cfg.width)
    net.feature_mean.copy_(torch.from_numpy(f.mean(axis=0)))
    net.feature_std.copy_(torch.from_numpy(f.std(axis=0) + 1e-3))
    optimiser = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * sum(len(part[2]) // cfg.batch for part in train)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, cfg.lr, total_steps=steps)
    rng = np.random.default_rng(cfg.seed)
    best = (np.inf, 0.0, -1)
    history = []
    for epoch in range(cfg.epochs):
        for k, idx in epoch_batches([len(part[2]) for part in train], cfg.batch, rng):
            x_k, f_k, y_k = train[k]
            window = torch.from_numpy(x_k[idx].astype(np.float32))
            if rng.random() < 0.5:
                window = window.flip(-1)
            loss = loss_fn(net(window, torch.from_numpy(f_k[idx])), torch.from_numpy(y_k[idx]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        val_loss, val_accuracy = _evaluate(net, sets, loss_fn)
        history.append({"epoch": epoch + 1, "validation_loss": round(val_loss, 4),
                        "validation_accuracy": round(val_accuracy, 4)})
        log.info("epoch %d: validation loss %.4f, accuracy %.3f", epoch + 1, val_loss, val_accuracy)
        if val_loss < best[0]:
            best = (val_loss, val_accuracy, epoch + 1)
            save_classifier(net, Path(cfg.weights), {"width": cfg.width, "training": asdict(cfg),
                                                     "epoch": epoch + 1, "validation_loss": round(val_loss, 4),
                                                     "validation_accuracy": round(val_accuracy, 4)})
    lengths = [cfg.size, cfg.long_size][:len(train)]
    return {"windows": int(len(y)),
            "windows_by_line_length": {str(n): int(len(part[2])) for n, part in zip(lengths, train)},
            "class_counts": dict(zip(TIP_STATES, counts.astype(int).tolist())),
            "simulation_s": round(simulated, 1), "total_s": round(time.perf_counter() - started, 1),
            "best_epoch": best[2], "validation_loss": round(best[0], 4), "validation_accuracy": round(best[1], 4),
            "history": history, "weights": cfg.weights}
