"""The one reconstruction interface that every engine (classical or learned) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


class EngineError(RuntimeError):
    """An engine that failed to load or returned something unusable."""


@dataclass(frozen=True)
class Reconstruction:
    """Full frames (B, H, W); pixels an engine cannot infer (unscanned regions) are NaN."""

    images: np.ndarray
    uncertainty: np.ndarray | None = None


class Reconstructor(ABC):
    """Fills the unmeasured pixels of a batch of frames.

    `measured` is (B, H, W) float with arbitrary values at unmeasured pixels; `mask` is (B, H, W)
    bool, True where a pixel was measured. Implementations need not preserve measured pixels:
    `reconstruct_exact` restores them, so no engine can alter a measurement.
    """

    name: str = "abstract"

    @abstractmethod
    def reconstruct(self, measured: np.ndarray, mask: np.ndarray) -> Reconstruction: ...


def reconstruct_exact(engine: Reconstructor, measured: np.ndarray, mask: np.ndarray) -> Reconstruction:
    """Run an engine and return frames in the measurement's dtype with measured pixels untouched."""
    if measured.ndim != 3 or measured.shape != mask.shape:
        raise EngineError(f"expected (B, H, W) measured and mask, got {measured.shape} and {mask.shape}")
    result = engine.reconstruct(measured, mask)
    if result.images.shape != measured.shape:
        raise EngineError(f"{engine.name} returned shape {result.images.shape} for {measured.shape}")
    images = result.images.astype(measured.dtype, copy=True)
    images[mask] = measured[mask]
    uncertainty = result.uncertainty
    if uncertainty is not None:
        uncertainty = uncertainty.astype(np.float32, copy=True)
        uncertainty[mask] = 0.0
    return Reconstruction(images, uncertainty)
