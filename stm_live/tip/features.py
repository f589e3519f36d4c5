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

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numba
import numpy as np

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


def _spectra(line: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The line's power spectrum and the normalised autocorrelations (lags up to half the line) of
    the line and of its gradient, from one forward and one inverse FFT of both, zero-padded to
    twice the line: the padded transform at even frequencies is the line's own transform."""
    n = line.size
    padded = np.zeros((2, 2 * n))
    padded[0, :n] = line
    padded[1, :n - 1] = np.diff(line)
    transform = np.fft.rfft(padded)
    power = transform.real ** 2 + transform.imag ** 2
    acf = np.fft.irfft(power)
    return (power[0, ::2], acf[0, :n // 2] / (acf[0, 0] + _EPS),
            acf[1, :(n - 1) // 2] / (acf[1, 0] + _EPS))


@numba.njit(cache=True)
def _period_px(spectrum: np.ndarray, size: int) -> float:
    """The lattice period in pixels of a line of `size` pixels with this power spectrum (rfft,
    squared) when it has one clear peak, else 0."""
    power = spectrum[1:]
    k = np.argmax(power)
    if power[k] < 25 * np.median(power) + _EPS:
        return 0.0
    return size / (k + 1)


@numba.njit(cache=True)
def _ghost(gradient_acf: np.ndarray, period: float) -> float:
    """The strongest local maximum of the gradient's autocorrelation beyond lag 2 that is not at a
    multiple of the lattice period (0: no lattice), at least 0."""
    ghost = 0.0
    for i in range(3, gradient_acf.size - 1):
        value = gradient_acf[i]
        if not (value > gradient_acf[i - 1] and value >= gradient_acf[i + 1]):
            continue
        if period > 0:
            ratio = i / period
            if abs(ratio - np.round(ratio)) <= 0.15 and ratio >= 0.5:
                continue
        ghost = max(ghost, value)
    return ghost


@numba.njit(cache=True)
def _spike_ratio(line: np.ndarray, noise: float) -> float:
    """The largest departure of the line from its 5-point running median (edges repeated), in units
    of the departures' robust spread plus a tenth of the noise."""
    n = line.size
    residual = np.empty(n)
    window = np.empty(5)
    for i in range(n):
        for k in range(5):  # insertion sort of the neighbourhood, in place
            value = line[min(max(i + k - 2, 0), n - 1)]
            j = k
            while j > 0 and window[j - 1] > value:
                window[j] = window[j - 1]
                j -= 1
            window[j] = value
        residual[i] = abs(line[i] - window[2])
    return residual.max() / (1.4826 * np.median(residual) + 0.1 * noise + _EPS)


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
    spectrum, acf, gradient_acf = _spectra(f)
    out[4] = spectrum[spectrum.size // 2:].sum() / (spectrum[1:].sum() + _EPS)
    out[5] = np.log1p(_spike_ratio(f, noise))
    below = np.flatnonzero(acf < 0.5)
    width_px = float(below[0]) if below.size else float(acf.size)
    out[6] = np.log10(width_px * pixel_nm + _EPS)
    out[7] = _ghost(gradient_acf, _period_px(spectrum, f.size))
    out[8] = np.log10(spread)
    out[9] = np.log10(pixel_nm)
    return out


EVENT_FEATURES = [FEATURE_NAMES.index(n) for n in ("step", "disagreement", "row_correlation", "spikes")]


def stands_out(window_features: Sequence[np.ndarray], mads: float) -> bool:
    """Whether the newest row's step, disagreement, row correlation or spike score lies more than
    `mads` median absolute deviations from the rows before it in the window: what the first rows
    after a tip change look like, read at once rather than at the next scheduled window."""
    values = np.array(window_features)[:, EVENT_FEATURES]
    before, newest = values[:-1], values[-1]
    median = np.median(before, axis=0)
    spread = np.median(np.abs(before - median), axis=0) + 1e-12
    return bool((np.abs(newest - median) > mads * spread).any())


@lru_cache(maxsize=1)
def compile_kernels() -> None:
    """Compile the numba kernels now (or load them from numba's cache), once per process: the
    first call takes seconds (7 s here uncached, 0.5 s cached), which the monitor must not spend
    on a scanned line."""
    row = prepare_row(np.linspace(0.0, 1.0, 16) ** 2)
    features_of(row, row, 0.1)
