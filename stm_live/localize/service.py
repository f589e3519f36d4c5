"""The daemon's localization thread: a localization map and lattice for every final frame.

Localization costs N engine reconstructions, so it never runs on the ingest or reconstruction
threads: the ingest thread hands over a copy of each final frame of the configured height
channels, and this thread publishes a `locmap` message per frame. The queue is bounded; when
frames arrive faster than they can be localized the oldest waiting one is dropped and counted.
When both traces are localized, the second one's map is followed by a 'both' map: the atoms of
both traces with the feedback loop's lag removed, and the offset between the traces. Each map
also carries the drift measured against the previous frame of its channel and direction.
On request (`requests.py`) the molecules of a channel and trace's newest map are localized on
their own super-resolved crops, on this same thread, and that map is published again with them.
The thread rests after each map so that it uses at most `max_duty` of the time: on a machine
with few cores the ingest, reconstruction and tip threads keep their share.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from stm_live.config import LocalizeSettings
from stm_live.engines import EngineChain, reconstruct_exact
from stm_live.localize.crops import crop_atoms
from stm_live.localize.drift import DriftTracker
from stm_live.localize.lattice import LatticeError, analyze_lattice
from stm_live.localize.locmap import Atoms, combine_traces, localization_map
from stm_live.localize.peaks import dominant_spacing_nm
from stm_live.localize.requests import CropRequestError
from stm_live.metrics import worth_logging
from stm_live.protocol import ATOM_COLUMNS, MOLECULE_COLUMNS, LocMap, Message

log = logging.getLogger(__name__)

MIN_FRAME_PX = 32
MAX_CROP_FINE_PX = 1024  # a super-resolved crop's side: crops are for molecules, not frames


@dataclass(frozen=True)
class LocalizeJob:
    uid: str
    channel: str
    direction: str
    size_nm: tuple[float, float]
    image: np.ndarray
    mask: np.ndarray
    submitted: float
    started_t: float  # the scan's start on the instrument clock: successive frames' drift


@dataclass(frozen=True)
class _Localized:
    """The newest map of one channel and trace, with the reconstruction a crop is cut from."""

    size_nm: tuple[float, float]
    single: np.ndarray
    message: LocMap


@dataclass(frozen=True)
class CropJob:
    localized: _Localized
    boxes_nm: np.ndarray  # (K, 4), the rows of the published `molecules` table
    submitted: float


class LocalizationService:
    def __init__(self, settings: LocalizeSettings, engine: EngineChain, sink: Callable[[Message], None],
                 max_atoms: int = 8192, max_density_px: int = 8192) -> None:
        self.settings = settings
        self.engine = engine
        self.sink = sink
        self.max_atoms, self.max_density_px = max_atoms, max_density_px
        backend = getattr(engine, "backend", "")
        self.samples = settings.samples if "cuda" in backend else settings.samples_cpu
        self.counters = {"locmaps_published": 0, "locmaps_dropped": 0, "locmaps_skipped": 0, "locmap_errors": 0,
                         "crop_maps_published": 0}
        self._jobs: queue.Queue[LocalizeJob | CropJob | None] = queue.Queue(settings.max_queued)
        self._latest: dict[tuple[str, str], _Localized] = {}
        self._rng = np.random.default_rng()
        self._closing = threading.Event()
        self._unpaired: dict[str, tuple[str, str, Atoms, LocMap]] = {}  # per channel: the newest lone trace
        self._drift = DriftTracker()
        self.detector = None
        if settings.molecules:
            from stm_live.localize.molecules import MoleculeDetector

            self.detector = MoleculeDetector()
        self._thread = threading.Thread(target=self._run, name="stm-live-localize", daemon=True)

    def wants(self, channel: str, direction: str) -> bool:
        return channel in self.settings.channels and direction in self.settings.directions

    def start(self) -> None:
        log.info("localization maps from %d %s reconstructions each", self.samples, self.engine.name)
        self._thread.start()

    def submit(self, job: LocalizeJob) -> None:
        """Called on the ingest thread; never blocks."""
        while True:
            try:
                self._jobs.put_nowait(job)
                return
            except queue.Full:
                try:
                    dropped = self._jobs.get_nowait()
                except queue.Empty:
                    continue
                if dropped is not None:
                    self.counters["locmaps_dropped"] += 1
                    count = self.counters["locmaps_dropped"]
                    if worth_logging(count):
                        log.warning("localization behind: dropped the map of %s/%s (%d dropped so far)",
                                    dropped.uid, dropped.channel, count)

    def request_crops(self, channel: str, direction: str, boxes_nm: np.ndarray | None) -> tuple[str, int]:
        """Queue the crops of the newest map of (channel, direction): the given boxes, or the
        molecules found there. Called on the request thread; returns (uid, molecules queued)."""
        localized = self._latest.get((channel, direction))
        if localized is None:
            raise CropRequestError(f"no localization map of {channel}/{direction} yet")
        if boxes_nm is None:
            found = localized.message.molecules
            if found.shape[1] == 0:
                raise CropRequestError(f"no molecules in the newest map of {channel}/{direction} "
                                       "(localize.molecules finds them; or give boxes_nm)")
            boxes = found.T[np.argsort(-found[4], kind="stable")]
        else:
            width, height = localized.size_nm
            x0, y0, x1, y1 = boxes_nm.T
            if not ((x0 < width) & (x1 > 0) & (y0 < height) & (y1 > 0)).all():
                raise CropRequestError(f"boxes outside the {width:g} x {height:g} nm frame")
            boxes = np.concatenate([boxes_nm, np.ones((len(boxes_nm), 1))], axis=1)
        pixel = localized.size_nm[0] / localized.single.shape[1]
        largest = (MAX_CROP_FINE_PX // self.settings.crop_factor) * pixel
        inside = np.clip(boxes[:, :4], 0.0, np.tile(localized.size_nm, 2))
        extent = np.maximum(inside[:, 2] - inside[:, 0], inside[:, 3] - inside[:, 1]) + 2 * localized.message.spacing_nm
        if boxes_nm is not None and not (extent <= largest).all():
            raise CropRequestError(f"boxes larger than {largest:.3g} nm with their margin: crops are for molecules")
        boxes = boxes[extent <= largest][:self.settings.max_crops]
        if not len(boxes):
            raise CropRequestError("no molecule small enough to crop")
        try:
            self._jobs.put_nowait(CropJob(localized, boxes, time.perf_counter()))
        except queue.Full:
            raise CropRequestError("localization is busy; ask again in a moment") from None
        return localized.message.uid, len(boxes)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the frames already queued, then stop, and release the engines."""
        if self._thread.ident is not None:
            self._closing.set()
            self._jobs.put(None)
            self._thread.join(timeout)
        self.engine.close()

    def _run(self) -> None:
        duty = self.settings.max_duty
        while (job := self._jobs.get()) is not None:
            started = time.perf_counter()
            crop = isinstance(job, CropJob)
            frame = job.localized.message if crop else job
            try:
                messages = [self.crops(job)] if crop else self.localize(job)
            except Exception:
                self.counters["locmap_errors"] += 1
                log.exception("localization of %s/%s failed", frame.uid, frame.channel)
                messages = []
            for published in messages:
                self.sink(published)
                self.counters["crop_maps_published" if crop else "locmaps_published"] += 1
            self._closing.wait((time.perf_counter() - started) * (1 - duty) / duty)

    def localize(self, job: LocalizeJob) -> list[LocMap]:
        """The job's map, then the 'both' map once the other trace of its frame is done too."""
        result = self._localize_trace(job)
        if result is None:
            return []
        atoms, message = result
        if not {"forward", "backward"} <= set(self.settings.directions):
            return [message]
        other = self._unpaired.pop(job.channel, None)
        if other is None or other[0] != job.uid or other[1] == job.direction:
            self._unpaired[job.channel] = (job.uid, job.direction, atoms, message)
            return [message]
        _, _, other_atoms, other_message = other
        forward, backward = (atoms, other_atoms) if job.direction == "forward" else (other_atoms, atoms)
        both, offset = combine_traces(forward, backward, message.spacing_nm)
        density = (message.density + other_message.density) / 2 if message.density.shape == \
            other_message.density.shape else message.density
        combined = replace(message, direction="both", density=density.astype(np.float32), atoms=self._table(both),
                           motion={**message.motion, "trace_offset_x_nm": float(offset[0]),
                                   "trace_offset_y_nm": float(offset[1])},
                           latency_s=time.perf_counter() - job.submitted, t=time.time())
        return [message, combined]

    def crops(self, job: CropJob) -> LocMap:
        """The frame's map again, with the atoms of each box localized on its super-resolved crop."""
        message = job.localized.message
        pixel = job.localized.size_nm[0] / job.localized.single.shape[1]
        tables = []
        for index, box in enumerate(job.boxes_nm):
            atoms = crop_atoms(self.engine, job.localized.single, pixel, box[:4], message.spacing_nm, self.samples,
                               self._rng, self.settings.crop_factor)
            tables.append(np.vstack([self._table(atoms), np.full((1, len(atoms.x_nm)), float(index))]))
        return replace(message, molecules=job.boxes_nm.T.astype(np.float64),
                       molecule_atoms=np.concatenate(tables, axis=1)[:, :self.max_atoms],
                       latency_s=time.perf_counter() - job.submitted, t=time.time())

    def _localize_trace(self, job: LocalizeJob) -> tuple[Atoms, LocMap] | None:
        rows, cols = job.image.shape
        measured_rows = job.mask.any(axis=1).sum()
        if min(rows, cols) < MIN_FRAME_PX or measured_rows < 4:
            self.counters["locmaps_skipped"] += 1
            return None
        pixel = job.size_nm[0] / cols
        single = reconstruct_exact(self.engine, job.image[None], job.mask[None]).images[0]
        try:
            spacing = self.settings.spacing_nm or dominant_spacing_nm(single, pixel)
        except ValueError as exc:
            self.counters["locmaps_skipped"] += 1
            log.info("no localization map for %s/%s: %s", job.uid, job.channel, exc)
            return None
        try:
            lattice = analyze_lattice(single, pixel)
            bravais = lattice.bravais
            a, b = lattice.lengths_nm
            lattice_fields = {"a_nm": a, "b_nm": b, "angle_deg": lattice.angle_deg}
        except LatticeError:
            bravais, lattice_fields = "none", {}
        motion = {}
        drift = self._drift.update((job.channel, job.direction), single, job.size_nm, job.started_t, spacing)
        if drift is not None:
            motion = {"drift_x_nm_s": drift.velocity_nm_s[0], "drift_y_nm_s": drift.velocity_nm_s[1]}
        molecules = np.zeros((len(MOLECULE_COLUMNS), 0))
        if self.detector is not None:
            found = self.detector.detect(single, pixel)
            molecules = np.concatenate([found.boxes_nm.T, found.scores[None]])[:, :self.max_atoms]
        upsample = 2 if 2 * max(rows, cols) <= self.max_density_px else 1
        result = localization_map(self.engine, job.image, job.mask, pixel, spacing, self.samples, self._rng,
                                  self.settings.sigma_nm or None, self.settings.min_support, upsample)
        message = LocMap(uid=job.uid, channel=job.channel, direction=job.direction, method=self.engine.name,
                         samples=self.samples, spacing_nm=float(spacing), sigma_nm=result.sigma_nm,
                         density_pixel_nm=result.density_pixel_nm, bravais=bravais, lattice=lattice_fields,
                         latency_s=time.perf_counter() - job.submitted, t=time.time(),
                         density=result.density, atoms=self._table(result.atoms),
                         molecules=molecules.astype(np.float64), motion=motion)
        self._latest[(job.channel, job.direction)] = _Localized(job.size_nm, single, message)
        return result.atoms, message

    def _table(self, atoms: Atoms) -> np.ndarray:
        """The (5, K) wire table; beyond the protocol's limit, the best-supported atoms."""
        table = np.stack([getattr(atoms, c) for c in ATOM_COLUMNS]).astype(np.float64)
        if table.shape[1] > self.max_atoms:
            log.warning("%d atoms, publishing the %d best supported", table.shape[1], self.max_atoms)
            table = table[:, np.argsort(-atoms.support, kind="stable")[:self.max_atoms]]
        return table
