"""`stm-live eval locate` and `stm-live locate FILE`: atom positions, lattices, drift and
molecules against truth.

Simulator frames carry the true atom positions. They are scanned here with noise, 1/f noise and
feedback ringing but without drift, creep or calibration error, because those move the image
away from the truth by amounts no single-frame method can know (drift is scored on its own, on
pairs of successive frames of one area). Atoms are matched to the truth
one to one (Hungarian assignment) within 0.3 nearest-neighbour distances; atoms closer than one
spacing to the frame edge are not scored. The atom spacing handed to the peak finder is the
surface's nearest-neighbour distance, as a user sets it for a known sample.

Methods compared on the same sparse scan, with a reference:
- `full`: maxima (sub-pixel) of the complete scan, every row measured: what the scan itself
  resolves, the ceiling for any method that sees a quarter of it;
- `raw`: local maxima of the measured rows alone, at pixel centres (the plain peak finder);
- `raw_refined`: the same maxima with sub-pixel refinement;
- `single`: maxima of one reconstruction by the engine;
- `locmap`: the localization map's pooled atoms from N stochastic reconstructions;
- `locmap_fb`: the atoms of the forward and backward traces' maps with the measured offset
  between the traces removed: pairs averaged, lone atoms moved back by half the offset (which
  cancels the feedback loop's lag along the fast-scan direction).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from stm_live.engines import Reconstructor, reconstruct_exact
from stm_live.localize.crops import crop_atoms, in_box
from stm_live.localize.lattice import LatticeError, analyze_lattice, reduce_basis
from stm_live.localize.locmap import Atoms, LocalizationMap, combine_traces, localization_map
from stm_live.localize.peaks import Peaks, dominant_spacing_nm, find_peaks, nearest_neighbour_nm
from stm_live.machine import machine
from stm_live.plans import parse_plan

if TYPE_CHECKING:
    from stm_live.sim.frames import SimFrame

log = logging.getLogger(__name__)

ATOM_SURFACES = {"si111_7x7": ((10.0, 16.0), 1.5), "graphite": ((3.0, 5.0), 0.3),
                 "molecular_layer": ((10.0, 20.0), -1.5)}
METHODS = ("full", "raw", "raw_refined", "single", "locmap", "locmap_fb")


def match(found: np.ndarray, truth: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs (indices into found, truth) closer than `radius`, total distance minimal."""
    if len(found) == 0 or len(truth) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    distance = np.linalg.norm(found[:, None] - truth[None], axis=-1)
    cost = np.where(distance <= radius, distance, 1e9)
    rows, cols = linear_sum_assignment(cost)
    keep = cost[rows, cols] < 1e9
    return rows[keep], cols[keep]


def sparse_peaks(image: np.ndarray, mask: np.ndarray, pixel_nm: float, spacing_nm: float, refine: bool) -> Peaks:
    """Maxima of the measured rows alone (evenly spaced rows, as a `lines:k` plan scans them)."""
    rows = np.flatnonzero(mask.any(axis=1))
    step = int(np.median(np.diff(rows))) if rows.size > 1 else 1
    found = find_peaks(image[rows], (step * pixel_nm, pixel_nm), spacing_nm, refine=refine)
    return Peaks(found.x_nm, found.y_nm + (rows[0] + 0.5 - 0.5 * step) * pixel_nm, found.height)


def truth_frame(surface: str, rng: np.random.Generator, size: int) -> SimFrame:
    """A simulated frame whose image positions are its true positions: noise and feedback ringing,
    no drift, creep or calibration error."""
    from stm_live.sim.frames import FrameSpec, simulate_frame
    from stm_live.sim.scan import ScanSettings, random_scenario

    frame_range, bias = ATOM_SURFACES.get(surface, ((10.0, 20.0), -1.5))
    frame_nm = float(rng.uniform(*frame_range))
    settings = ScanSettings(white_noise_nm=float(rng.uniform(0.001, 0.004)),
                            flicker_noise_nm=float(rng.uniform(0.0, 0.003)),
                            feedback_period_px=float(rng.uniform(3.0, 8.0)),
                            feedback_damping=float(rng.uniform(0.5, 0.9)))
    spec = FrameSpec(surface, size, frame_nm, bias, random_scenario("good", size, rng, frame_nm), settings,
                     steps=False)
    return simulate_frame(spec, rng)


