"""Rendering apparent heights on a padded pixel grid, in Fourier space.

A frame of `size_px` pixels over `frame_nm` is rendered on a grid padded by `margin` pixels on
every side, so that shifted views (multi-tip apices, drift, creep, misaligned lines) never read
outside it. Atoms are splatted as bilinear point masses and given their apparent-height profile
(a Gaussian, the AtomVision convolution approach) by a multiplication in Fourier space; the tip's
lateral resolution and an apex offset are further multiplications, so imaging a surface with
several apices costs one inverse FFT per apex. Frame coordinates are in nm: x to the right, y
down, pixel (row r, column c) centred at ((c + 0.5) p, (r + 0.5) p) with p = frame_nm / size_px.
"""

from __future__ import annotations

import numpy as np
from scipy import fft

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


class Canvas:
    """The spectrum of a surface's apparent height on a padded square grid."""

    def __init__(self, size_px: int, frame_nm: float, margin: int) -> None:
        self.size = size_px
        self.margin = margin
        self.n = size_px + 2 * margin
        self.pixel_nm = frame_nm / size_px
        self.frame_nm = frame_nm
        self.n = fft.next_fast_len(self.n, real=True)
        self.margin = (self.n - size_px) // 2
        self._spectrum = np.zeros((self.n, self.n // 2 + 1), dtype=np.complex64)
        self._fields = np.zeros((self.n, self.n), dtype=np.float32)
        self._fields_added = False
        self._points: dict[float, list[tuple[np.ndarray, np.ndarray]]] = {}
        ky = 2 * np.pi * np.fft.fftfreq(self.n, d=self.pixel_nm)
        kx = 2 * np.pi * np.fft.rfftfreq(self.n, d=self.pixel_nm)
        self.kx, self.ky = kx[None, :].astype(np.float32), ky[:, None].astype(np.float32)
        self.k2 = self.kx**2 + self.ky**2

    @property
    def spectrum(self) -> np.ndarray:
        """All features added so far; point sets and fields are transformed once, here."""
        if self._points:
            for fwhm, parts in self._points.items():
                sigma = fwhm / FWHM_PER_SIGMA
                grid = self._splat(np.concatenate([p for p, _ in parts]), np.concatenate([w for _, w in parts]))
                # A unit point mass blurred to a Gaussian of peak 1 has area 2 pi sigma^2 (in pixel units).
                grid *= 2 * np.pi * (sigma / self.pixel_nm) ** 2
                self._spectrum += fft.rfft2(grid) * np.exp(-0.5 * sigma**2 * self.k2)
            self._points.clear()
        if self._fields_added:
            self._spectrum += fft.rfft2(self._fields)
            self._fields[:] = 0.0
            self._fields_added = False
        return self._spectrum

    def axis_nm(self) -> np.ndarray:
        """Pixel-centre coordinates (nm, frame frame) along one axis of the padded grid."""
        return ((np.arange(self.n) - self.margin + 0.5) * self.pixel_nm).astype(np.float32)

    def grid_nm(self) -> tuple[np.ndarray, np.ndarray]:
        axis = self.axis_nm()
        return axis[None, :], axis[:, None]

    def bounds_nm(self) -> tuple[float, float]:
        """Region covered by the padded grid, in frame coordinates."""
        return -self.margin * self.pixel_nm, (self.size + self.margin) * self.pixel_nm

    def _splat(self, px: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Bilinear point masses at fractional pixel positions of the padded grid."""
        x, y = px[:, 0], px[:, 1]
        x0, y0 = np.floor(x).astype(np.intp), np.floor(y).astype(np.intp)
        fx, fy = x - x0, y - y0
        size = self.n * self.n
        flat = y0 * self.n + x0
        grid = np.bincount(flat, weights=w * (1 - fx) * (1 - fy), minlength=size)
        grid += np.bincount(flat + 1, weights=w * fx * (1 - fy), minlength=size)
        grid += np.bincount(flat + self.n, weights=w * (1 - fx) * fy, minlength=size)
        grid += np.bincount(flat + self.n + 1, weights=w * fx * fy, minlength=size)
        return grid.reshape(self.n, self.n).astype(np.float32)

    def add_points(self, xy_nm: np.ndarray, heights_nm: np.ndarray | float, fwhm_nm: float) -> None:
        """Gaussian bumps of the given peak heights (negative for holes) at the given sites."""
        if len(xy_nm) == 0:
            return
        px = np.asarray(xy_nm, dtype=float) / self.pixel_nm - 0.5 + self.margin
        inside = np.all((px >= 0) & (px < self.n - 1), axis=1)
        w = np.broadcast_to(np.asarray(heights_nm, dtype=float), (len(px),))[inside]
        self._points.setdefault(round(float(fwhm_nm), 4), []).append((px[inside], w))

    def add_field(self, field_nm: np.ndarray) -> None:
        """A smooth real-space height field on the padded grid (standing waves, ridges, ...)."""
        self._fields += field_nm
        self._fields_added = True

    def add_smooth_random(self, rng: np.random.Generator, rms_nm: float, correlation_nm: float) -> None:
        """Long-range height variation (strain, subsurface charge): Gaussian-correlated random field.

        Drawn directly in Fourier space on the few low-k bins that carry it, so it costs almost nothing.
        """
        envelope = np.exp(-0.25 * correlation_nm**2 * self.k2)
        bins = envelope > 1e-3
        coefficients = np.zeros_like(self._spectrum)
        count = int(bins.sum())
        coefficients[bins] = envelope[bins] * (rng.standard_normal(count) + 1j * rng.standard_normal(count))
        coefficients[0, 0] = 0.0
        variance = 2 * np.sum(np.abs(coefficients) ** 2) / self.n**4
        if variance > 0:
            self._spectrum += (coefficients * (rms_nm / np.sqrt(variance))).astype(np.complex64)

    def convolve_points(self, xy_nm: np.ndarray, weights: np.ndarray, kernel_nm: np.ndarray) -> None:
        """Add sum_i w_i K(r - r_i) for a kernel sampled on the padded grid centred at pixel (0, 0)."""
        if len(xy_nm) == 0:
            return
        px = np.rint(xy_nm / self.pixel_nm - 0.5 + self.margin).astype(np.intp)
        ok = np.all((px >= 0) & (px < self.n), axis=1)
        grid = np.zeros((self.n, self.n))
        np.add.at(grid, (px[ok, 1], px[ok, 0]), np.asarray(weights, dtype=float)[ok])
        self._spectrum += (fft.rfft2(grid) * fft.rfft2(kernel_nm)).astype(np.complex64)

    def radial_kernel(self, function) -> np.ndarray:
        """f(r) sampled with r measured from pixel (0, 0) with periodic wrap, for convolve_points."""
        d = (np.fft.fftfreq(self.n, d=1.0 / self.n) * self.pixel_nm).astype(np.float32)
        r = np.hypot(d[None, :], d[:, None])
        return function(r).astype(np.float32)

    def image(self, resolution_nm: float = 0.0, shift_nm: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """The padded height map seen through a Gaussian resolution, sampled at r + shift."""
        # Both the Gaussian and the shift factor are separable: two 1-D factors, no full-grid exp.
        blur = -0.5 * resolution_nm**2
        row = np.exp(blur * self.kx**2 + 1j * self.kx * shift_nm[0]).astype(np.complex64)
        col = np.exp(blur * self.ky**2 + 1j * self.ky * shift_nm[1]).astype(np.complex64)
        return fft.irfft2(self.spectrum * row * col, s=(self.n, self.n))

    def crop(self, padded: np.ndarray) -> np.ndarray:
        m = self.margin
        return padded[m:m + self.size, m:m + self.size]


def lattice_sites(a1: np.ndarray, a2: np.ndarray, basis: np.ndarray, origin: np.ndarray,
                  bounds: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Sites origin + i a1 + j a2 + basis[b] inside the square bounds; returns (xy, basis index)."""
    lo, hi = bounds
    corners = np.array([[lo, lo], [lo, hi], [hi, lo], [hi, hi]]) - origin
    inv = np.linalg.inv(np.column_stack([a1, a2]))
    ij = corners @ inv.T
    i0, j0 = np.floor(ij.min(axis=0)).astype(int) - 1
    i1, j1 = np.ceil(ij.max(axis=0)).astype(int) + 1
    i, j = np.meshgrid(np.arange(i0, i1 + 1), np.arange(j0, j1 + 1), indexing="ij")
    cells = origin + i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2
    sites = (cells[:, None, :] + basis[None, :, :]).reshape(-1, 2)
    kind = np.tile(np.arange(len(basis)), len(cells))
    keep = np.all((sites >= lo) & (sites <= hi), axis=1)
    return sites[keep], kind[keep]


def rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])
