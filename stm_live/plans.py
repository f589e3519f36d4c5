"""Sampling plans: which pixels of a frame the instrument measures.

One syntax everywhere (config, CLI, wire header):

    full            every pixel
    lines:K         every K-th row (rows 0, K, 2K, ...), whole rows
    pixels:F[:S]    a random fraction F of pixels, drawn with seed S (default 0)
    sr:K            every K-th row and column: a K-times coarser scan of the same frame
    partial:N       the first N rows in acquisition order (top rows for a downward scan)

Masks are in image orientation (row 0 is the top of the frame) and are identical on the
instrument and daemon side, so a line only needs to carry the values of its measured pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("full", "lines", "pixels", "sr", "partial")


class PlanError(ValueError):
    """A plan string that does not parse or does not fit the frame."""


@dataclass(frozen=True)
class Plan:
    kind: str
    step: int = 1
    fraction: float = 1.0
    seed: int = 0
    count: int = 0

    def __str__(self) -> str:
        if self.kind == "full":
            return "full"
        if self.kind in ("lines", "sr"):
            return f"{self.kind}:{self.step}"
        if self.kind == "partial":
            return f"partial:{self.count}"
        return f"pixels:{self.fraction:g}" + (f":{self.seed}" if self.seed else "")

    def mask(self, rows: int, cols: int, direction: str = "down") -> np.ndarray:
        """Boolean (rows, cols) mask of measured pixels."""
        if rows < 1 or cols < 1:
            raise PlanError(f"frame of {rows}x{cols} pixels is empty")
        mask = np.zeros((rows, cols), dtype=bool)
        if self.kind == "full":
            mask[:] = True
        elif self.kind == "lines":
            mask[:: self.step] = True
        elif self.kind == "sr":
            mask[:: self.step, :: self.step] = True
        elif self.kind == "partial":
            n = min(self.count, rows)
            if direction == "up":
                mask[rows - n:] = True
            else:
                mask[:n] = True
        else:
            rng = np.random.default_rng(self.seed)
            n = max(1, round(self.fraction * rows * cols))
            mask.ravel()[rng.choice(rows * cols, size=n, replace=False)] = True
        return mask

    def row_order(self, rows: int, cols: int, direction: str = "down") -> np.ndarray:
        """Rows with at least one measured pixel, in acquisition order."""
        measured = np.flatnonzero(self.mask(rows, cols, direction).any(axis=1))
        return measured[::-1] if direction == "up" else measured


def parse_plan(text: str) -> Plan:
    """Parse a plan string; raise PlanError with the reason."""
    if not isinstance(text, str):
        raise PlanError(f"plan must be a string, got {type(text).__name__}")
    kind, _, arg = text.strip().partition(":")
    if kind not in KINDS:
        raise PlanError(f"unknown plan {text!r}; expected one of {', '.join(KINDS)}")
    if kind == "full":
        if arg:
            raise PlanError("plan 'full' takes no argument")
        return Plan("full")
    if not arg:
        raise PlanError(f"plan {kind!r} needs an argument, e.g. {kind}:4")
    try:
        if kind in ("lines", "sr"):
            step = int(arg)
            if not 1 <= step <= 64:
                raise PlanError(f"{kind}:K needs 1 <= K <= 64, got {step}")
            return Plan(kind, step=step)
        if kind == "partial":
            count = int(arg)
            if count < 1:
                raise PlanError(f"partial:N needs N >= 1, got {count}")
            return Plan(kind, count=count)
        frac_text, _, seed_text = arg.partition(":")
        fraction = float(frac_text)
        seed = int(seed_text) if seed_text else 0
    except ValueError as exc:
        raise PlanError(f"bad plan {text!r}: {exc}") from exc
    if not 0.0 < fraction <= 1.0:
        raise PlanError(f"pixels:F needs 0 < F <= 1, got {fraction}")
    if seed < 0:
        raise PlanError(f"pixels:F:S needs a seed >= 0, got {seed}")
    return Plan("pixels", fraction=fraction, seed=seed)
