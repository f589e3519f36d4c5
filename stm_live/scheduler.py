"""Reconstruction scheduling: snapshot frames, reconstruct off the ingest thread, emit Frame messages.

Ingest must never wait for reconstruction. The scheduler keeps at most one pending job per
(scan, channel, direction): a newer progressive snapshot replaces an older one that has not
started yet (the newer one has every line the older had), and a final snapshot is never
replaced. A single worker thread takes everything pending and runs it in micro-batches
(`batcher`: up to `max_batch` frames of one bucketed size per engine call, oldest first), then
hands each result to a sink as a `Frame` message (raw and reconstructed). When it wakes to find
several frames waiting but fewer than a full batch, it waits up to `max_delay_us` for more; a
frame that arrives alone runs at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stm_live.assembly import DirectionFrames, ScanState
from stm_live.batcher import BatchPolicy, plan_batches, reconstruct_batch
from stm_live.engines import EngineChain
from stm_live.metrics import LatencyWindow
from stm_live.protocol import Frame

log = logging.getLogger(__name__)

JobKey = tuple[str, str, str]


@dataclass(frozen=True)
class FrameJob:
    uid: str
    channel: str
    unit: str
    direction: str
    size_nm: tuple[float, float]
    rows_seen: int
    final: bool
    triggered: float
    image: np.ndarray
    mask: np.ndarray

    @property
    def key(self) -> JobKey:
        return self.uid, self.channel, self.direction


class ReconstructionScheduler:
    """Pending jobs plus the worker thread that runs them."""

    def __init__(self, engine: EngineChain | None, sink: Callable[[Frame], None],
                 policy: BatchPolicy = BatchPolicy(), other_units_engine: EngineChain | None = None,
                 engine_units: tuple[str, ...] = ()) -> None:
        """`other_units_engine`, when given, takes the channels whose unit is not in
        `engine_units` (a network trained on heights is not asked to invent a current map)."""
        self.engine = engine
        self.other_units_engine = other_units_engine
        self.engine_units = engine_units
        self.sink = sink
        self.policy = policy
        self.latency = LatencyWindow()
        self.counters = {"frames_published": 0, "jobs_superseded": 0, "reconstructions_failed": 0,
                         "batches": 0, "batched_frames": 0, "padded_frames": 0}
        self._pending: OrderedDict[JobKey, FrameJob] = OrderedDict()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="stm-live-reconstruct", daemon=True)

    @property
    def method(self) -> str:
        return self.engine.name if self.engine else "none"

    def all_counters(self) -> dict[str, int]:
        counters = dict(self.counters)
        for engine in self._engines():
            for key, value in engine.counters.items():
                counters[key] = counters.get(key, 0) + value
        return counters

    def _engines(self) -> list[EngineChain]:
        return [e for e in (self.engine, self.other_units_engine) if e is not None]

    def _engine_for(self, job: FrameJob) -> EngineChain | None:
        if self.other_units_engine is not None and job.unit not in self.engine_units:
            return self.other_units_engine
        return self.engine

    def start(self) -> None:
        self._thread.start()

    def submit_scan(self, state: ScanState, direction: str, frames: DirectionFrames, final: bool) -> None:
        """Snapshot every channel of one direction of a scan and queue it."""
        frames.lines_since_publish = 0
        mask = frames.measured.copy()
        rows_seen = int(frames.rows_seen.sum())
        jobs = [
            FrameJob(state.uid, info.name, info.unit, direction, state.start.size_nm, rows_seen, final,
                     frames.last_line_time, image.copy(), mask)
            for info, image in zip(state.start.channels, frames.images)
        ]
        self.submit(jobs)

    def submit(self, jobs: list[FrameJob]) -> None:
        """Queue snapshots; a newer one of the same (scan, channel, direction) replaces a waiting one."""
        with self._cond:
            for job in jobs:
                old = self._pending.get(job.key)
                if old is not None and old.final:
                    log.error("scan %s sent lines after its end; keeping the final snapshot", job.uid)
                    continue
                if old is not None:
                    self.counters["jobs_superseded"] += 1
                self._pending[job.key] = job
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Finish every pending job, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.ident is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("reconstruction worker still busy after %.0f s at shutdown", timeout)
        for engine in self._engines():
            engine.close()

    def _take(self) -> list[FrameJob]:
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            waited_until = time.perf_counter() + self.policy.max_delay_us * 1e-6
            while 1 < len(self._pending) < self.policy.max_batch and not self._closing:
                remaining = waited_until - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            jobs = list(self._pending.values())
            self._pending.clear()
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                return
            by_engine: dict[int, list[FrameJob]] = {}
            for job in jobs:
                by_engine.setdefault(id(self._engine_for(job)), []).append(job)
            batches = [batch for group in by_engine.values() for batch in plan_batches(group, self.policy)]
            for batch in sorted(batches, key=lambda b: b[0].triggered):
                self._process(self._engine_for(batch[0]), batch)

    def _process(self, engine: EngineChain | None, jobs: list[FrameJob]) -> None:
        result = None
        if engine is not None:
            self.counters["batches"] += 1
            self.counters["batched_frames"] += len(jobs)
            self.counters["padded_frames"] += sum(self.policy.bucket(j.image.shape) != j.image.shape for j in jobs)
            try:
                result = reconstruct_batch(engine, jobs, self.policy)
            except Exception:
                self.counters["reconstructions_failed"] += 1
                log.exception("no engine reconstructed %d frame(s); publishing raw frames only", len(jobs))
        for i, job in enumerate(jobs):
            self._emit(job, "raw", "measured", job.image, None)
            if result is not None:
                self._emit(job, "reconstructed", result.method, result.images[i], result.uncertainty[i])

    def _emit(self, job: FrameJob, kind: str, method: str, image: np.ndarray,
              uncertainty: np.ndarray | None) -> None:
        latency = time.perf_counter() - job.triggered
        if kind == "reconstructed":
            self.latency.add(latency)
        self.sink(Frame(
            uid=job.uid, channel=job.channel, unit=job.unit, direction=job.direction, kind=kind,
            rows_seen=job.rows_seen, size_nm=job.size_nm, method=method, latency_s=latency,
            final=job.final, t=time.time(), image=image, mask=job.mask, uncertainty=uncertainty,
        ))
        self.counters["frames_published"] += 1