class _Tally:
    def __init__(self) -> None:
        self.found = self.truth = self.matched = 0
        self.errors: dict[tuple[int, int], float] = {}  # (frame, true atom) -> error (nm)

    def add(self, xy: np.ndarray, truth: np.ndarray, radius: float) -> np.ndarray:
        i, j = match(xy, truth, radius)
        frame = self.truth  # true atoms tallied so far: names this frame alike in every method's tally
        self.found += len(xy)
        self.truth += len(truth)
        self.matched += len(i)
        error = np.linalg.norm(xy[i] - truth[j], axis=1)
        self.errors.update({(frame, int(t)): float(e) for t, e in zip(j, error)})
        return error

    def rms_pm(self, keys: set[tuple[int, int]] | None = None) -> float | None:
        errors = np.array([e for k, e in self.errors.items() if keys is None or k in keys])
        return round(1000 * float(np.sqrt(np.mean(errors**2))), 2) if errors.size else None

    def summary(self) -> dict[str, Any]:
        return {"precision": round(self.matched / max(1, self.found), 4),
                "recall": round(self.matched / max(1, self.truth), 4),
                "rms_error_pm": self.rms_pm(), "atoms_true": self.truth, "atoms_found": self.found}


def _calibration(stated: np.ndarray, actual: np.ndarray) -> dict[str, float | None]:
    """Stated precision (1 sigma per axis) against the actual position error (a 2-D distance,
    whose median is 1.18 sigma when the stated sigma is right), medians in pm."""
    if not stated.size:
        return {"median_stated_sigma_pm": None, "median_actual_error_pm": None, "actual_over_expected": None}
    sigma, error = float(np.median(stated)), float(np.median(actual))
    return {"median_stated_sigma_pm": round(1000 * sigma, 2), "median_actual_error_pm": round(1000 * error, 2),
            "actual_over_expected": round(error / (1.1774 * sigma), 2) if sigma > 0 else None}


def evaluate_atoms(engine: Reconstructor, frames: int, samples: int, plan: str, size: int,
                   rng: np.random.Generator) -> dict[str, Any]:
    """Per surface and method: precision, recall and RMS position error over `frames` frames."""
    results: dict[str, Any] = {}
    for surface in ATOM_SURFACES:
        tallies = {m: _Tally() for m in METHODS}
        stated: dict[str, list[np.ndarray]] = {"locmap": [], "locmap_fb": []}
        actual: dict[str, list[np.ndarray]] = {"locmap": [], "locmap_fb": []}
        seconds = []
        for _ in range(frames):
            frame = truth_frame(surface, rng, size)
            pixel = frame.topography.canvas.pixel_nm
            truth_all = frame.topography.atoms_nm
            spacing = nearest_neighbour_nm(truth_all)
            image = frame.forward_z_nm.astype(np.float32)
            mask = parse_plan(plan).mask(size, size)
            edge = (spacing, frame.topography.canvas.frame_nm - spacing)

            def inside(xy: np.ndarray, edge: tuple[float, float] = edge) -> np.ndarray:
                return np.all((xy >= edge[0]) & (xy < edge[1]), axis=1)

            truth = truth_all[inside(truth_all)]
            radius = 0.3 * spacing
            measured = np.where(mask, image, np.nan).astype(np.float32)
            single = reconstruct_exact(engine, measured[None], mask[None]).images[0]
            started = time.perf_counter()
            locmap = localization_map(engine, measured, mask, pixel, spacing, samples, rng)
            seconds.append(time.perf_counter() - started)
            backward = np.where(mask, frame.measurement.z[1], np.nan).astype(np.float32)
            both, _ = combine_traces(locmap.atoms, localization_map(engine, backward, mask, pixel, spacing, samples,
                                                                    rng).atoms, spacing)
            candidates = {
                "full": find_peaks(image, pixel, spacing).xy_nm,
                "raw": sparse_peaks(image, mask, pixel, spacing, refine=False).xy_nm,
                "raw_refined": sparse_peaks(image, mask, pixel, spacing, refine=True).xy_nm,
                "single": find_peaks(single, pixel, spacing).xy_nm,
            }
            for method, xy in candidates.items():
                tallies[method].add(xy[inside(xy)], truth, radius)
            for method, found in (("locmap", locmap.atoms), ("locmap_fb", both)):
                atoms = inside(found.xy_nm)
                error = tallies[method].add(found.xy_nm[atoms], truth, radius)
                i, _ = match(found.xy_nm[atoms], truth, radius)
                stated[method].append(found.precision_nm[atoms][i])
                actual[method].append(error)
        results[surface] = {
            "methods": {m: t.summary() for m, t in tallies.items()},
            "locmap_seconds_per_frame": round(float(np.mean(seconds)), 3),
            "stated_vs_actual": {m: _calibration(np.concatenate(stated[m]), np.concatenate(actual[m]))
                                 for m in ("locmap", "locmap_fb")},
        }
        methods = results[surface]["methods"]
        raw = methods["raw"]["rms_error_pm"]
        results[surface]["rms_reduction_vs_raw"] = {
            m: round(raw / methods[m]["rms_error_pm"], 2) if raw and methods[m]["rms_error_pm"] else None
            for m in ("locmap", "locmap_fb")}
        reductions = {}
        for m in ("locmap", "locmap_fb"):
            common = set(tallies["raw"].errors) & set(tallies[m].errors)
            ours, theirs = tallies[m].rms_pm(common), tallies["raw"].rms_pm(common)
            reductions[m] = round(theirs / ours, 2) if ours and theirs else None
        results[surface]["rms_reduction_vs_raw_same_atoms"] = reductions
        log.info("%s: %s", surface, results[surface])
    return results


