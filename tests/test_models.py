"""The learned reconstruction: architecture, shipped weights, engine, stochastic mode, ONNX, training."""

import json

import numpy as np
import pytest
import torch

from stm_live.engines import create_engine, reconstruct_exact
from stm_live.engines.classical import ClassicalReconstructor
from stm_live.engines.torch_model import ModelReconstructor, export_onnx
from stm_live.metrics import quality
from stm_live.models.architecture import INPUTS, SIZE_MULTIPLE, MaskedUNet
from stm_live.models.training import TrainConfig, random_mask, train
from stm_live.models.weights import DEFAULT_WEIGHTS
from stm_live.plans import parse_plan
from stm_live.sim.dataset import make_frame




@pytest.fixture(scope="module")
def model():
    return ModelReconstructor(threads=2)


@pytest.fixture(scope="module")
def held_out():
    """Simulator frames from a seed the training never used (it trains on seed 0)."""
    return [make_frame(987, i, 128, surface="si111_7x7").measurement.z[0].astype(np.float64) for i in range(4)]


def test_architecture_is_fully_convolutional():
    net = MaskedUNet(8).eval()
    for h, w in ((32, 48), (64, 32)):
        assert net(torch.zeros(3, len(INPUTS), h, w)).shape == (3, 2, h, w)


def test_tiny_frames_are_padded_not_refused(model):
    frame = np.arange(32, dtype=np.float32).reshape(4, 8)
    mask = np.zeros((4, 8), bool)
    mask[::2] = True
    out = reconstruct_exact(model, frame[None], mask[None]).images[0]
    assert np.isfinite(out).all() and np.array_equal(out[mask], frame[mask])


def test_shipped_weights_are_small_and_described():
    assert DEFAULT_WEIGHTS.exists() and DEFAULT_WEIGHTS.stat().st_size < 8e6
    descriptor = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert descriptor["size_multiple"] == SIZE_MULTIPLE and descriptor["training"]["steps"] > 0


@pytest.mark.parametrize("plan", ["lines:2", "lines:4", "lines:8", "sr:2", "sr:4", "pixels:0.3", "partial:40"])
def test_model_returns_measured_pixels_exactly_at_any_size(model, held_out, plan):
    frame = held_out[0][:100, :120].astype(np.float32)
    mask = parse_plan(plan).mask(*frame.shape)
    result = reconstruct_exact(model, np.where(mask, frame, np.nan)[None], mask[None])
    out, sigma = result.images[0], result.uncertainty[0]
    assert out.shape == frame.shape and np.array_equal(out[mask], frame[mask])
    assert (sigma[mask] == 0).all() and (sigma[np.isfinite(sigma)] >= 0).all()
    if plan == "partial:40":
        assert np.isnan(out[50:]).all() and np.isfinite(out[:40]).all()
    else:
        assert np.isfinite(out).all()


def test_a_frame_being_scanned_costs_only_its_scanned_rows(model, held_out):
    """On a CPU runner the network runs on the inferable span: what lies beyond it (never
    scanned) cannot change the result, so a partial frame reconstructs exactly as the same rows
    cut out on their own. On any runner (a GPU one computes whole frames) nothing is inferred
    beyond the span, and in a batch each frame keeps its own span."""
    frame = held_out[1]
    mask = parse_plan("lines:4").mask(*frame.shape)
    mask[70:] = False
    measured = np.where(mask, frame, np.nan)
    cpu = ModelReconstructor(backend="onnxruntime", threads=2)
    whole = reconstruct_exact(cpu, measured[None], mask[None]).images[0]
    cut = reconstruct_exact(cpu, measured[None, :80], mask[None, :80]).images[0]
    np.testing.assert_allclose(whole[:80], cut, rtol=0, atol=1e-9)
    whole = reconstruct_exact(model, measured[None], mask[None]).images[0]
    assert np.isnan(whole[80:]).all() and np.isfinite(whole[:70]).all()
    longer = parse_plan("lines:4").mask(*frame.shape)
    batch = reconstruct_exact(model, np.stack([measured, np.where(longer, frame, np.nan)]),
                              np.stack([mask, longer])).images
    assert np.isnan(batch[0][80:]).all() and np.isfinite(batch[1]).all()


@pytest.mark.parametrize("plan", ["lines:4", "lines:8"])
def test_model_beats_the_cubic_baseline_on_held_out_simulator_frames(model, held_out, plan):
    gains = []
    for frame in held_out:
        mask = parse_plan(plan).mask(*frame.shape)
        measured = np.where(mask, frame, np.nan)[None]
        ours = reconstruct_exact(model, measured, mask[None]).images[0]
        cubic = reconstruct_exact(ClassicalReconstructor(), measured, mask[None]).images[0]
        gains.append(quality(frame, ours).psnr - quality(frame, cubic).psnr)
    assert np.mean(gains) > 0.5, gains


