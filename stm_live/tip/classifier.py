"""The learned tip classifier: a small CNN over a window of recent rows plus their physical features.

Input: the last WINDOW_ROWS rows in acquisition order (forward and backward trace, each line
detrended, the window scaled by its typical line spread) and a summary of their physical
features (newest row, window mean, window maximum). Output: probabilities for the simulator's
tip states (good, blunt, multi, unstable, changed). The image branch sees what features alone
miss (doubled motifs of a multi-apex tip, broadened atoms); the feature branch carries absolute
scales the normalised image has lost (height steps, noise in nm, pixel size).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stm_live.protocol import TIP_STATES
from stm_live.tip.features import N_FEATURES, Row, detrend

WINDOW_ROWS = 32
CLIP = 8.0
CLEARLY_GOOD = 0.9  # one view this sure of a good tip is not checked against its mirror image
DEFAULT_WEIGHTS = Path(__file__).with_name("weights") / "tip_classifier.safetensors"


def window_image(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """(rows, cols) forward and backward heights -> the network's (2, rows, cols) float32 input."""
    stacked = detrend(np.stack([forward, backward]).astype(np.float64))
    return _scaled(stacked, stacked.std(axis=-1))


def window_of_rows(rows: Sequence[Row]) -> np.ndarray:
    """The same input from rows detrended once as they arrived (the monitor's window)."""
    stacked = np.stack([np.stack([r.forward for r in rows]),
                        np.stack([r.forward if r.backward is None else r.backward for r in rows])])
    spreads = np.array([[r.forward_spread for r in rows], [r.backward_spread for r in rows]])
    return _scaled(stacked, spreads)


def _scaled(stacked: np.ndarray, spreads: np.ndarray) -> np.ndarray:
    """Detrended lines divided by their median spread, clipped: the scale of the surface is gone,
    its shape and the outliers' sign stay."""
    scale = float(np.median(spreads)) + 1e-9
    return np.clip(stacked / scale, -CLIP, CLIP).astype(np.float32)


def summarize(features: np.ndarray) -> np.ndarray:
    """(rows, N_FEATURES) per-row features -> newest row, mean and maximum over the window."""
    return np.concatenate([features[-1], features.mean(axis=0), features.max(axis=0)]).astype(np.float32)


class TipNet(nn.Module):
    def __init__(self, width: int = 24, classes: int = len(TIP_STATES)) -> None:
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(2, width, (3, 5), stride=(1, 2), padding=(1, 2)), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=(1, 2), padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
        )
        self.features = nn.Sequential(nn.Linear(3 * N_FEATURES, 32), nn.GELU())
        self.head = nn.Sequential(nn.Linear(4 * width + 32, 64), nn.GELU(), nn.Linear(64, classes))
        self.register_buffer("feature_mean", torch.zeros(3 * N_FEATURES))
        self.register_buffer("feature_std", torch.ones(3 * N_FEATURES))

    def forward(self, window: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h = self.image(window)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        f = self.features((features - self.feature_mean) / self.feature_std)
        return self.head(torch.cat([pooled, f], dim=1))


class TipClassifier:
    """Inference wrapper: numpy window in, class probabilities out.

    The network runs on ONNX Runtime, exported from the weights when they are loaded, on one
    thread: for this small network it is two to three times as fast as PyTorch on a CPU
    (docs/tip-monitor.md), and the monitor reads every line.
    """

    def __init__(self, path: Path = DEFAULT_WEIGHTS, threads: int = 1) -> None:
        self.descriptor = json.loads(path.with_suffix(".json").read_text())
        self.net = TipNet(self.descriptor["width"])
        self.net.load_state_dict(load_file(str(path)))
        self.net.eval()
        self.classes = tuple(self.descriptor["classes"])
        self.good = self.classes.index("good")
        self.mirrored = 0  # windows read twice
        self.session = _session(self.net, threads)

    def probabilities(self, image: np.ndarray, summary: np.ndarray) -> np.ndarray:
        """Class probabilities of one window. Unless the window is clearly good, the mean over it
        and its left-right mirror image (a view training also shows the network), so that a call
        one view's quirk would make alone is halved; a clearly good window, most windows of a
        working tip, costs one pass."""
        features = summary[None].astype(np.float32, copy=False)
        p = self._softmax(image[None], features)
        if p[self.good] >= CLEARLY_GOOD:
            return p
        self.mirrored += 1
        return (p + self._softmax(np.ascontiguousarray(image[None, ..., ::-1]), features)) / 2

    def _softmax(self, window: np.ndarray, features: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {"window": window.astype(np.float32, copy=False), "features": features})[0][0]
        e = np.exp(logits - logits.max())
        return e / e.sum()


def _session(net: TipNet, threads: int) -> ort.InferenceSession:
    """The network as an ONNX Runtime session, any batch and window size."""
    window = torch.zeros(1, 2, WINDOW_ROWS, 64)
    features = torch.zeros(1, 3 * N_FEATURES)
    model = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(net, (window, features), model, input_names=["window", "features"], output_names=["logits"],
                          dynamic_axes={"window": {0: "batch", 2: "rows", 3: "cols"}, "features": {0: "batch"}},
                          opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.getvalue(), options, providers=["CPUExecutionProvider"])


def save_classifier(net: TipNet, path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))
    descriptor = {"architecture": "TipNet", "classes": list(TIP_STATES), "window_rows": WINDOW_ROWS, **meta}
    path.with_suffix(".json").write_text(json.dumps(descriptor, indent=2) + "\n")
