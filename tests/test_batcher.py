"""Micro-batching: bucketed sizes, batch limits, the queue delay, and frames returning to their
own scans in order, through the real scheduler and the real classical engine."""

import threading
import time

import numpy as np
import pytest

from stm_live.batcher import BatchPolicy, plan_batches, reconstruct_batch
from stm_live.engines import EngineChain, Reconstructor, reconstruct_exact
from stm_live.engines.classical import ClassicalReconstructor
from stm_live.plans import parse_plan
from stm_live.scheduler import FrameJob, ReconstructionScheduler

from conftest import make_frame


def job(uid: str, channel: str = "Z", size: tuple[int, int] = (64, 64), seed: int = 0, rows_seen: int = 0,
        triggered: float | None = None, plan: str = "lines:4", unit: str = "m") -> FrameJob:
    mask = parse_plan(plan).mask(*size)
    image = np.where(mask, make_frame(*size, seed=seed), np.nan).astype(np.float32)
    return FrameJob(uid, channel, unit, "forward", (10.0, 10.0), rows_seen or int(mask.any(axis=1).sum()), False,
                    time.perf_counter() if triggered is None else triggered, image, mask)


class Recording(Reconstructor):
    """The classical engine, remembering the batch shapes it was called with."""

    name = "recording"

    def __init__(self) -> None:
        self.inner = ClassicalReconstructor()
        self.calls: list[tuple[int, ...]] = []

    def reconstruct(self, measured, mask):
        self.calls.append(measured.shape)
        return self.inner.reconstruct(measured, mask)


def test_sizes_are_bucketed_batches_split_and_ordered_oldest_first():
    policy = BatchPolicy(max_batch=2, bucket_px=64)
    assert policy.bucket((250, 256)) == (256, 256) and policy.bucket((256, 257)) == (256, 320)
    assert BatchPolicy(bucket_px=0).bucket((250, 251)) == (250, 251)
    jobs = [job("a", size=(250, 250), triggered=3.0), job("b", size=(256, 256), triggered=1.0),
            job("c", size=(128, 128), triggered=2.0), job("d", size=(240, 256), triggered=4.0)]
    batches = plan_batches(jobs, policy)
    assert [[j.uid for j in b] for b in batches] == [["b", "a"], ["c"], ["d"]]
    with pytest.raises(ValueError):
        BatchPolicy(max_batch=0)


def test_a_padded_batch_returns_each_frame_at_its_size_with_measured_pixels_untouched():
    engine = ClassicalReconstructor()
    jobs = [job("a", size=(250, 250), seed=1), job("b", size=(256, 256), seed=2), job("c", size=(200, 256), seed=3)]
    result = reconstruct_batch(engine, jobs, BatchPolicy(bucket_px=64))
    for j, image in zip(jobs, result.images):
        assert image.shape == j.image.shape
        assert np.array_equal(image[j.mask], j.image[j.mask])
        alone = reconstruct_exact(engine, j.image[None], j.mask[None]).images[0]
        assert np.allclose(image, alone, atol=1e-6, equal_nan=True), "unmeasured padding changes nothing"
    assert result.method == "classical"


def scheduler_with(engine: Reconstructor, policy: BatchPolicy):
    published, done = [], threading.Event()

    def sink(frame):
        published.append(frame)
        done.set()

    scheduler = ReconstructionScheduler(EngineChain([engine], timeout_s=30.0), sink, policy)
    return scheduler, published, done


def test_frames_of_many_scans_and_channels_share_calls_and_return_to_their_own_scan():
    engine = Recording()
    scheduler, published, _ = scheduler_with(engine, BatchPolicy(max_batch=4, max_delay_us=0))
    jobs = [job(f"scan-{s}", channel, seed=10 * s + c) for s in range(3) for c, channel in enumerate(("Z", "I"))]
    scheduler.submit(jobs)
    scheduler.start()
    scheduler.close()
    assert engine.calls == [(4, 64, 64), (2, 64, 64)]
    assert scheduler.counters["batches"] == 2 and scheduler.counters["batched_frames"] == 6
    reconstructed = {(f.uid, f.channel): f for f in published if f.kind == "reconstructed"}
    assert len(reconstructed) == 6
    for j in jobs:
        frame = reconstructed[(j.uid, j.channel)]
        assert np.array_equal(frame.image[j.mask], j.image[j.mask]), f"{j.uid}/{j.channel} got another scan's frame"