def test_uncertainty_grows_away_from_measured_lines_and_tracks_the_error(model, held_out):
    correlations = []
    for frame in held_out:
        mask = parse_plan("lines:8").mask(*frame.shape)
        result = reconstruct_exact(model, frame[None], mask[None])
        sigma, error = result.uncertainty[0], np.abs(result.images[0] - frame)
        assert sigma[4::8].mean() > sigma[1::8].mean() > 0
        correlations.append(np.corrcoef(sigma[~mask], error[~mask])[0, 1])
    assert np.mean(correlations) > 0.1


def test_onnx_export_runs_in_onnxruntime_with_dynamic_shapes(tmp_path):
    import onnxruntime

    path = tmp_path / "model.onnx"
    export_onnx(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    net, _ = __import__("stm_live.models.weights", fromlist=["load_model"]).load_model()
    rng = np.random.default_rng(0)
    for b, h, w in ((1, 64, 64), (3, 48, 96)):
        x = rng.normal(size=(b, len(INPUTS), h, w)).astype(np.float32)
        x[:, 1] = rng.random((b, h, w)) < 0.3
        ours = session.run(None, {"input": x})[0]
        with torch.inference_mode():
            reference = net(torch.from_numpy(x)).numpy()
        assert ours.shape == reference.shape
        assert np.abs(ours - reference).max() / np.abs(reference).max() < 1e-4


def test_random_masks_cover_every_plan_family():
    rng = np.random.default_rng(0)
    masks = [random_mask(rng, 32, 32) for _ in range(200)]
    row_structured = sum(m[m.any(axis=1)].all() for m in masks)
    grids = sum(np.array_equal(m, np.outer(m.any(1), m.any(0))) and not m[m.any(1)].all() for m in masks)
    assert row_structured > 60 and grids > 20 and 200 - row_structured - grids > 20


def test_training_is_deterministic_and_resumes_exactly(tmp_path, monkeypatch):
    from stm_live.models import training

    def config(name):
        return TrainConfig(out_dir=str(tmp_path / name), weights=str(tmp_path / name / "w.safetensors"),
                           data_dir=str(tmp_path / "data"), sim_frames=4, sim_size=64, real_files=[], width=8,
                           steps=4, batch=2, crop=32, checkpoint_every=2, threads=1)

    straight = train(config("a"), resume=False)
    calls = []
    real_batch = training.TrainingImages.batch

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_batch(self, *args)

    monkeypatch.setattr(training.TrainingImages, "batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config("b"), resume=False)
    monkeypatch.setattr(training.TrainingImages, "batch", real_batch)
    resumed = train(config("b"), resume=True)
    assert straight["final_loss"] == pytest.approx(resumed["final_loss"], rel=1e-6)
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "a" / "w.safetensors")), load_file(str(tmp_path / "b" / "w.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_engine_falls_back_to_classical_when_no_backend_loads(monkeypatch, caplog):
    from stm_live.engines import runners

    def broken(self):
        raise FileNotFoundError("no weights")

    for runner in (runners.TorchRunner, runners.OnnxRuntimeRunner):
        monkeypatch.setattr(runner, "activate", broken)
    engine = create_engine("model")
    assert isinstance(engine, ClassicalReconstructor) and "falling back to classical" in caplog.text


def test_eval_reports_model_and_baselines(tmp_path, held_out):
    from stm_live.evaluation import evaluate

    path = tmp_path / "frame.npy"
    np.save(path, held_out[3])
    result = evaluate([str(path)], "lines:4", create_engine("model"), plot=str(tmp_path / "plot.png"))
    entry = result["images"][0]
    assert set(entry["baselines"]) == {"linear", "cubic", "biharmonic"} and "model" in entry
    assert entry["gain_db_over_best_baseline"] == pytest.approx(
        entry["model"]["psnr"] - max(v["psnr"] for v in entry["baselines"].values()), abs=1e-3)
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_backends_agree_and_a_failing_backend_hands_over_without_losing_the_frame(held_out, monkeypatch, caplog):
    from stm_live.engines.runners import OnnxRuntimeRunner

    frame = held_out[0]
    mask = parse_plan("lines:4").mask(*frame.shape)
    ort_engine = ModelReconstructor(backend="onnxruntime", threads=2)
    torch_engine = ModelReconstructor(backend="torch-cpu", threads=2)
    assert ort_engine.backend == "onnxruntime-cpu" and torch_engine.backend == "torch-cpu"
    a = reconstruct_exact(ort_engine, frame[None], mask[None])
    b = reconstruct_exact(torch_engine, frame[None], mask[None])
    assert np.abs(a.images - b.images).max() < 1e-4 * np.ptp(frame)
    assert np.allclose(a.uncertainty, b.uncertainty, rtol=1e-3, atol=1e-6 * np.ptp(frame))

    monkeypatch.setattr(OnnxRuntimeRunner, "infer", lambda self, batch: (_ for _ in ()).throw(RuntimeError("gone")))
    failing = ModelReconstructor(backend="onnxruntime", threads=2)
    c = reconstruct_exact(failing, frame[None], mask[None])
    # The next backend that loads: PyTorch on CUDA where there is a GPU (TensorRT before it if installed).
    assert failing.backend in ("tensorrt", "torch-cuda", "torch-cpu") and "switching to the next one" in caplog.text
    assert np.abs(c.images - b.images).max() < (1e-6 if failing.backend == "torch-cpu" else 1e-4) * np.ptp(frame)


def test_engines_command_lists_backends_and_reasons():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "stm_live", "--log-level", "ERROR", "engines"],
                         capture_output=True, text=True, timeout=120)
    rows = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert set(rows) == {"torch-cuda", "onnxruntime", "torch-cpu", "tensorrt"}
    assert " yes " in rows["onnxruntime"] and " yes " in rows["torch-cpu"]
    assert "tensorrt" in rows and " no " in rows["tensorrt"]


