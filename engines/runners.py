"""Inference backends for the learned model: one runner interface, several implementations.

A runner has a life cycle (activate, infer, deactivate) and maps a (B, 2, H, W) float32 batch to
the network's (B, 2, H, W) output. `auto` takes the first that loads from AUTO_ORDER: PyTorch on
CUDA where a GPU is present, else ONNX Runtime (measured on the 2-core development machine at
256x256: 23.5 ms against PyTorch's 32.8 ms at batch 1, 92 against 175 ms at batch 4), else PyTorch
on the CPU. TensorRT is not implemented yet; `stm-live engines` says so.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from stm_live.models.weights import DEFAULT_WEIGHTS, load_model

log = logging.getLogger(__name__)


class Runner(ABC):
    name = "abstract"

    def __init__(self, weights: Path = DEFAULT_WEIGHTS, threads: int | None = None) -> None:
        self.weights, self.threads = Path(weights), threads

    @abstractmethod
    def activate(self) -> None: ...

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def deactivate(self) -> None:
        """Release what activate() took."""


class TorchRunner(Runner):
    def __init__(self, weights: Path = DEFAULT_WEIGHTS, threads: int | None = None, device: str = "cpu") -> None:
        super().__init__(weights, threads)
        self.device = device
        self.name = f"torch-{device}"
        self.model = None

    def activate(self) -> None:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        if self.threads:
            torch.set_num_threads(self.threads)
        self.model, _ = load_model(self.weights)
        self.model.to(self.device)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()

    def deactivate(self) -> None:
        self.model = None


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def activate(self) -> None:
        import onnxruntime

        from stm_live.engines.torch_model import export_onnx

        digest = hashlib.sha256(self.weights.read_bytes()).hexdigest()[:16]
        path = Path(tempfile.gettempdir()) / f"stm-live-masked-unet-{digest}.onnx"
        if not path.exists():
            partial = path.with_suffix(".partial")
            export_onnx(str(partial), self.weights)
            partial.replace(path)
        options = onnxruntime.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in onnxruntime.get_available_providers()]
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        self.name = f"onnxruntime-{self.session.get_providers()[0].removesuffix('ExecutionProvider').lower()}"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input": np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def deactivate(self) -> None:
        self.session = None


BACKENDS = {
    "torch-cuda": lambda w, t: TorchRunner(w, t, "cuda"),
    "onnxruntime": lambda w, t: OnnxRuntimeRunner(w, t),
    "torch-cpu": lambda w, t: TorchRunner(w, t, "cpu"),
}
AUTO_ORDER = ("torch-cuda", "onnxruntime", "torch-cpu")


def backend_chain(name: str) -> tuple[str, ...]:
    """The backends to try, first choice first; a named backend falls back along AUTO_ORDER."""
    if name == "auto":
        return AUTO_ORDER
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected auto or one of {', '.join(BACKENDS)}")
    return (name, *[b for b in AUTO_ORDER if b != name])


def describe_backends() -> list[dict]:
    """What `stm-live engines` prints: each backend, whether it loads here, and why not."""
    rows = []
    for name, make in BACKENDS.items():
        try:
            runner = make(DEFAULT_WEIGHTS, None)
            runner.activate()
            runner.deactivate()
            rows.append({"backend": name, "available": True, "detail": runner.name})
        except Exception as exc:
            rows.append({"backend": name, "available": False, "detail": f"{type(exc).__name__}: {exc}"})
    try:
        import tensorrt  # noqa: F401

        detail = "tensorrt imports, but the TensorRT backend is not implemented yet"
    except ImportError as exc:
        detail = f"not installed ({exc})"
    rows.append({"backend": "tensorrt", "available": False, "detail": detail})
    return rows
