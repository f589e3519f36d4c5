"""The learned engine: MaskedUNet through a runner (engines.runners: TensorRT, PyTorch, ONNX Runtime).

Per frame: normalise from the measured pixels (plane and spread), pad to the network's size
multiple, infer mean and log-variance, map back to physical units. The uncertainty is the
predicted standard deviation (0 at measured pixels once `reconstruct_exact` restores them).
Rows beyond the scanned span stay NaN, as with the classical engine.

The stochastic reconstructions of localization maps (stm_live.localize.locmap) run through this
engine like any other: N perturbed copies of the measurement in one batch.

A runner that fails to load or to run is logged and replaced by the next in its chain, and the
batch is run again, so no frame is lost to a backend failure.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from stm_live.engines.base import EngineError, Reconstruction, Reconstructor, inferable_rows, serial_blas
from stm_live.engines.runners import BACKENDS, Runner, RunnerOptions, backend_chain
from stm_live.models.architecture import INPUTS, MIN_SIZE, SIZE_MULTIPLE
from stm_live.models.normalize import fit_transform, network_input
from stm_live.models.weights import DEFAULT_WEIGHTS, load_model

log = logging.getLogger(__name__)


class ModelReconstructor(Reconstructor):
    name = "masked-unet"

    def __init__(self, weights: Path = DEFAULT_WEIGHTS, backend: str = "auto", threads: int | None = None,
                 options: RunnerOptions | None = None) -> None:
        self.weights = Path(weights)
        self.options = options or RunnerOptions(threads=threads)
        self.chain = list(backend_chain(backend))
        self.runner: Runner | None = None
        self._next_runner()

    def _next_runner(self) -> None:
        while self.chain:
            candidate = BACKENDS[self.chain.pop(0)](self.weights, self.options)
            try:
                candidate.activate()
            except Exception as exc:
                log.info("backend %s unavailable: %s: %s", candidate.name, type(exc).__name__, exc)
                continue
            self.runner = candidate
            log.info("masked-unet runs on %s", candidate.name)
            return
        raise EngineError("no inference backend could be loaded for the model")

    @property
    def backend(self) -> str:
        return self.runner.name

    def _infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        height, width = batch.shape[-2:]
        pad_h = max(MIN_SIZE, height + (-height % SIZE_MULTIPLE)) - height
        pad_w = max(MIN_SIZE, width + (-width % SIZE_MULTIPLE)) - width
        padded = np.pad(batch, ((0, 0), (0, 0), (0, pad_h), (0, pad_w))) if pad_h or pad_w else batch
        while True:
            try:
                out = self.runner.infer(padded)[..., :height, :width]
                break
            except Exception:
                log.exception("backend %s failed; switching to the next one", self.runner.name)
                self.runner.deactivate()
                self._next_runner()
        return out[:, 0], out[:, 1]

    def reconstruct(self, measured: np.ndarray, mask: np.ndarray) -> Reconstruction:
        with serial_blas():
            return self._reconstruct(measured, mask)

    def _reconstruct(self, measured: np.ndarray, mask: np.ndarray) -> Reconstruction:
        """The network runs on the rows any frame of the batch can be inferred in (a frame still
        being scanned costs in proportion to what has been scanned) and on the columns around
        the measured ones (a batcher's padding is mostly left out); the rest stays NaN."""
        spans = [inferable_rows(k) for k in mask]
        top, bottom = min(s[0] for s in spans), max(s[1] for s in spans)
        left, right = inferable_rows(mask.any(axis=0).T)
        images = np.full(measured.shape, np.nan)
        uncertainty = np.full(measured.shape, np.nan, dtype=np.float32)
        if bottom <= top:
            return Reconstruction(images, uncertainty)
        window = (slice(top, bottom), slice(left, right))
        measured, mask = measured[:, window[0], window[1]], mask[:, window[0], window[1]]
        transforms = [fit_transform(m, k) for m, k in zip(measured, mask)]
        batch = np.stack([network_input(m, k, t) for m, k, t in zip(measured, mask, transforms)])
        mean, log_var = self._infer(batch)
        for i, (t, (first, last)) in enumerate(zip(transforms, spans)):
            rows = slice(first - top, last - top)
            images[i, first:last, window[1]] = t.inverse(mean[i])[rows]
            uncertainty[i, first:last, window[1]] = (np.exp(0.5 * log_var[i]) * t.scale)[rows]
        return Reconstruction(images, uncertainty)


def export_onnx(path: str, weights: Path = DEFAULT_WEIGHTS, opset: int = 17, half: bool = False) -> None:
    """ONNX with dynamic batch, height and width (multiples of the size multiple); `half` exports
    fp16 weights and input/output (traced on the GPU, which half convolutions need)."""
    model, _ = load_model(weights)
    example = torch.zeros(1, len(INPUTS), 64, 64)
    if half:
        if not torch.cuda.is_available():
            raise EngineError("an fp16 ONNX export is traced on a CUDA device; none is present")
        model, example = model.to("cuda", torch.float16), example.to("cuda", torch.float16)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        torch.onnx.export(model, example, path, input_names=["input"], output_names=["output"], opset_version=opset,
                          dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                                        "output": {0: "batch", 2: "height", 3: "width"}}, dynamo=False)