def evaluate_lattices(engine: Reconstructor, frames: int, plan: str, size: int,
                      rng: np.random.Generator) -> dict[str, Any]:
    """Molecular layers on all five Bravais lattices: class accuracy and lattice-constant error."""
    errors, correct, failed = [], 0, 0
    confusion: dict[str, dict[str, int]] = {}
    for _ in range(frames):
        frame = truth_frame("molecular_layer", rng, size)
        topo = frame.topography
        true_a, true_b = reduce_basis(np.asarray(topo.params["a1_nm"]), np.asarray(topo.params["a2_nm"]))
        mask = parse_plan(plan).mask(size, size)
        image = reconstruct_exact(engine, np.where(mask, frame.forward_z_nm, np.nan)[None].astype(np.float32),
                                  mask[None]).images[0]
        try:
            lattice = analyze_lattice(image, topo.canvas.pixel_nm)
        except LatticeError:
            failed += 1
            confusion.setdefault(topo.bravais, {}).setdefault("none", 0)
            confusion[topo.bravais]["none"] += 1
            continue
        la, lb = lattice.lengths_nm
        errors.append(max(abs(la - np.linalg.norm(true_a)) / np.linalg.norm(true_a),
                          abs(lb - np.linalg.norm(true_b)) / np.linalg.norm(true_b)))
        correct += lattice.bravais == topo.bravais
        row = confusion.setdefault(topo.bravais, {})
        row[lattice.bravais] = row.get(lattice.bravais, 0) + 1
    errors_pct = 100 * np.asarray(errors)
    return {
        "frames": frames, "no_lattice_found": failed, "class_accuracy": round(correct / frames, 4),
        "confusion": confusion,
        "lattice_error_pct": {"median": round(float(np.median(errors_pct)), 3),
                              "p90": round(float(np.percentile(errors_pct, 90)), 3),
                              "max": round(float(errors_pct.max()), 3),
                              "within_1pct": round(float(np.mean(errors_pct <= 1.0)), 4)} if errors else None,
    }


def evaluate_molecule_atoms(engine: Reconstructor, frames: int, samples: int, plan: str, size: int,
                            rng: np.random.Generator) -> dict[str, Any]:
    """Supramolecules among other molecules: for each detected one, the localized metal atoms
    inside its box against the true ones (precision, recall, RMS error, the molecule's own
    spacing), from the whole frame's map and from its 4x super-resolved crop (`crops.crop_atoms`)."""
    from stm_live.localize.molecules import MoleculeDetector

    detector = MoleculeDetector()
    ways = ("frame_map", "crop_sr4")
    tallies = {way: _Tally() for way in ways}
    spacing_errors: dict[str, list[float]] = {way: [] for way in ways}
    molecules_seen = 0
    for _ in range(frames):
        frame = truth_frame("supramolecules", rng, size)
        pixel = frame.topography.canvas.pixel_nm
        truth = frame.topography.atoms_nm
        mask = parse_plan(plan).mask(size, size)
        measured = np.where(mask, frame.forward_z_nm, np.nan).astype(np.float32)
        spacing = nearest_neighbour_nm(truth)
        whole = localization_map(engine, measured, mask, pixel, spacing, samples, rng).atoms
        image = reconstruct_exact(engine, measured[None], mask[None]).images[0]
        for box in detector.detect(image, pixel).boxes_nm:
            molecules_seen += 1
            inside = truth[in_box(truth, box)]
            for way, atoms in (("frame_map", whole),
                               ("crop_sr4", crop_atoms(engine, image, pixel, box, spacing, samples, rng))):
                xy = atoms.xy_nm[in_box(atoms.xy_nm, box)]
                tallies[way].add(xy, inside, 0.3 * spacing)
                if len(xy) >= 2 and len(inside) >= 2:
                    true_spacing = nearest_neighbour_nm(inside)
                    spacing_errors[way].append(abs(nearest_neighbour_nm(xy) - true_spacing) / true_spacing)
    result: dict[str, Any] = {"frames": frames, "molecules": molecules_seen}
    for way in ways:
        spacing_pct = 100 * np.asarray(spacing_errors[way])
        result[way] = {**tallies[way].summary(),
                       "spacing_error_pct": {"median": round(float(np.median(spacing_pct)), 2),
                                             "p90": round(float(np.percentile(spacing_pct, 90)), 2)}
                       if spacing_pct.size else None}
    return result


