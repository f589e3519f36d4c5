"""The one reconstruction interface that every engine (classical or learned) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController

_THREADPOOLS = ThreadpoolController()


def inferable_rows(mask: np.ndarray) -> tuple[int, int]:
    """Rows [top, bottom) an engine may fill: the measured span plus one typical row spacing on
    each side. Beyond it nothing was scanned, so nothing is inferred (a frame still being scanned
    shows its unscanned part empty)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return 0, 0
    reach = int(np.max(np.diff(rows))) if rows.size > 1 else 0
    return max(0, int(rows[0]) - reach), min(mask.shape[0], int(rows[-1]) + reach + 1)


def serial_blas():
    """A context in which numpy's BLAS uses one thread. An engine whose runner has threads of its
    own does its numpy work in it: OpenBLAS workers left spinning after a small matrix product
    halved ONNX Runtime's speed on 2 cores (256x256: 53 against 21 ms per frame)."""
    return _THREADPOOLS.limit(limits=1, user_api="blas")


class EngineError(RuntimeError):
    """An engine that failed to load or returned something unusable."""


@dataclass(frozen=True)
class Reconstruction:
    """Full frames (B, H, W); pixels an engine cannot infer (unscanned regions) are NaN.
    `method` names the engine that made them (set by `reconstruct_exact`)."""

    images: np.ndarray
    uncertainty: np.ndarray | None = None
    method: str | None = None


class Reconstructor(ABC):
    """Fills the unmeasured pixels of a batch of frames.

    `measured` is (B, H, W) float with arbitrary values at unmeasured pixels; `mask` is (B, H, W)
    bool, True where a pixel was measured. Implementations need not preserve measured pixels:
    `reconstruct_exact` restores them, so no engine can alter a measurement.
    """

    name: str = "abstract"

    @abstractmethod
    def reconstruct(self, measured: np.ndarray, mask: np.ndarray) -> Reconstruction: ...


def _writable(array: np.ndarray, dtype: np.dtype, measured: np.ndarray) -> np.ndarray:
    """The engine's own array when it may be completed in place (right type, writable, not the
    measurement itself), else a copy: a batch of frames is not copied for nothing."""
    if array.dtype == dtype and array.flags.writeable and not np.may_share_memory(array, measured):
        return array
    return array.astype(dtype)


def reconstruct_exact(engine: Reconstructor, measured: np.ndarray, mask: np.ndarray) -> Reconstruction:
    """Run an engine and return frames in the measurement's dtype with measured pixels untouched."""
    if measured.ndim != 3 or measured.shape != mask.shape:
        raise EngineError(f"expected (B, H, W) measured and mask, got {measured.shape} and {mask.shape}")
    result = engine.reconstruct(measured, mask)
    if result.images.shape != measured.shape:
        raise EngineError(f"{engine.name} returned shape {result.images.shape} for {measured.shape}")
    images = _writable(result.images, measured.dtype, measured)
    np.copyto(images, measured, where=mask)
    uncertainty = result.uncertainty
    if uncertainty is not None:
        uncertainty = _writable(uncertainty, np.float32, measured)
        np.copyto(uncertainty, 0.0, where=mask)
    return Reconstruction(images, uncertainty, result.method or engine.name)
