"""Physical features of one scanned row (forward and backward trace) against the row before it.

Each number is something an STM user reads off a line by eye when the tip goes bad:
- `disagreement`: forward and backward traces no longer show the same surface (an unstable or
  multi-apex tip images differently depending on the direction of travel);
- `row_correlation`: the row no longer resembles the row scanned before it (tip change, noise);
- `step`: the whole line jumped in height (the apex lost or picked up an atom);
- `roughness`: the median point-to-point height change in nm (noise plus the finest structure),
  `hf_fraction`: the share of the line's power above half the Nyquist frequency (a noisy tip);
- `spikes`: isolated excursions far beyond the line's own noise;
- `width_nm`: how wide features look (a blunt tip broadens them);
- `ghost`: a repeated, non-periodic copy of features in the line's autocorrelation (a second apex);
- `corrugation_nm`: how much the line varies at all (a blunt tip flattens atomic contrast).
Values are compressed (logarithms, bounded ratios) so that a classifier sees comparable ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

FEATURE_NAMES = ("disagreement", "row_correlation", "step", "roughness", "hf_fraction", "spikes",
                 "width_nm", "ghost", "corrugation_nm", "pixel_nm")
N_FEATURES = len(FEATURE_NAMES)
_EPS = 1e-6


@lru_cache(maxsize=8)
def _abscissa(n: int) -> np.ndarray:
    x = np.linspace(-1.0, 1.0, n)
    x.flags.writeable = False
    return x


def _median(values: np.ndarray) -> float:
    """np.median of a 1-D array, without its NaN checks and dispatch (it runs five times a row)."""
    n = values.size
    k = n // 2
    if n % 2:
        return float(np.partition(values, k)[k])
    low, high = np.partition(values, (k - 1, k))[k - 1:k + 1]
    return float((low + high) / 2)


def detrend(lines: np.ndarray) -> np.ndarray:
    """Each line (last axis) minus its least-squares straight line: slope and offset are not tip properties."""
    x = _abscissa(lines.shape[-1])
    centred = lines - lines.mean(axis=-1, keepdims=True)
    return centred - x * ((centred @ x) / (x @ x))[..., None]


def noise_scale(line: np.ndarray) -> float:
    """Robust point-to-point variation (nm): white noise alone gives its standard deviation."""
    return _median(np.abs(np.diff(line))) / 0.9539 + _EPS


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    da, db = a - a.mean(), b - b.mean()
    denominator = np.sqrt((da @ da) * (db @ db))
    return float(da @ db / denominator) if denominator > 0 else 0.0


def _autocorrelation(line: np.ndarray) -> np.ndarray:
    spectrum = np.fft.rfft(line, 2 * line.size)
    acf = np.fft.irfft(spectrum * np.conj(spectrum))[: line.size // 2]
    return acf / (acf[0] + _EPS)


def _period_px(spectrum: np.ndarray, size: int) -> float | None:
    """The lattice period in pixels of a line of `size` pixels with this power spectrum (rfft,
    squared) when it has one clear peak, else None."""
    power = spectrum[1:]
    k = int(np.argmax(power))
    if power[k] < 25 * _median(power) + _EPS:
        return None
    return size / (k + 1)


def _width_and_ghost(line: np.ndarray, spectrum: np.ndarray, pixel_nm: float) -> tuple[float, float]:
    """Half-width (nm) of the line's autocorrelation peak, and the strongest secondary peak of
    the gradient's autocorrelation that is not at a multiple of the line's lattice period."""
    acf = _autocorrelation(line)
    below = np.flatnonzero(acf < 0.5)
    width_px = float(below[0]) if below.size else float(acf.size)
    gradient_acf = _autocorrelation(np.diff(line))
    peaks = np.flatnonzero((gradient_acf[1:-1] > gradient_acf[:-2]) & (gradient_acf[1:-1] >= gradient_acf[2:])) + 1
    peaks = peaks[peaks > 2]
    period = _period_px(spectrum, line.size)
    if period is not None:
        ratio = peaks / period
        peaks = peaks[(np.abs(ratio - np.round(ratio)) > 0.15) | (ratio < 0.5)]
    ghost = float(gradient_acf[peaks].max()) if peaks.size else 0.0
    return width_px * pixel_nm, max(ghost, 0.0)


@dataclass(frozen=True)
class Row:
    """One row's traces detrended once: its features, the row after it and every window it
    falls in read these (a window holds 32 rows and moves on by 2)."""

    forward: np.ndarray  # detrended heights (nm), float64
    backward: np.ndarray | None  # detrended backward trace, None when only one direction is scanned
    forward_spread: float  # standard deviation of the detrended forward trace (nm)
    backward_spread: float  # the same of the backward trace (the forward's when there is none)
    level_nm: float  # median raw height of the forward trace: the next row's height step


def prepare_row(forward: np.ndarray, backward: np.ndarray | None = None) -> Row:
    """A row's traces (heights in nm) as every later reading needs them."""
    f = detrend(np.asarray(forward, np.float64))
    b = None if backward is None else detrend(np.asarray(backward, np.float64))
    f_spread = float(np.std(f))
    return Row(f, b, f_spread, f_spread if b is None else float(np.std(b)),
               _median(np.asarray(forward, np.float64)))


def features_of(row: Row, previous: Row | None, pixel_nm: float) -> np.ndarray:
    """Features of one prepared row against the row scanned before it."""
    f = row.forward
    noise = noise_scale(f)
    spread = row.forward_spread + _EPS
    out = np.zeros(N_FEATURES, np.float32)
    if row.backward is not None:
        out[0] = np.log1p(np.std(f - row.backward) / (0.5 * (spread + row.backward_spread) + _EPS))
    if previous is not None:
        out[1] = _correlation(f, previous.forward)
        out[2] = np.log1p(abs(row.level_nm - previous.level_nm) / (noise + spread))
    out[3] = np.log10(noise)
    spectrum = np.abs(np.fft.rfft(f)) ** 2
    out[4] = spectrum[spectrum.size // 2:].sum() / (spectrum[1:].sum() + _EPS)
    residual = f - ndimage.median_filter(f, size=5, mode="nearest")
    out[5] = np.log1p(np.abs(residual).max() / (1.4826 * _median(np.abs(residual)) + 0.1 * noise + _EPS))
    width_nm, ghost = _width_and_ghost(f, spectrum, pixel_nm)
    out[6] = np.log10(width_nm + _EPS)
    out[7] = ghost
    out[8] = np.log10(spread)
    out[9] = np.log10(pixel_nm)
    return out