DRIFT_SURFACES = ("si111_7x7", "graphite", "au111", "molecular_layer", "si001_h")


def evaluate_drift(engine: Reconstructor, sequences: int, plan: str, size: int,
                   rng: np.random.Generator) -> dict[str, Any]:
    """Pairs of successive frames of one area with random drift: the estimated content shift
    against the true one (-v times the frame period), per surface. No creep and no calibration
    error, so that the true shift is exactly the drift's; noise, feedback, hysteresis and line
    misalignment as drawn for training."""
    from stm_live.sim.frames import random_spec, simulate_sequence

    from stm_live.localize.drift import frame_shift

    results: dict[str, Any] = {}
    for surface in DRIFT_SURFACES:
        errors, shifts, missed = [], [], 0
        for _ in range(sequences):
            spec = random_spec(rng, size, surface=surface, scenario="good", steps=False)
            spec = replace(spec, scan=replace(spec.scan, creep_nm=(0.0, 0.0), calibration=(1.0, 1.0, 0.0)))
            mask = parse_plan(plan).mask(size, size)
            images = [reconstruct_exact(engine, np.where(mask, frame.forward_z_nm, np.nan)[None].astype(np.float32),
                                        mask[None]).images[0] for frame in simulate_sequence(spec, rng, 2)]
            pixel = spec.frame_nm / size
            truth = -np.asarray(spec.scan.drift_nm_per_s) * size * spec.scan.line_time_s
            found = frame_shift(images[0], images[1], (spec.frame_nm, spec.frame_nm),
                                dominant_spacing_nm(images[0], pixel))
            shifts.append(np.hypot(*truth) / pixel)
            if found is None:
                missed += 1
                continue
            errors.append(np.hypot(*(np.asarray(found) - truth)) / pixel)
        error_px = np.asarray(errors)
        results[surface] = {
            "pairs": sequences, "no_estimate": missed,
            "true_shift_px": {"median": round(float(np.median(shifts)), 2), "max": round(float(np.max(shifts)), 2)},
            "error_px": {"median": round(float(np.median(error_px)), 3),
                         "p90": round(float(np.percentile(error_px, 90)), 3),
                         "max": round(float(error_px.max()), 3),
                         "within_1px": round(float(np.mean(error_px <= 1.0)), 3)} if error_px.size else None,
        }
        log.info("drift %s: %s", surface, results[surface])
    return results


def evaluate(engine: Reconstructor, frames: int = 6, lattice_frames: int = 50, samples: int = 32,
             plan: str = "lines:4", size: int = 256, seed: int = 0, plot: str | None = None,
             plot_surface: str = "si111_7x7", molecule_frames: int = 100, drift_pairs: int = 20,
             molecule_atom_frames: int = 10) -> dict[str, Any]:
    from stm_live.localize.molecules import MoleculeDetector, evaluate_detector

    if plot:
        plot_simulated(engine, plot_surface, plot, samples, plan, size, seed)
    rng = np.random.default_rng(seed)
    detector = MoleculeDetector()
    return {"plan": plan, "size_px": size, "samples": samples, "engine": engine.name, "seed": seed,
            "machine": machine(),
            "atoms": evaluate_atoms(engine, frames, samples, plan, size, rng),
            "lattice": evaluate_lattices(engine, lattice_frames, plan, size, rng),
            "drift": evaluate_drift(engine, drift_pairs, plan, size, rng),
            "molecule_atoms": evaluate_molecule_atoms(engine, molecule_atom_frames, samples, plan, size, rng),
            "molecules": [evaluate_detector(detector, molecule_frames, seed + 20_000, p) for p in ("full", plan)]}


