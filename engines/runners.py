"""Inference backends for the learned model: one runner interface, several implementations.

A runner has a life cycle (activate, infer, deactivate) and maps a (B, C, H, W) float32 torch
batch (C = len(INPUTS): value, mask, classical fill) on its `device` to the network's
(B, 2, H, W) float32 output on the same device: the engine prepares batches where the runner
runs, so a GPU backend receives measurements and masks and returns finished frames. `auto`
takes the first that loads from AUTO_ORDER: TensorRT where it is installed with a GPU, else
PyTorch on CUDA, else ONNX Runtime (measured on the 2-core development machine at 256x256, the
earlier two-input network: 23.5 ms against PyTorch's 32.8 ms at batch 1, 92 against 175 ms at
batch 4), else PyTorch on the CPU. The parity tests (tests/test_engine_parity.py) passed for
PyTorch CUDA on an H100 (2026-11-24); TensorRT's run wherever it is installed.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from stm_live.engines.cuda_graphs import GraphCache
from stm_live.models.architecture import INPUTS
from stm_live.models.weights import DEFAULT_WEIGHTS, load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerOptions:
    """How a runner runs the model: CPU threads; on CUDA backends half precision and (PyTorch)
    CUDA-graph capture; TensorRT's optimization profile (min, opt, max of batch and frame side)
    and where built engines and timing caches are kept."""

    threads: int | None = None
    half: bool = False
    cuda_graphs: bool = True
    trt_batch: tuple[int, int, int] = (1, 8, 32)
    trt_size_px: tuple[int, int, int] = (32, 256, 1024)
    cache_dir: str = "~/.cache/stm-live"

    @property
    def cache(self) -> Path:
        path = Path(self.cache_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path


class Runner(ABC):
    name = "abstract"
    device = "cpu"
    fixed_shapes = False  # True: each new input shape costs a capture or an engine rebuild

    def __init__(self, weights: Path = DEFAULT_WEIGHTS, options: RunnerOptions = RunnerOptions()) -> None:
        self.weights, self.options = Path(weights), options

    @abstractmethod
    def activate(self) -> None: ...

    @abstractmethod
    def infer(self, batch: torch.Tensor) -> torch.Tensor: ...

    def deactivate(self) -> None:
        """Release what activate() took."""


class TorchRunner(Runner):
    """PyTorch on the CPU, or on CUDA in fp32 or fp16; on CUDA each (batch, height, width) shape
    is captured once as a CUDA graph and replayed (one launch per call instead of one per layer).
    fp32 on CUDA is strict fp32 (TF32 convolutions off): TF32 differs from the CPU by ~1e-3.
    fp16 runs channels-last, the tensor cores' layout (H100, 32 x 256 x 256: 2.9 against 3.2 ms;
    fp32 is faster as it is)."""

    def __init__(self, weights: Path = DEFAULT_WEIGHTS, options: RunnerOptions = RunnerOptions(),
                 device: str = "cpu") -> None:
        super().__init__(weights, options)
        self.device = device
        self.half = options.half and device == "cuda"
        self.name = f"torch-{device}" + ("-fp16" if self.half else "")
        self.fixed_shapes = device == "cuda" and options.cuda_graphs
        self.model = self.graphs = None

    def activate(self) -> None:
        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device")
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        self.dtype = torch.float16 if self.half else torch.float32
        self.layout = torch.channels_last if self.half else torch.contiguous_format
        model, _ = load_model(self.weights)
        self.model = model.to(self.device, self.dtype, memory_format=self.layout)
        self.graphs = GraphCache(self.model, enabled=self.device == "cuda" and self.options.cuda_graphs)

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.graphs(batch.to(self.device, self.dtype, memory_format=self.layout)).float()

    def deactivate(self) -> None:
        self.model = self.graphs = None


def _digest(weights: Path) -> str:
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16]


def _onnx_path(weights: Path, half: bool = False) -> Path:
    """The model's ONNX export (dynamic batch and size), kept next to other exports by content hash."""
    from stm_live.engines.torch_model import export_onnx

    path = Path(tempfile.gettempdir()) / f"stm-live-masked-unet-{_digest(weights)}{'-fp16' if half else ''}.onnx"
    if not path.exists():
        partial = path.with_suffix(".partial")
        export_onnx(str(partial), weights, half=half)
        partial.replace(path)
    return path


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime with its own threads. The engine's torch work around it (normalisation,
    fill, units) then runs on one torch thread: torch's pool spinning beside ONNX Runtime's
    slowed a 256x256 frame from 22 to 29-32 ms on 2 cores."""

    name = "onnxruntime"

    def activate(self) -> None:
        import onnxruntime

        torch.set_num_threads(1)

        options = onnxruntime.SessionOptions()
        if self.options.threads:
            options.intra_op_num_threads = self.options.threads
        options.inter_op_num_threads = 1
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in onnxruntime.get_available_providers()]
        self.session = onnxruntime.InferenceSession(str(_onnx_path(self.weights)), options, providers=providers)
        self.name = f"onnxruntime-{self.session.get_providers()[0].removesuffix('ExecutionProvider').lower()}"

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"input": batch.float().contiguous().numpy()})[0])

    def deactivate(self) -> None:
        self.session = None


class TensorRTRunner(Runner):
    """TensorRT engine built from the ONNX export, with one optimization profile over batch and
    frame side (`RunnerOptions.trt_batch`, `trt_size_px`: min, opt, max). Half precision comes
    from an fp16 ONNX export built as a strongly typed network (the builder's FP16 flag is
    deprecated from TensorRT 10.12). Built engines are cached under `cache_dir`, keyed by model
    hash, precision, profile, TensorRT version and GPU name; the timing cache is kept beside them
    so a rebuild (new profile, new version) reuses the layer timings. Inference uses the
    tensor-address API on PyTorch's current CUDA stream and PyTorch-owned buffers; shapes and
    addresses are set again only when the batch shape changes."""

    def __init__(self, weights: Path = DEFAULT_WEIGHTS, options: RunnerOptions = RunnerOptions()) -> None:
        super().__init__(weights, options)
        self.name = "tensorrt" + ("-fp16" if options.half else "")
        self.device = "cuda"
        self.fixed_shapes = True
        self._shape: tuple[int, ...] | None = None

    def activate(self) -> None:
        import tensorrt as trt

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        (b_min, b_opt, b_max), (s_min, s_opt, s_max) = self.options.trt_batch, self.options.trt_size_px
        c = len(INPUTS)
        self.profile = ((b_min, c, s_min, s_min), (b_opt, c, s_opt, s_opt), (b_max, c, s_max, s_max))
        digest = _digest(self.weights)
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name())
        shape_key = "-".join("x".join(map(str, dims)) for dims in self.profile)
        plan = self.options.cache / (f"masked-unet-{digest}-{'fp16' if self.options.half else 'fp32'}-{shape_key}"
                                     f"-trt{trt.__version__}-{gpu}.plan")
        if not plan.exists():
            self._build(plan, self.options.cache / f"timing-trt{trt.__version__}-{gpu}.cache")
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {plan}")
        self.context = self.engine.create_execution_context()
        self.dtype = torch.float16 if self.options.half else torch.float32

    def _build(self, plan: Path, timing_path: Path) -> None:
        trt = self.trt
        builder = trt.Builder(self.logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if self.options.half else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(_onnx_path(self.weights, self.options.half).read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse the ONNX model: {errors}")
        config = builder.create_builder_config()
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.exists() else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        profile.set_shape("input", *self.profile)
        config.add_optimization_profile(profile)
        log.info("building a TensorRT engine for %s (profile %s); this takes a while once", plan.name, self.profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT failed to build the engine")
        partial = plan.with_suffix(".partial")
        partial.write_bytes(bytes(serialized))
        partial.replace(plan)
        timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """Batches beyond the profile's largest run in chunks; frame sides beyond it are an error
        (the model then moves on to the next backend): the profile must cover the frames."""
        largest = self.profile[2][0]
        if len(batch) > largest:
            return torch.cat([self.infer(batch[i:i + largest]) for i in range(0, len(batch), largest)])
        shape = tuple(batch.shape)
        low, high = self.profile[0], self.profile[2]
        if any(not lo <= n <= hi for n, lo, hi in zip(shape, low, high)):
            raise RuntimeError(f"batch {shape} is outside the TensorRT profile {low} .. {high}")
        if shape != self._shape:
            self.context.set_input_shape("input", shape)
            self._input = torch.empty(shape, device="cuda", dtype=self.dtype)
            self._output = torch.empty(tuple(self.context.get_tensor_shape("output")), device="cuda", dtype=self.dtype)
            self.context.set_tensor_address("input", self._input.data_ptr())
            self.context.set_tensor_address("output", self._output.data_ptr())
            self._shape = shape
        self._input.copy_(batch)
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return self._output.to(torch.float32, copy=True)

    def deactivate(self) -> None:
        self.context = self.engine = None
        self._shape = None


BACKENDS = {
    "tensorrt": TensorRTRunner,
    "torch-cuda": lambda w, o: TorchRunner(w, o, "cuda"),
    "onnxruntime": OnnxRuntimeRunner,
    "torch-cpu": lambda w, o: TorchRunner(w, o, "cpu"),
}
AUTO_ORDER = ("tensorrt", "torch-cuda", "onnxruntime", "torch-cpu")


def backend_chain(name: str) -> tuple[str, ...]:
    """The backends to try, first choice first; a named backend falls back along AUTO_ORDER."""
    if name == "auto":
        return AUTO_ORDER
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected auto or one of {', '.join(BACKENDS)}")
    return (name, *[b for b in AUTO_ORDER if b != name])


def describe_backends(options: RunnerOptions = RunnerOptions()) -> list[dict]:
    """What `stm-live engines` prints: each backend, whether it loads here, and why not."""
    rows = []
    for name, make in BACKENDS.items():
        try:
            runner = make(DEFAULT_WEIGHTS, options)
            runner.activate()
            runner.deactivate()
            rows.append({"backend": name, "available": True, "detail": runner.name})
        except Exception as exc:
            rows.append({"backend": name, "available": False, "detail": f"{type(exc).__name__}: {exc}"})
    return rows