def test_channels_in_other_units_go_to_the_other_engine():
    """A network trained on heights reconstructs the height channels only; current and the like
    go to the classical engine, each in its own batches."""
    heights, others = Recording(), Recording()
    others.name = "classical"
    published = []
    scheduler = ReconstructionScheduler(EngineChain([heights], timeout_s=30.0), published.append,
                                        BatchPolicy(max_batch=8, max_delay_us=0),
                                        EngineChain([others], timeout_s=30.0), ("m",))
    jobs = [job(f"scan-{s}", channel, seed=10 * s + c, unit=unit)
            for s in range(2) for c, (channel, unit) in enumerate((("Z", "m"), ("Current", "A"), ("df", "Hz")))]
    scheduler.submit(jobs)
    scheduler.start()
    scheduler.close()
    assert heights.calls == [(2, 64, 64)] and others.calls == [(4, 64, 64)]
    methods = {f.channel: f.method for f in published if f.kind == "reconstructed"}
    assert methods == {"Z": "recording", "Current": "classical", "df": "classical"}
    assert scheduler.all_counters()["batches"] == 2 and scheduler.method == "recording"


def test_a_lone_frame_runs_at_once_and_a_burst_waits_for_its_batch():
    engine = Recording()
    scheduler, published, done = scheduler_with(engine, BatchPolicy(max_batch=3, max_delay_us=2_000_000))
    scheduler.start()
    try:
        started = time.perf_counter()
        scheduler.submit([job("alone")])
        assert done.wait(1.0), "a lone frame must not wait for the queue delay"
        assert time.perf_counter() - started < 1.0
        assert engine.calls == [(1, 64, 64)]

        engine.calls.clear()
        scheduler.submit([job("burst", "Z"), job("burst", "I")])
        time.sleep(0.2)
        scheduler.submit([job("late", "Z")])
        deadline = time.monotonic() + 5
        while len([f for f in published if f.kind == "reconstructed"]) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.calls == [(3, 64, 64)], "two waiting frames wait (up to the delay) for a third"
    finally:
        scheduler.close()


def test_successive_snapshots_of_one_scan_are_published_in_order():
    scheduler, published, _ = scheduler_with(ClassicalReconstructor(), BatchPolicy(max_batch=2, max_delay_us=0))
    scheduler.start()
    try:
        for rows in range(4, 64, 4):
            scheduler.submit([job("progressive", "Z", rows_seen=rows), job(f"other-{rows}", "Z")])
            time.sleep(0.002)
    finally:
        scheduler.close()
    seen = [f.rows_seen for f in published if f.uid == "progressive" and f.kind == "reconstructed"]
    assert seen == sorted(seen) and seen[-1] == 60


def test_the_learned_model_sees_bucket_padding_only_at_its_edge_and_stays_within_its_uncertainty():
    """The network runs on the measured rows and columns plus one row spacing, so a bucket's
    padding reaches it only as one extra row or column at the far edges: inferred pixels move by
    a fraction of the model's own predicted uncertainty, and measured ones not at all."""
    from stm_live.engines import create_engine

    engine = create_engine("model", 1, "torch-cpu")
    frame = job("a", size=(232, 248), seed=4)
    alone = reconstruct_exact(engine, frame.image[None], frame.mask[None])
    inferred = ~frame.mask & np.isfinite(alone.images[0])
    for bucket in (16, 64):
        padded = reconstruct_batch(engine, [frame], BatchPolicy(bucket_px=bucket))
        assert np.array_equal(padded.images[0][frame.mask], frame.image[frame.mask])
        assert np.array_equal(np.isnan(padded.images[0]), np.isnan(alone.images[0]))
        shift = np.abs(padded.images[0] - alone.images[0])[inferred] / alone.uncertainty[0][inferred]
        assert shift.max() < 1.0 and np.median(shift) < 0.01
