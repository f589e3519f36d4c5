"""Training data: shards of simulated frames with their ground truth, reproducible per seed.

Frame i of a dataset with seed S is drawn from its own generator, seeded by (S, i), so a dataset
is the same whatever the number of worker processes or the shard size. Each shard is an HDF5
file written by one worker process; the parent only collects counts.

Shard layout (`shard-00000.h5`, N frames of H x W):
    clean      (N, H, W)    float32  nm, ideal tip, no noise or scan artefacts (ground truth)
    z          (N, 2, H, W) float32  nm, recorded height, forward and backward trace
    current    (N, 2, H, W) float32  A, recorded current (feedback error + noise)
    tip_state  (N, H)       uint8    per line: 0 good, 1 blunt, 2 multi, 3 unstable, 4 changed
    events     (N, 2, H)    bool     per line and trace: an artefact was injected
    surface, frame_nm, bias_v (N,)   what was scanned
    spec       (N,)         str      JSON: every parameter of the frame (tip, scan, surface)
    atoms_xy_nm (M, 2), atoms_frame (M,), atoms_kind (M,)      ground-truth features
    molecules_box_nm (K, 4), molecules_frame (K,), molecules_kind (K,)
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from stm_live.sim.frames import SimFrame, random_spec, simulate_frame

log = logging.getLogger(__name__)


def frame_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def make_frame(seed: int, index: int, size_px: int, surface: str | None = None,
               scenario: str | None = None) -> SimFrame:
    rng = frame_rng(seed, index)
    return simulate_frame(random_spec(rng, size_px, surface=surface, scenario=scenario), rng)


def write_shard(path: Path, frames: list[SimFrame]) -> None:
    """One HDF5 shard, written under a temporary name and renamed when complete."""
    tmp = path.with_suffix(".h5.tmp")
    n, (rows, cols) = len(frames), frames[0].clean_nm.shape
    with h5py.File(tmp, "w") as h5:
        clean = h5.create_dataset("clean", (n, rows, cols), np.float32)
        z = h5.create_dataset("z", (n, 2, rows, cols), np.float32)
        current = h5.create_dataset("current", (n, 2, rows, cols), np.float32)
        for i, f in enumerate(frames):
            clean[i] = f.clean_nm
            z[i] = f.measurement.z
            current[i] = f.measurement.current
        h5.create_dataset("tip_state", data=np.stack([f.measurement.tip_state for f in frames]))
        h5.create_dataset("events", data=np.stack([f.measurement.events for f in frames]))
        h5.create_dataset("surface", data=np.array([f.spec.surface for f in frames], dtype="S"))
        h5.create_dataset("frame_nm", data=np.array([f.spec.frame_nm for f in frames]))
        h5.create_dataset("bias_v", data=np.array([f.spec.bias_v for f in frames]))
        specs = [json.dumps({**f.spec.describe(), "surface_params": f.topography.params,
                             "lattice_nm": f.topography.lattice_nm, "bravais": f.topography.bravais}, default=float)
                 for f in frames]
        h5.create_dataset("spec", data=np.array(specs, dtype=h5py.string_dtype()))
        topo = [f.topography for f in frames]
        index = [np.full(len(t.atoms_nm), i, np.int32) for i, t in enumerate(topo)]
        h5.create_dataset("atoms_xy_nm", data=np.vstack([t.atoms_nm for t in topo]).astype(np.float32))
        h5.create_dataset("atoms_frame", data=np.concatenate(index))
        h5.create_dataset("atoms_kind", data=np.concatenate([t.atom_kinds for t in topo]).astype("S"))
        index = [np.full(len(t.molecules_nm), i, np.int32) for i, t in enumerate(topo)]
        h5.create_dataset("molecules_box_nm", data=np.vstack([t.molecules_nm for t in topo]).astype(np.float32))
        h5.create_dataset("molecules_frame", data=np.concatenate(index))
        h5.create_dataset("molecules_kind", data=np.concatenate([t.molecule_kinds for t in topo]).astype("S"))
    tmp.replace(path)


def _shard_job(args: tuple) -> int:
    out, shard, start, stop, seed, size_px, surface, scenario = args
    frames = [make_frame(seed, i, size_px, surface, scenario) for i in range(start, stop)]
    write_shard(Path(out) / f"shard-{shard:05d}.h5", frames)
    return stop - start


def generate(out: str | Path, n: int, seed: int = 0, size_px: int = 256, shard_size: int = 64, workers: int = 2,
             surface: str | None = None, scenario: str | None = None,
             progress: Callable[[int], None] | None = None) -> dict:
    """Write n frames as shards under `out`; returns what was written and how fast."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), k, start, min(n, start + shard_size), seed, size_px, surface, scenario)
            for k, start in enumerate(range(0, n, shard_size))]
    started = time.perf_counter()
    done = 0
    if workers <= 1:
        results = map(_shard_job, jobs)
        for count in results:
            done += count
            if progress:
                progress(count)
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            for count in pool.imap_unordered(_shard_job, jobs):
                done += count
                if progress:
                    progress(count)
    seconds = time.perf_counter() - started
    meta = {"frames": done, "shards": len(jobs), "seed": seed, "size_px": size_px, "shard_size": shard_size,
            "surface": surface or "all", "scenario": scenario or "mixed"}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "seconds": round(seconds, 2), "frames_per_s": round(done / seconds, 1), "workers": workers}


def write_images(out: str | Path, n: int, seed: int, size_px: int = 256, scenario: str = "good") -> list[Path]:
    """Forward height traces (nm) as .npy files, one surface after another: the simulator set that
    `stm-live eval` scores reconstructions on."""
    from stm_live.sim.surfaces import SURFACES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(SURFACES)
    paths = []
    for i in range(n):
        surface = names[i % len(names)]
        frame = make_frame(seed, i, size_px, surface=surface, scenario=scenario)
        paths.append(out / f"{i:02d}_{surface}.npy")
        np.save(paths[-1], frame.forward_z_nm.astype(np.float64))
    return paths


def read_shard(path: str | Path) -> dict[str, np.ndarray]:
    """Every dataset of a shard as arrays (strings decoded)."""
    with h5py.File(path, "r") as h5:
        data = {key: h5[key][()] for key in h5}
    for key in ("surface", "atoms_kind", "molecules_kind"):
        data[key] = data[key].astype(str)
    data["spec"] = np.array([s.decode() if isinstance(s, bytes) else s for s in data["spec"]])
    return data
