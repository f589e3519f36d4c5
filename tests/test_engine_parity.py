"""Every inference backend against PyTorch fp32 on the CPU, on fresh random inputs of several
batch sizes and frame sizes: relative error below 1e-4 in fp32 and 1e-2 in fp16, and no NaN.
A backend that cannot load here (no GPU, TensorRT not installed) is skipped with the reason."""

import numpy as np
import pytest
import torch

from stm_live.engines.runners import BACKENDS, RunnerOptions, TorchRunner
from stm_live.models.architecture import INPUTS
from stm_live.models.weights import DEFAULT_WEIGHTS

SHAPES = [(1, 64, 64), (3, 96, 128), (8, 256, 256)]  # batch, height, width
CASES = [
    ("onnxruntime", False, True, 1e-4),
    ("torch-cuda", False, False, 1e-4),
    ("torch-cuda", False, True, 1e-4),
    ("torch-cuda", True, True, 1e-2),
    ("tensorrt", False, True, 1e-4),
    ("tensorrt", True, True, 1e-2),
]


@pytest.fixture(scope="module")
def reference():
    runner = TorchRunner(DEFAULT_WEIGHTS, RunnerOptions(threads=2), "cpu")
    runner.activate()
    yield runner
    runner.deactivate()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.cpu() - want).abs().max() / max(float(want.abs().max()), 1e-12))


@pytest.mark.parametrize(("backend", "half", "graphs", "tolerance"), CASES,
                         ids=[f"{b}-{'fp16' if h else 'fp32'}{'' if g else '-eager'}" for b, h, g, _ in CASES])
def test_backend_matches_pytorch_fp32(reference, tmp_path, backend, half, graphs, tolerance):
    runner = BACKENDS[backend](DEFAULT_WEIGHTS, RunnerOptions(threads=2, half=half, cuda_graphs=graphs,
                                                               cache_dir=str(tmp_path)))
    try:
        runner.activate()
    except Exception as exc:
        pytest.skip(f"{backend} does not load here: {type(exc).__name__}: {exc}")
    rng = np.random.default_rng(0)
    try:
        for b, h, w in SHAPES:
            for _ in range(2):
                batch = rng.standard_normal((b, len(INPUTS), h, w)).astype(np.float32)
                batch[:, 1] = rng.random((b, h, w)) < 0.25
                got = runner.infer(torch.from_numpy(batch).to(runner.device))
                assert got.shape == (b, 2, h, w) and bool(got.isfinite().all()), f"{runner.name} gave NaN or a wrong shape"
                assert got.device.type == torch.device(runner.device).type, "results stay where the runner runs"
                error = relative_error(got, reference.infer(torch.from_numpy(batch)))
                assert error < tolerance, f"{runner.name} {batch.shape}: relative error {error:.2e}"
    finally:
        runner.deactivate()


def test_a_batch_beyond_the_tensorrt_profile_is_refused_before_it_reaches_the_gpu():
    from stm_live.engines.runners import TensorRTRunner

    runner = TensorRTRunner(DEFAULT_WEIGHTS, RunnerOptions(trt_batch=(1, 2, 4), trt_size_px=(32, 64, 128)))
    try:
        runner.activate()
    except Exception as exc:
        pytest.skip(f"tensorrt does not load here: {type(exc).__name__}: {exc}")
    try:
        c = len(INPUTS)
        assert runner.infer(torch.zeros(9, c, 64, 64, device="cuda")).shape == (9, 2, 64, 64), "large batches run in chunks"
        with pytest.raises(RuntimeError, match="outside the TensorRT profile"):
            runner.infer(torch.zeros(1, c, 256, 256, device="cuda"))
    finally:
        runner.deactivate()


ENGINE_CASES = [("torch-cuda", False, 1e-4), ("torch-cuda", True, 1e-2), ("tensorrt", False, 1e-4),
                ("tensorrt", True, 1e-2), ("onnxruntime", False, 1e-4)]


@pytest.mark.parametrize(("backend", "half", "tolerance"), ENGINE_CASES,
                         ids=[f"{b}-{'fp16' if h else 'fp32'}" for b, h, _ in ENGINE_CASES])
def test_the_model_engine_on_each_backend_gives_the_cpu_frames(tmp_path, backend, half, tolerance):
    """The whole engine (normalisation, classical fill, network, units, uncertainty), prepared on
    the backend's device, against PyTorch fp32 on the CPU, on a batch of frames measured with
    different plans: rows, a grid, scattered pixels, a frame still being scanned."""
    from stm_live.engines.base import reconstruct_exact
    from stm_live.engines.torch_model import ModelReconstructor
    from stm_live.plans import parse_plan
    from stm_live.sim.dataset import make_frame

    engine = ModelReconstructor(backend=backend, options=RunnerOptions(threads=2, half=half, cache_dir=str(tmp_path)))
    if not engine.backend.startswith(backend):
        pytest.skip(f"{backend} does not load here (the engine fell back to {engine.backend})")
    reference = ModelReconstructor(backend="torch-cpu", options=RunnerOptions(threads=2))
    reference.runner.fixed_shapes = engine.runner.fixed_shapes  # whole frames on a GPU: the same window
    frames = np.stack([make_frame(7, i, 96, surface="si111_7x7").measurement.z[0] for i in range(4)])
    masks = np.stack([parse_plan(p).mask(96, 96) for p in ("lines:4", "sr:2", "pixels:0.3", "partial:40")])
    measured = np.where(masks, frames, np.nan)
    got, want = reconstruct_exact(engine, measured, masks), reconstruct_exact(reference, measured, masks)
    inferred = np.isfinite(want.images)
    assert np.array_equal(np.isfinite(got.images), inferred), "the same pixels are inferred"
    assert np.array_equal(got.images[masks], measured[masks]), "measured pixels come back as measured"
    span = np.ptp(frames[inferred])
    assert np.abs(got.images - want.images)[inferred].max() < tolerance * span
    assert np.abs(got.uncertainty - want.uncertainty)[inferred].max() < tolerance * span