@pytest.mark.parametrize("plan", ["lines:4", "partial:40", "sr:4"])
def test_the_network_corrects_the_classical_engine_fill(plan):
    """The residual the network learns sits on the classical engine's own answer for line and
    grid plans, so a network that outputs nothing is the classical baseline."""
    from stm_live.engines.base import inferable_rows
    from stm_live.engines.classical import reconstruct_one
    from stm_live.models.prefill import prefill

    values = np.random.default_rng(5).normal(size=(96, 80))
    mask = parse_plan(plan).mask(*values.shape)
    top, bottom = inferable_rows(mask)
    filled = prefill(torch.from_numpy(values[None]), torch.from_numpy(mask[None]))[0].numpy()
    np.testing.assert_allclose(filled[top:bottom], reconstruct_one(values, mask)[top:bottom],
                               rtol=0, atol=1e-12)


def test_a_batch_of_different_masks_is_filled_frame_by_frame_as_alone():
    """Frames are grouped by how they were measured; each group's fill is what a frame alone gets,
    scattered pixels (a masked Gaussian fill, scipy's edge mode) and an empty frame included."""
    from scipy.ndimage import gaussian_filter

    from stm_live.models.prefill import prefill

    values = np.random.default_rng(6).normal(size=(5, 96, 80))
    masks = np.stack([parse_plan(p).mask(96, 80) for p in ("lines:4", "sr:4", "pixels:0.3", "lines:4", "full")])
    masks[4] = False
    together = prefill(torch.from_numpy(values), torch.from_numpy(masks)).numpy()
    for i in range(4):
        alone = prefill(torch.from_numpy(values[i:i + 1]), torch.from_numpy(masks[i:i + 1]))[0].numpy()
        np.testing.assert_allclose(together[i], alone, rtol=0, atol=1e-12)
    known = np.where(masks[2], values[2], 0.0)
    blurred = gaussian_filter(known, 2.0, mode="reflect") / np.maximum(gaussian_filter(masks[2] * 1.0, 2.0, mode="reflect"), 1e-3)
    np.testing.assert_allclose(together[2], blurred, rtol=0, atol=1e-12)
    assert not together[4].any(), "nothing measured, nothing filled"


def test_the_plane_fit_is_least_squares_over_every_measured_pixel():
    """Heights far from zero (a 100 nm offset under 10 pm of noise), a batch of three masks:
    scattered pixels, nothing measured, one diagonal line of pixels."""
    from stm_live.models.normalize import fit, summarize

    rng = np.random.default_rng(0)
    rows, cols = np.indices((48, 64))
    image = 1e-7 + 1e-9 * (0.3 * cols - 0.2 * rows) + 1e-11 * rng.normal(size=(48, 64))
    scattered = rng.random((48, 64)) < 0.3
    masks = np.stack([scattered, np.zeros_like(scattered), np.eye(48, 64, dtype=bool)])
    planes, outline = fit(summarize(torch.from_numpy(np.stack([image] * 3)), torch.from_numpy(masks)), 48)
    r, c = np.nonzero(scattered)
    design = np.column_stack([np.ones(r.size), c, r])
    coef, *_ = np.linalg.lstsq(design, image[r, c], rcond=None)
    np.testing.assert_allclose(planes.coef[0].numpy(), coef, rtol=1e-9)
    np.testing.assert_allclose(float(planes.scale[0]), np.std(image[r, c] - design @ coef), rtol=1e-6)
    assert planes.coef[1].tolist() == [0.0, 0.0, 0.0] and float(planes.scale[1]) == 1.0
    line = planes.coef[2].numpy()
    assert np.isclose(line[1] + line[2], 1e-9 * (0.3 - 0.2), rtol=1e-3), "the slope along the line is kept"
    assert np.isclose(line[1], line[2]), "and none is invented across it"
    assert outline.count.tolist() == [scattered.sum(), 0, 48]
