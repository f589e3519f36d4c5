"""`stm-live sim compare-real`: the simulator next to real scans, as pictures and measured numbers.

For each real atomic-resolution scan a simulated twin is made with the same surface, frame size,
pixels and bias. Both are measured the same way:
- lattice constant from the autocorrelation: mean distance of the nearest strong peaks along
  the three shortest directions, with their max/min ratio as a measure of scan distortion;
- white-noise floor along the fast axis: std of the second difference / sqrt(6) (exact for white
  noise, nearly blind to features many pixels wide);
- line-to-line jitter: std of the difference of consecutive rows' medians;
- roughness: RMS after subtracting the least-squares plane.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nanonispy2  # noqa: E402
import numpy as np  # noqa: E402
from scipy.ndimage import gaussian_filter, maximum_filter  # noqa: E402

from stm_live.metrics import fit_plane  # noqa: E402
from stm_live.sim.frames import random_spec, simulate_frame  # noqa: E402
from stm_live.sim.surfaces import SURFACES  # noqa: E402

TWINS = {
    "Si_7x7_051.sxm": {"surface": "si111_7x7"},
    "Si_7x7_028.sxm": {"surface": "si111_7x7"},
}


def read_sxm_z(path: str | Path) -> tuple[np.ndarray, float, float]:
    """Forward Z in nm (image orientation, row 0 at the top), frame width in nm, bias in V."""
    scan = nanonispy2.read.Scan(str(path))
    z = scan.signals["Z"]["forward"].astype(np.float64) * 1e9
    if scan.header["scan_dir"] == "up":
        z = z[::-1]
    return z, float(scan.header["scan_range"][0]) * 1e9, float(scan.header["bias"])


def lattice_from_acf(z: np.ndarray, frame_nm: float, min_nm: float = 1.0, max_nm: float = 6.0) -> tuple[float, float]:
    """Mean nearest-neighbour distance (nm) over the three shortest lattice directions of the
    autocorrelation, and their max/min ratio (1 for an undistorted hexagonal lattice)."""
    px = frame_nm / z.shape[0]
    flat = z - fit_plane(z)
    flat = flat - gaussian_filter(flat, max_nm / px)
    acf = np.fft.fftshift(np.fft.ifft2(np.abs(np.fft.fft2(flat)) ** 2).real)
    centre = np.array(acf.shape) // 2
    rows, cols = np.indices(acf.shape)
    r = np.hypot(rows - centre[0], cols - centre[1]) * px
    peaks = (acf == maximum_filter(acf, size=7)) & (r > min_nm) & (r < max_nm)
    strong = peaks & (acf > 0.5 * acf[peaks].max())
    distances = np.sort(r[strong])[::2][:3]
    return float(distances.mean()), float(distances.max() / distances.min())


def spectral_peak_period_nm(z: np.ndarray, frame_nm: float, min_nm: float, max_nm: float) -> float:
    """Period (nm) of the strongest Fourier peak with period in [min, max], refined to sub-bin
    precision by a parabola through the peak and its neighbours (4x zero-padded spectrum)."""
    n = z.shape[0]
    flat = (z - fit_plane(z)) * np.outer(np.hanning(n), np.hanning(z.shape[1]))
    pad = 4 * n
    power = np.abs(np.fft.rfft2(flat, s=(pad, pad))) ** 2
    fy = np.fft.fftfreq(pad, d=frame_nm / n)[:, None]
    fx = np.fft.rfftfreq(pad, d=frame_nm / n)[None, :]
    fr = np.hypot(fx, fy)
    power = np.where((fr > 1 / max_nm) & (fr < 1 / min_nm), power, 0.0)
    i, j = np.unravel_index(np.argmax(power), power.shape)

    def vertex(a: float, b: float, c: float) -> float:
        denominator = a - 2 * b + c
        return 0.5 * (a - c) / denominator if denominator != 0 else 0.0

    di = vertex(power[i - 1, j], power[i, j], power[(i + 1) % pad, j])
    dj = vertex(power[i, j - 1], power[i, j], power[i, j + 1]) if 0 < j < power.shape[1] - 1 else 0.0
    step = 1 / (pad * frame_nm / n)
    return float(1 / np.hypot((fy[i, 0] / step + di) * step, (fx[0, j] / step + dj) * step))


def noise_floor_pm(z_nm: np.ndarray) -> float:
    second = z_nm[:, 2:] - 2 * z_nm[:, 1:-1] + z_nm[:, :-2]
    return float(np.median(np.std(second, axis=1)) / np.sqrt(6) * 1000)


def line_jitter_pm(z_nm: np.ndarray) -> float:
    return float(np.std(np.diff(np.median(z_nm, axis=1))) * 1000)


def roughness_pm(z_nm: np.ndarray) -> float:
    return float(np.std(z_nm - fit_plane(z_nm)) * 1000)


def measure(z_nm: np.ndarray, frame_nm: float) -> dict[str, float]:
    lattice, anisotropy = lattice_from_acf(z_nm, frame_nm)
    return {"lattice_nm": round(lattice, 3), "lattice_anisotropy": round(anisotropy, 3),
            "noise_floor_pm": round(noise_floor_pm(z_nm), 2),
            "line_jitter_pm": round(line_jitter_pm(z_nm), 2), "roughness_pm": round(roughness_pm(z_nm), 1)}


def radial_psd(z_nm: np.ndarray, frame_nm: float) -> tuple[np.ndarray, np.ndarray]:
    flat = z_nm - fit_plane(z_nm)
    window = np.outer(np.hanning(z_nm.shape[0]), np.hanning(z_nm.shape[1]))
    power = np.abs(np.fft.fftshift(np.fft.fft2(flat * window))) ** 2 / flat.size
    freq = np.fft.fftshift(np.fft.fftfreq(z_nm.shape[0], d=frame_nm / z_nm.shape[0]))
    fr = np.hypot(freq[None, :], freq[:, None])
    edges = np.linspace(0, freq.max(), 120)
    which = np.digitize(fr.ravel(), edges)
    psd = np.array([power.ravel()[which == i].mean() if np.any(which == i) else np.nan for i in range(1, len(edges))])
    return 0.5 * (edges[1:] + edges[:-1]), psd


def _show(ax, z: np.ndarray, title: str) -> None:
    flat = z - fit_plane(z)
    lo, hi = np.percentile(flat, [0.5, 99.5])
    ax.imshow(flat, cmap="afmhot", vmin=lo, vmax=hi)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def compare_real(real_dir: str | Path, out_dir: str | Path, seed: int = 7) -> dict[str, Any]:
    real_dir, out_dir = Path(real_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    fig, axes = plt.subplots(len(TWINS), 3, figsize=(13, 4.3 * len(TWINS)))
    for row, (name, twin) in enumerate(TWINS.items()):
        real, frame_nm, bias = read_sxm_z(real_dir / name)
        rng = np.random.default_rng([seed, row])
        spec = random_spec(rng, real.shape[0], surface=twin["surface"], scenario="good", frame_nm=frame_nm, bias_v=bias,
                           steps=False)
        sim = simulate_frame(spec, rng).forward_z_nm.astype(np.float64)
        results[name] = {"frame_nm": frame_nm, "bias_v": bias, "real": measure(real, frame_nm),
                         "simulated": measure(sim, frame_nm), "simulated_spec": spec.describe()}
        _show(axes[row, 0], real, f"real {name} ({frame_nm:.0f} nm, {bias:+.1f} V)")
        _show(axes[row, 1], sim, f"simulated si111_7x7 ({frame_nm:.0f} nm, {bias:+.1f} V)")
        for z, label in ((real, "real"), (sim, "simulated")):
            f, psd = radial_psd(z, frame_nm)
            axes[row, 2].semilogy(f, psd, label=label)
        axes[row, 2].axvline(2 / (np.sqrt(3) * 2.688), color="gray", linestyle=":", label="7x7 first order")
        axes[row, 2].set_xlabel("spatial frequency (1/nm)")
        axes[row, 2].set_ylabel("radial power (nm^2)")
        axes[row, 2].legend(fontsize=8)
    fig.tight_layout()
    figure = out_dir / "compare_si7x7.png"
    fig.savefig(figure, dpi=80)
    plt.close(fig)
    return {"figure": str(figure), "gallery": str(gallery(out_dir, seed)), "scans": results}


def gallery(out_dir: Path, seed: int = 7) -> Path:
    """Every surface with a good tip, then Si(111)-7x7 through each degraded tip scenario."""
    panels = [(name, "good") for name in SURFACES] + [("si111_7x7", s) for s in ("blunt", "multi", "unstable", "change")]
    fig, axes = plt.subplots(3, 5, figsize=(17, 10.5))
    for ax, (index, (surface, scenario)) in zip(axes.flat, enumerate(panels)):
        rng = np.random.default_rng([seed, 100 + index])
        frame_nm = 20.0 if surface == "si111_7x7" else None
        spec = random_spec(rng, 256, surface=surface, scenario=scenario, frame_nm=frame_nm,
                           bias_v=-2.0 if surface == "si111_7x7" else None)
        sim = simulate_frame(spec, rng)
        _show(ax, sim.forward_z_nm.astype(np.float64),
              f"{surface}, {scenario} tip ({spec.frame_nm:.1f} nm, {spec.bias_v:+.2f} V)")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = out_dir / "sim_gallery.png"
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path
