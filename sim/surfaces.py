"""Atomic surface models in physical units (nm), each with random orientation and offset.

Every model draws its own terraces, point defects and adsorbates where physical, adds its
apparent height to a Canvas (sim.render) and returns the ground truth: the positions of the
features an STM user would call atoms (adatoms, dimers, molecules' metal centres ...), molecule
boxes, the primary lattice constant and its 2D Bravais class.

Bias dependence (deliberately simple, stated in docs/simulator.md):
- Si(111)-7x7: filled states (V < 0) show the faulted half and corner adatoms brighter; empty
  states (V > 0) show all twelve adatoms alike.
- Si(001):H: dangling bonds are bright at both polarities, with a dark halo at V > 0.
- Cu(111)/Ag(111): the standing-wave period follows the surface-state dispersion
  k(V) = sqrt(2 m* (eV - E0)) / hbar; below the band bottom E0 there are no waves.
- molecules: the lobe pattern of each molecule turns by 90 degrees between V < 0 and V > 0
  (HOMO- versus LUMO-like contrast).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.special import j0

from stm_live.sim.render import Canvas, lattice_sites, rotation

HBAR2_OVER_2ME = 0.0381  # eV nm^2: hbar^2 / (2 m_e)


@dataclass
class Steps:
    """Parallel monatomic steps: terrace height as an analytic function of position."""

    normal: np.ndarray = field(default_factory=lambda: np.array([1.0, 0.0]))
    positions_nm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    heights_nm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    width_nm: float = 0.25

    def height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast(x, y).shape, dtype=np.float32)
        along = np.float32(self.normal[0]) * x + np.float32(self.normal[1]) * y
        for pos, h in zip(self.positions_nm, self.heights_nm):
            out += np.float32(h / 2) * (1 + np.tanh((along - np.float32(pos)) / np.float32(self.width_nm)))
        return out

    def terrace(self, xy: np.ndarray) -> np.ndarray:
        """Index of the terrace each point lies on (0 = before the first step)."""
        along = xy @ self.normal
        return (along[:, None] > self.positions_nm[None, :]).sum(axis=1)


@dataclass
class Topography:
    """A rendered surface and its ground truth, in frame coordinates (nm)."""

    name: str
    canvas: Canvas
    steps: Steps
    atoms_nm: np.ndarray
    atom_kinds: np.ndarray
    molecules_nm: np.ndarray
    molecule_kinds: np.ndarray
    lattice_nm: float
    bravais: str
    params: dict
    resolution_scale: float = 1.0  # the tip's width as this surface sees it (graphite: < 1)

    def terrace_height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.steps.height(x, y)


def _random_steps(rng: np.random.Generator, canvas: Canvas, step_nm: float, enabled: bool, max_steps: int = 2,
                  probability: float = 0.5) -> Steps:
    if not enabled or rng.random() > probability:
        return Steps()
    count = int(rng.integers(1, max_steps + 1))
    angle = rng.uniform(0, 2 * np.pi)
    normal = np.array([np.cos(angle), np.sin(angle)])
    centre = normal @ np.full(2, canvas.frame_nm / 2)
    span = canvas.frame_nm * 0.7
    positions = np.sort(centre + rng.uniform(-span / 2, span / 2, size=count))
    signs = np.ones(count) if rng.random() < 0.8 else rng.choice([-1.0, 1.0], size=count)
    return Steps(normal, positions, step_nm * signs)


def _truth(name, canvas, steps, atoms, kinds, lattice_nm, bravais, params, molecules=None, molecule_kinds=None,
           resolution_scale=1.0):
    lo, hi = 0.0, canvas.frame_nm
    atoms = np.asarray(atoms, dtype=float).reshape(-1, 2)
    inside = np.all((atoms >= lo) & (atoms < hi), axis=1)
    molecules = np.zeros((0, 4)) if molecules is None else np.asarray(molecules, dtype=float).reshape(-1, 4)
    molecule_kinds = np.zeros(0, dtype="<U16") if molecule_kinds is None else np.asarray(molecule_kinds)
    return Topography(name, canvas, steps, atoms[inside], np.asarray(kinds)[inside], molecules, molecule_kinds,
                      lattice_nm, bravais, params, resolution_scale)


def _hex_vectors(a: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    rot = rotation(angle)
    return rot @ np.array([a, 0.0]), rot @ np.array([a * 0.5, a * np.sqrt(3) / 2])


def si111_7x7(canvas: Canvas, rng: np.random.Generator, bias_v: float, steps: bool = True) -> Topography:
    """Dimer-adatom-stacking-fault model: 12 adatoms per 2.688 nm cell around dark corner holes."""
    a0 = 0.384
    angle = rng.uniform(0, np.pi / 3)
    a1, a2 = _hex_vectors(7 * a0, angle)
    u1, u2 = a1 / 7, a2 / 7
    unfaulted = [(1, 1, "corner"), (5, 1, "corner"), (1, 5, "corner"), (3, 1, "center"), (3, 3, "center"), (1, 3, "center")]
    faulted = [(6, 6, "corner"), (2, 6, "corner"), (6, 2, "corner"), (4, 6, "center"), (4, 4, "center"), (6, 4, "center")]
    filled = bias_v < 0
    heights = {("U", "corner"): 0.065, ("U", "center"): 0.035, ("F", "corner"): 0.075, ("F", "center"): 0.042} if filled \
        else {("U", "corner"): 0.060, ("U", "center"): 0.056, ("F", "corner"): 0.062, ("F", "center"): 0.058}
    basis = np.array([i * u1 + j * u2 for i, j, _ in unfaulted + faulted])
    basis_height = np.array([heights[("U", k)] for *_, k in unfaulted] + [heights[("F", k)] for *_, k in faulted])
    origin = rng.uniform(0, 1, 2) @ np.vstack([a1, a2])
    bounds = canvas.bounds_nm()
    sites, kind = lattice_sites(a1, a2, basis, origin, bounds)
    present = rng.random(len(sites)) >= rng.uniform(0.01, 0.05)
    canvas.add_points(sites[present], basis_height[kind[present]], fwhm_nm=0.55)
    holes, _ = lattice_sites(a1, a2, np.zeros((1, 2)), origin, bounds)
    canvas.add_points(holes, -0.05, fwhm_nm=0.8)
    half_centres = np.array([(7 / 3) * (u1 + u2), (14 / 3) * (u1 + u2)])
    halves, half_kind = lattice_sites(a1, a2, half_centres, origin, bounds)
    canvas.add_points(halves, np.where(half_kind == 1, 0.012 if filled else 0.003, 0.0), fwhm_nm=1.6)
    clusters = rng.uniform(*bounds, size=(rng.poisson(1.0), 2))
    canvas.add_points(clusters, rng.uniform(0.1, 0.2, len(clusters)), fwhm_nm=0.9)
    terraces = _random_steps(rng, canvas, 0.314, steps)
    return _truth("si111_7x7", canvas, terraces, sites[present], np.full(present.sum(), "adatom"), 7 * a0, "hexagonal",
                  {"angle_rad": angle, "adatom_fwhm_nm": 0.55})


def si001_h(canvas: Canvas, rng: np.random.Generator, bias_v: float, steps: bool = True) -> Topography:
    """H-terminated 2x1 dimer rows (0.768 nm apart) turning by 90 degrees at each single step."""
    a0 = 0.384
    angle = rng.uniform(0, np.pi / 2)
    terraces = _random_steps(rng, canvas, 0.136, steps, max_steps=3, probability=0.6)
    bounds = canvas.bounds_nm()
    atoms, kinds = [], []
    dimer_gap = 0.24
    for parity in (0, 1):
        rot = rotation(angle + parity * np.pi / 2)
        along, across = rot @ np.array([a0, 0.0]), rot @ np.array([0.0, 2 * a0])
        basis = np.array([-0.5 * dimer_gap * across / np.linalg.norm(across), 0.5 * dimer_gap * across / np.linalg.norm(across)])
        origin = rng.uniform(0, 1, 2) @ np.vstack([along, across])
        sites, kind = lattice_sites(along, across, basis, origin, bounds)
        dimer = np.arange(len(sites)) // 2
        on_terrace = (terraces.terrace(sites) % 2) == parity
        missing_dimers = rng.random(dimer.max() + 1 if len(dimer) else 0) < rng.uniform(0.005, 0.02)
        keep = on_terrace & ~missing_dimers[dimer]
        canvas.add_points(sites[keep], 0.06, fwhm_nm=0.32)
        centres = sites[keep & (kind == 0)] + 0.5 * dimer_gap * across / np.linalg.norm(across)
        atoms.append(centres)
        kinds.append(np.full(len(centres), "dimer"))
        db = keep & (rng.random(len(sites)) < rng.uniform(0.005, 0.02))
        canvas.add_points(sites[db], 0.12, fwhm_nm=0.6)
        if bias_v > 0:
            canvas.add_points(sites[db], -0.03, fwhm_nm=1.4)
        atoms.append(sites[db])
        kinds.append(np.full(db.sum(), "dangling_bond"))
    return _truth("si001_h", canvas, terraces, np.vstack(atoms), np.concatenate(kinds), 2 * a0, "rectangular",
                  {"angle_rad": angle})


def _herringbone(canvas: Canvas, rng: np.random.Generator, amplitude: float) -> tuple[np.ndarray, float]:
    """Pairs of 0.9 nm wide ridges every 6.34 nm, zigzagging by +-30 degrees in domains of 10-25 nm."""
    x, y = canvas.grid_nm()
    theta = rng.uniform(0, 2 * np.pi)
    u = np.cos(theta) * x + np.sin(theta) * y
    v = -np.sin(theta) * x + np.cos(theta) * y
    domain = rng.uniform(10.0, 25.0)
    phase = rng.uniform(0, 2 * domain)
    tri = np.abs(((u + phase) % (2 * domain)) - domain) - domain / 2
    period = 6.34 / np.cos(np.pi / 6)
    pair = 2.5 / np.cos(np.pi / 6)
    # One period of the two-ridge profile, tabulated, then looked up at every pixel.
    samples = 1024
    d_table = np.arange(samples) * period / samples
    table = sum(np.exp(-0.5 * ((d_table - c) / (0.9 / 2.3548)) ** 2) for c in (0.0, pair, period, pair - period, 2 * period))
    phase_v = (v - np.float32(np.tan(np.pi / 6)) * tri - np.float32(rng.uniform(0, period))) * np.float32(samples / period)
    index = phase_v.astype(np.int64) % samples
    return (amplitude * table.astype(np.float32))[index], theta


def au111(canvas: Canvas, rng: np.random.Generator, bias_v: float, steps: bool = True) -> Topography:
    """Au(111): 0.288 nm hexagonal atoms under the 22 x sqrt(3) herringbone reconstruction."""
    a = 0.288
    a1, a2 = _hex_vectors(a, rng.uniform(0, np.pi / 3))
    sites, _ = lattice_sites(a1, a2, np.zeros((1, 2)), rng.uniform(0, 1, 2) @ np.vstack([a1, a2]), canvas.bounds_nm())
    canvas.add_points(sites, 0.012, fwhm_nm=0.2)
    ridges, theta = _herringbone(canvas, rng, rng.uniform(0.015, 0.025))
    canvas.add_field(ridges)
    adsorbates = rng.uniform(*canvas.bounds_nm(), size=(rng.poisson(2.0), 2))
    canvas.add_points(adsorbates, rng.uniform(0.08, 0.15, len(adsorbates)), fwhm_nm=0.8)
    terraces = _random_steps(rng, canvas, 0.235, steps)
    return _truth("au111", canvas, terraces, sites, np.full(len(sites), "atom"), a, "hexagonal",
                  {"herringbone_angle_rad": theta})


GRAPHITE_RESOLUTION_SCALE = 0.5


def graphite(canvas: Canvas, rng: np.random.Generator, bias_v: float, steps: bool = True) -> Topography:
    """HOPG: only the beta sublattice shows, a triangular 0.246 nm lattice; sometimes a moire.

    Graphite's atomic corrugation is anomalously large: the tip's force deforms the soft layer
    (Soler et al., PRL 57, 444 (1986)), so tips that barely resolve 0.29 nm metal lattices show
    tens of pm on graphite. Halving the tip's effective width here keeps the apparent corrugation
    at 16-47 pm for every good tip instead of 2-41 pm.
    """
    a = 0.246
    a1, a2 = _hex_vectors(a, rng.uniform(0, np.pi / 3))
    sites, _ = lattice_sites(a1, a2, np.zeros((1, 2)), rng.uniform(0, 1, 2) @ np.vstack([a1, a2]), canvas.bounds_nm())
    present = rng.random(len(sites)) >= rng.uniform(0.0, 0.01)
    canvas.add_points(sites[present], rng.uniform(0.04, 0.08), fwhm_nm=0.16)
    params: dict = {}
    if rng.random() < 0.25:
        params["moire_nm"] = _add_moire(canvas, rng, a, twist_deg=rng.uniform(1.5, 6.0), amplitude=rng.uniform(0.05, 0.15))
    terraces = _random_steps(rng, canvas, 0.335, steps, max_steps=1, probability=0.3)
    return _truth("graphite", canvas, terraces, sites[present], np.full(present.sum(), "atom"), a, "hexagonal", params,
                  resolution_scale=GRAPHITE_RESOLUTION_SCALE)


def graphene(canvas: Canvas, rng: np.random.Generator, bias_v: float, steps: bool = True) -> Topography:
    """Graphene: honeycomb, both sublattices (0.142 nm C-C), with a 2.5-3.2 nm moire on a metal."""
    a = 0.246
    a1, a2 = _hex_vectors(a, rng.uniform(0, np.pi / 3))
    basis = np.array([[0.0, 0.0], (a1 + a2) / 3])
    sites, _ = lattice_sites(a1, a2, basis, rng.uniform(0, 1, 2) @ np.vstack([a1, a2]), canvas.bounds_nm())
    present = rng.random(len(sites)) >= rng.uniform(0.0, 0.005)
    canvas.add_points(sites[present], 0.03, fwhm_nm=0.13)
    moire = _add_moire(canvas, rng, a, twist_deg=rng.uniform(4.4, 5.6), amplitude=rng.uniform(0.03, 0.08))
    return _truth("graphene", canvas, Steps(), sites[present], np.full(present.sum(), "atom"), a, "hexagonal",
                  {"moire_nm": moire})


def _add_moire(canvas: Canvas, rng: np.random.Generator, a: float, twist_deg: float, amplitude: float) -> float:
    """Hexagonal superlattice of period a / (2 sin(twist / 2)) as three cosine waves."""
    period = a / (2 * np.sin(np.radians(twist_deg) / 2))
    x, y = canvas.grid_nm()
    g = 4 * np.pi / (np.sqrt(3) * period)
    phi0 = rng.uniform(0, np.pi / 3)
    shift = rng.uniform(0, period, 2)
    field_nm = np.zeros((y.size, x.size), dtype=np.float32)
    for k in range(3):
        gx, gy = g * np.cos(phi0 + 2 * np.pi * k / 3), g * np.sin(phi0 + 2 * np.pi * k / 3)
        # cos(a + b) = cos a cos b - sin a sin b: products of 1-D waves, no full-grid cosine
        ax, by = gx * (x - shift[0]), gy * (y - shift[1])
        field_nm += np.cos(by) * np.cos(ax) - np.sin(by) * np.sin(ax)
    canvas.add_field(amplitude * (field_nm + 1.5) / 4.5)
    return float(period)


SURFACE_STATES = {"cu111": (0.255, 0.208, -0.44, 0.41), "ag111": (0.289, 0.236, -0.065, 0.40)}


def surface_state_k(bias_v: float, band_bottom_ev: float, mass_ratio: float) -> float:
    """Wavevector (1/nm) of surface-state electrons at energy eV; 0 below the band bottom."""
    energy = bias_v - band_bottom_ev
    return float(np.sqrt(mass_ratio * energy / HBAR2_OVER_2ME)) if energy > 0 else 0.0


def _noble_metal(name: str) -> Callable[[Canvas, np.random.Generator, float], Topography]:
    a, step_nm, band_bottom, mass = SURFACE_STATES[name]

    def build(canvas: Canvas, rng: np.random.Generator, bias_v: float, steps: bool = True) -> Topography:
        a1, a2 = _hex_vectors(a, rng.uniform(0, np.pi / 3))
        sites, _ = lattice_sites(a1, a2, np.zeros((1, 2)), rng.uniform(0, 1, 2) @ np.vstack([a1, a2]), canvas.bounds_nm())
        canvas.add_points(sites, 0.003, fwhm_nm=0.18)
        lo, hi = canvas.bounds_nm()
        count = rng.poisson(0.03 * (hi - lo) ** 2)
        adatoms = rng.uniform(lo, hi, size=(count, 2))
        canvas.add_points(adatoms, rng.uniform(0.08, 0.12, count), fwhm_nm=0.7)
        k = surface_state_k(bias_v, band_bottom, mass)
        amplitude = rng.uniform(0.01, 0.02)
        decay = rng.uniform(5.0, 12.0)
        terraces = _random_steps(rng, canvas, step_nm, steps, max_steps=1, probability=0.3)
        if k > 0:
            kernel = canvas.radial_kernel(lambda r: np.where((r > 0.5) & (r < 5 * decay), j0(2 * k * r) * np.exp(-r / decay), 0.0))
            canvas.convolve_points(adatoms, np.full(count, amplitude), kernel)
            if len(terraces.positions_nm):
                x, y = canvas.grid_nm()
                dist = np.abs(terraces.normal[0] * x + terraces.normal[1] * y - terraces.positions_nm[0])
                canvas.add_field(-1.5 * amplitude * j0(2 * k * dist) * np.exp(-dist / decay))
        return _truth(name, canvas, terraces, adatoms, np.full(count, "adatom"), a, "hexagonal",
                      {"k_per_nm": k, "wave_period_nm": float(np.pi / k) if k else None})

    build.__name__ = name
    build.__doc__ = f"{name}: close-packed {a} nm lattice, adatoms and surface-state standing waves."
    return build


cu111 = _noble_metal("cu111")
ag111 = _noble_metal("ag111")

MOLECULAR_LATTICES = {
    "hexagonal": lambda a, r: (np.array([a, 0.0]), np.array([a / 2, a * np.sqrt(3) / 2])),
    "square": lambda a, r: (np.array([a, 0.0]), np.array([0.0, a])),
    "rectangular": lambda a, r: (np.array([a, 0.0]), np.array([0.0, a * r])),
    "centered_rectangular": lambda a, r: (np.array([a, 0.0]), np.array([a / 2, a * r / 2])),
    "oblique": lambda a, r: (np.array([a, 0.0]), np.array([a * 0.3, a * r * 0.9])),
}


def _molecule_lobes(centres: np.ndarray, orientations: np.ndarray, radius: float, lobes: int) -> np.ndarray:
    angles = orientations[:, None] + 2 * np.pi * np.arange(lobes)[None, :] / lobes
    offsets = radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    return (centres[:, None, :] + offsets).reshape(-1, 2)


def molecular_layer(canvas: Canvas, rng: np.random.Generator, bias_v: float, steps: bool = True) -> Topography:
    """A close-packed molecular monolayer on one of the five 2D Bravais lattices."""
    bravais = str(rng.choice(list(MOLECULAR_LATTICES)))
    a = rng.uniform(0.9, 1.6)
    ratio = rng.uniform(1.25, 1.6)
    a1, a2 = MOLECULAR_LATTICES[bravais](a, ratio)
    rot = rotation(rng.uniform(0, np.pi))
    a1, a2 = rot @ a1, rot @ a2
    centres, _ = lattice_sites(a1, a2, np.zeros((1, 2)), rng.uniform(0, 1, 2) @ np.vstack([a1, a2]), canvas.bounds_nm())
    present = rng.random(len(centres)) >= rng.uniform(0.005, 0.03)
    centres = centres[present]
    dim = rng.random(len(centres)) < rng.uniform(0.0, 0.1)
    height = rng.uniform(0.15, 0.3)
    canvas.add_points(centres, np.where(dim, height - 0.04, height) * 0.7, fwhm_nm=0.55 * a)
    lobes = int(rng.integers(2, 5))
    spread = rng.uniform(0.0, 0.3) if rng.random() < 0.5 else np.pi
    orientation = rng.uniform(0, 2 * np.pi) + rng.uniform(-spread, spread, len(centres))
    if bias_v > 0:
        orientation = orientation + np.pi / 2
    canvas.add_points(_molecule_lobes(centres, orientation, 0.22 * a, lobes), height * 0.3, fwhm_nm=0.25 * a)
    return _truth("molecular_layer", canvas, Steps(), centres, np.full(len(centres), "molecule"),
                  float(np.linalg.norm(a1)), bravais, {"a1_nm": a1.tolist(), "a2_nm": a2.tolist(), "lobes": lobes})


def supramolecules(canvas: Canvas, rng: np.random.Generator, bias_v: float, steps: bool = True) -> Topography:
    """Isolated ring and hexagonal assemblies of metal centres among other molecules, on Au(111)."""
    ridges, _ = _herringbone(canvas, rng, 0.015)
    canvas.add_field(ridges)
    frame = canvas.frame_nm
    placed: list[tuple[np.ndarray, float]] = []
    metals, boxes, box_kinds = [], [], []
    for _ in range(int(rng.integers(2, 8)) * 20):
        if len(placed) >= 12:
            break
        kind = "supramolecule" if rng.random() < 0.6 else "other"
        radius = rng.uniform(0.8, 2.0) if kind == "supramolecule" else rng.uniform(0.4, 1.2)
        centre = rng.uniform(radius + 0.5, frame - radius - 0.5, 2)
        if any(np.linalg.norm(centre - c) < radius + r + 0.8 for c, r in placed):
            continue
        placed.append((centre, radius))
        phase = rng.uniform(0, 2 * np.pi)
        if kind == "supramolecule":
            n = int(rng.choice([3, 4, 5, 6, 6, 6, 8]))
            angles = phase + 2 * np.pi * np.arange(n) / n
            centres = centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
            if n == 6 and rng.random() < 0.3:
                centres = np.vstack([centres, centre])
            canvas.add_points(centres, rng.uniform(0.15, 0.2), fwhm_nm=0.35)
            ring = centres[:n]
            for t in (0.33, 0.67):
                linkers = ring + t * (np.roll(ring, -1, axis=0) - ring)
                canvas.add_points(linkers, 0.07, fwhm_nm=0.45)
            metals.append(centres)
        else:
            n = int(rng.integers(1, 4))
            points = centre + np.linspace(-radius, radius, n)[:, None] * np.array([np.cos(phase), np.sin(phase)])
            canvas.add_points(points, rng.uniform(0.1, 0.2), fwhm_nm=0.7)
        pad = 0.45
        boxes.append([*(centre - radius - pad), *(centre + radius + pad)])
        box_kinds.append(kind)
    atoms = np.vstack(metals) if metals else np.zeros((0, 2))
    return _truth("supramolecules", canvas, Steps(), atoms, np.full(len(atoms), "metal"), 0.288, "hexagonal",
                  {"count": len(boxes)}, boxes, box_kinds)


SURFACES: dict[str, Callable[[Canvas, np.random.Generator, float], Topography]] = {
    "si111_7x7": si111_7x7,
    "si001_h": si001_h,
    "au111": au111,
    "graphite": graphite,
    "graphene": graphene,
    "cu111": cu111,
    "ag111": ag111,
    "molecular_layer": molecular_layer,
    "supramolecules": supramolecules,
}

# Typical frame sizes (nm) and sample bias (V) a user would choose for each surface.
FRAME_NM = {
    "si111_7x7": (8.0, 30.0), "si001_h": (5.0, 20.0), "au111": (4.0, 40.0), "graphite": (2.0, 8.0),
    "graphene": (3.0, 15.0), "cu111": (10.0, 40.0), "ag111": (15.0, 50.0), "molecular_layer": (5.0, 25.0),
    "supramolecules": (10.0, 30.0),
}
BIAS_V = {
    "si111_7x7": (-2.0, 2.0), "si001_h": (-2.0, 2.0), "au111": (-1.0, 1.0), "graphite": (-0.5, 0.5),
    "graphene": (-0.5, 0.5), "cu111": (-0.3, 0.5), "ag111": (-0.05, 0.3), "molecular_layer": (-2.0, 2.0),
    "supramolecules": (-1.5, 1.5),
}