def plot_simulated(engine: Reconstructor, surface: str, path: str, samples: int = 32, plan: str = "lines:4",
                   size: int = 256, seed: int = 0) -> None:
    """The figure of `stm-live locate` for one simulator frame, with the true atoms marked."""
    from stm_live.localize.figures import plot_locate

    rng = np.random.default_rng(seed)
    frame = truth_frame(surface, rng, size)
    truth = frame.topography.atoms_nm
    spacing = nearest_neighbour_nm(truth)
    pixel = frame.topography.canvas.pixel_nm
    mask = parse_plan(plan).mask(size, size)
    measured = np.where(mask, frame.forward_z_nm, np.nan).astype(np.float32)
    locmap = localization_map(engine, measured, mask, pixel, spacing, samples, rng)
    image = reconstruct_exact(engine, measured[None], mask[None]).images[0]
    try:
        lattice = analyze_lattice(image, pixel).describe()
    except LatticeError as exc:
        lattice = {"error": str(exc)}
    from stm_live.localize.molecules import MoleculeDetector

    molecules = MoleculeDetector().detect(image, pixel)
    report = {"file": f"simulated {surface} ({frame.topography.canvas.frame_nm:.1f} nm)", "plan": plan,
              "engine": engine.name, "pixel_nm": pixel, "lattice": lattice,
              "molecules": [{"box_nm": box.tolist()} for box in molecules.boxes_nm]}
    plot_locate(report, locmap, image, mask, path, truth_nm=truth)


def _molecule_report(box: np.ndarray, score: float, atoms: Atoms) -> dict[str, Any]:
    """A detected molecule: its box, score, the localized atoms inside and their median
    nearest-neighbour distance (the molecule's own atom spacing; None below two atoms)."""
    inside = in_box(atoms.xy_nm, box)
    xy = atoms.xy_nm[inside]
    spacing = nearest_neighbour_nm(xy) if len(xy) >= 2 else None
    return {"box_nm": [round(float(v), 3) for v in box], "score": round(float(score), 3), "atoms": int(inside.sum()),
            "atom_spacing_nm": None if spacing is None else round(spacing, 4)}


def locate_file(path: str | Path, engine: Reconstructor, plan: str = "full", spacing_nm: float | None = None,
                samples: int = 32, seed: int = 0, crops: bool = False,
                ) -> tuple[dict[str, Any], LocalizationMap, np.ndarray, np.ndarray]:
    """Atoms and lattice of a recorded scan's forward height channel, scanned through `plan`;
    each detected molecule's atoms from the frame's map or, with `crops`, from its own 4x
    super-resolved crop (`crops.crop_atoms`)."""
    from stm_live.evaluation import load_height
    from stm_live.drivers.scanfiles import read_scan_file

    scan = read_scan_file(path)
    height = load_height(path)
    finite = np.isfinite(height).all(axis=1)
    height = height[finite]
    pixel = scan.size_nm[0] / height.shape[1]
    mask = parse_plan(plan).mask(*height.shape)
    spacing = spacing_nm or dominant_spacing_nm(height, pixel)
    measured = np.where(mask, height, np.nan).astype(np.float32)
    rng = np.random.default_rng(seed)
    locmap = localization_map(engine, measured, mask, pixel, spacing, samples, rng)
    image = reconstruct_exact(engine, measured[None], mask[None]).images[0] if not mask.all() else height
    try:
        lattice = analyze_lattice(image, pixel).describe()
    except LatticeError as exc:
        lattice = {"error": str(exc)}
    from stm_live.localize.molecules import MoleculeDetector

    molecules = MoleculeDetector().detect(image, pixel)
    atoms = locmap.atoms
    report = {
        "file": str(path), "plan": plan, "engine": engine.name, "samples": samples, "pixel_nm": pixel,
        "spacing_nm": round(spacing, 4), "spacing_source": "given" if spacing_nm else "dominant Fourier period",
        "lattice": lattice, "atom_count": len(atoms), "inferred": True,
        "atoms": [{"x_nm": round(float(x), 4), "y_nm": round(float(y), 4), "height": float(h),
                   "precision_nm": round(float(p), 5), "support": int(s)}
                  for x, y, h, p, s in zip(atoms.x_nm, atoms.y_nm, atoms.height, atoms.precision_nm, atoms.support)],
        "molecule_atoms_from": "4x super-resolved crop" if crops else "frame map",
        "molecules": [_molecule_report(box, score, crop_atoms(engine, image, pixel, box, spacing, samples, rng)
                                       if crops else atoms)
                      for box, score in zip(molecules.boxes_nm, molecules.scores)],
    }
    return report, locmap, image, mask
