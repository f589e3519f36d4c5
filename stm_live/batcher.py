"""Micro-batching between the reconstruction scheduler and the engine.

An engine call costs a fixed overhead plus a share per frame, so frames that are waiting
together (several channels, both traces, several scans or instruments) go to the engine in one
call. Frames are grouped by a bucketed size: each side is padded up to a multiple of
`bucket_px`, so a stream of slightly different frame sizes reuses a few shapes (a compiled or
graph-captured engine builds one per shape) instead of churning through many. The padding is
unmeasured (mask False), so no engine treats it as data: the classical engines give exactly the
unpadded result, and the network leaves it out but for one row or column at the far edges. The
result is cropped back; measured pixels are restored as always (`reconstruct_exact`).
A group larger than `max_batch` is split; batches run oldest first, so every scan's frames come
back in the order they were taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from stm_live.engines import Reconstructor, reconstruct_exact


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 32
    max_delay_us: int = 200
    bucket_px: int = 64

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_delay_us < 0 or self.bucket_px < 0:
            raise ValueError(f"invalid batch policy {self}")

    def bucket(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The padded (rows, cols) a frame of `shape` is reconstructed at."""
        if not self.bucket_px:
            return shape
        return tuple(n + (-n % self.bucket_px) for n in shape)  # type: ignore[return-value]


class Batchable(Protocol):
    image: np.ndarray
    mask: np.ndarray
    triggered: float


def plan_batches(jobs: Sequence[Batchable], policy: BatchPolicy) -> list[list[Batchable]]:
    """Jobs grouped by (bucketed shape, dtype), at most `max_batch` each, oldest batch first."""
    groups: dict[tuple, list[Batchable]] = {}
    for job in sorted(jobs, key=lambda j: j.triggered):
        groups.setdefault((policy.bucket(job.image.shape), job.image.dtype.str), []).append(job)
    batches = [group[i:i + policy.max_batch] for group in groups.values()
               for i in range(0, len(group), policy.max_batch)]
    return sorted(batches, key=lambda batch: batch[0].triggered)


@dataclass(frozen=True)
class BatchResult:
    """Each job's reconstruction at its own size, in job order, and the engine that made them."""

    images: list[np.ndarray]
    uncertainty: list[np.ndarray | None]
    method: str | None


def reconstruct_batch(engine: Reconstructor, jobs: Sequence[Batchable], policy: BatchPolicy) -> BatchResult:
    """One engine call for jobs of one bucket."""
    rows, cols = policy.bucket(jobs[0].image.shape)
    result = reconstruct_exact(engine, np.stack([_pad(j.image, rows, cols) for j in jobs]),
                               np.stack([_pad(j.mask, rows, cols) for j in jobs]))
    crops = [(slice(0, j.image.shape[0]), slice(0, j.image.shape[1])) for j in jobs]
    return BatchResult([result.images[i][crop] for i, crop in enumerate(crops)],
                       [None if result.uncertainty is None else result.uncertainty[i][crop]
                        for i, crop in enumerate(crops)], result.method)


def _pad(array: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Unmeasured padding at the bottom and right: False in a mask, NaN in an image."""
    extra = ((0, rows - array.shape[0]), (0, cols - array.shape[1]))
    if not any(after for _, after in extra):
        return array
    return np.pad(array, extra, constant_values=False if array.dtype == bool else np.nan)
