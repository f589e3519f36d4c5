"""Every inference backend against PyTorch fp32 on the CPU, on fresh random inputs of several
batch sizes and frame sizes: relative error below 1e-4 in fp32 and 1e-2 in fp16, and no NaN.
A backend that cannot load here (no GPU, TensorRT not installed) is skipped with the reason."""

import numpy as np
import pytest

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


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


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
                got = runner.infer(batch)
                assert got.shape == (b, 2, h, w) and np.isfinite(got).all(), f"{runner.name} gave NaN or a wrong shape"
                error = relative_error(got, reference.infer(batch))
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
        assert runner.infer(np.zeros((9, c, 64, 64), np.float32)).shape == (9, 2, 64, 64), "large batches run in chunks"
        with pytest.raises(RuntimeError, match="outside the TensorRT profile"):
            runner.infer(np.zeros((1, c, 256, 256), np.float32))
    finally:
        runner.deactivate()
