"""The learned engine: MaskedUNet through a runner (engines.runners: TensorRT, PyTorch, ONNX Runtime).

Per frame: normalise from the measured pixels (plane and spread), pad to the network's size
multiple, infer mean and log-variance, map back to physical units. The uncertainty is the
predicted standard deviation (0 at measured pixels once `reconstruct_exact` restores them).
Rows beyond the scanned span stay NaN, as with the classical engine. All of it runs batched in
torch on the runner's device: on a GPU only the measurement and its mask go up and the frames
and their uncertainty come down.

The stochastic reconstructions of localization maps (stm_live.localize.locmap) run through this
engine like any other: N perturbed copies of the measurement in one batch.

A runner that fails to load or to run is logged and replaced by the next in its chain, and the
batch is run again, so no frame is lost to a backend failure.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from stm_live.engines.base import EngineError, Reconstruction, Reconstructor, inferable_rows, serial_blas
from stm_live.engines.cuda_graphs import GraphCache
from stm_live.engines.runners import BACKENDS, Runner, RunnerOptions, backend_chain
from stm_live.models.architecture import INPUTS, MIN_SIZE, SIZE_MULTIPLE
from stm_live.models.normalize import DeviceSteps, Planes, network_input, normalise, summarize
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
        graphs = self.options.cuda_graphs  # device work around the network, replayed like it
        self._steps = DeviceSteps(GraphCache(summarize, graphs), GraphCache(normalise, graphs))
        self._finishers = {precision: GraphCache(partial(finish, precision=precision), graphs)
                           for precision in (torch.float32, torch.float64)}

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

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 2, H, W) mean and log-variance on the batch's device, whichever runner served it."""
        height, width = batch.shape[-2:]
        pad_h = max(MIN_SIZE, height + (-height % SIZE_MULTIPLE)) - height
        pad_w = max(MIN_SIZE, width + (-width % SIZE_MULTIPLE)) - width
        padded = F.pad(batch, (0, pad_w, 0, pad_h)) if pad_h or pad_w else batch
        while True:
            try:
                out = self.runner.infer(padded.to(self.runner.device))[..., :height, :width]
                break
            except Exception:
                log.exception("backend %s failed; switching to the next one", self.runner.name)
                self.runner.deactivate()
                self._next_runner()
        return out.to(batch.device)

    def reconstruct(self, measured: np.ndarray, mask: np.ndarray) -> Reconstruction:
        with serial_blas(), torch.inference_mode():
            return self._reconstruct(measured, mask)

    def _reconstruct(self, measured: np.ndarray, mask: np.ndarray) -> Reconstruction:
        """Only the rows a frame of the batch can be inferred in (its measured span plus one row
        spacing) and the columns around the measured ones get values; the rest stays NaN. A CPU
        runner computes just that window (a frame still being scanned costs in proportion to
        what has been scanned, a batcher's padding is mostly left out); a runner for which each
        new shape costs a capture or rebuild (`fixed_shapes`) computes whole frames."""
        spans = np.array([inferable_rows(k) for k in mask])
        top, bottom = int(spans[:, 0].min()), int(spans[:, 1].max())
        left, right = inferable_rows(mask.any(axis=0).T)
        precision = torch.float32 if measured.dtype == np.float32 else torch.float64
        empty = np.full(measured.shape, np.nan, dtype=np.float32 if precision == torch.float32 else np.float64)
        if bottom <= top:
            return Reconstruction(empty, empty.astype(np.float32))
        window = (slice(None), slice(None), slice(None)) if self.runner.fixed_shapes else \
            (slice(None), slice(top, bottom), slice(left, right))
        rows, cols = np.arange(measured.shape[1])[window[1]], np.arange(measured.shape[2])[window[2]]
        device = self.runner.device
        values = torch.from_numpy(np.ascontiguousarray(measured[window])).to(device)
        known = torch.from_numpy(np.ascontiguousarray(mask[window])).to(device)
        inputs, planes = network_input(values, known, self._steps)
        rows_inside = torch.from_numpy((rows >= spans[:, :1]) & (rows < spans[:, 1:])).to(device)
        cols_inside = torch.from_numpy((cols >= left) & (cols < right)).to(device)
        out = self._finishers[precision](self._infer(inputs), planes.coef, planes.scale, rows_inside, cols_inside)
        images, uncertainty = out.cpu().numpy()  # one transfer brings frames and uncertainty
        if images.shape != measured.shape:  # a window: placed in frames NaN elsewhere
            window_images, window_uncertainty = images, uncertainty
            images, uncertainty = empty, empty.astype(np.float32)
            images[window], uncertainty[window] = window_images, window_uncertainty
        return Reconstruction(images, uncertainty.astype(np.float32, copy=False))


def finish(out: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor, rows_inside: torch.Tensor,
           cols_inside: torch.Tensor, precision: torch.dtype) -> torch.Tensor:
    """(2, B, H, W) in `precision`: the network's mean in physical units and its standard
    deviation, NaN outside the rows (B, H) and columns (W) that may be inferred."""
    inside = rows_inside[:, :, None] & cols_inside[None, None, :]
    frames = torch.where(inside, Planes(coef, scale).inverse(out[:, 0]), torch.nan)
    sigma = torch.where(inside, torch.exp(0.5 * out[:, 1].double()) * scale[:, None, None], torch.nan)
    return torch.stack([frames, sigma]).to(precision)


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
