"""Atoms, localization maps and lattices: synthetic lattices with known positions, simulator
frames with ground truth, a real scan, the wire message, and the daemon publishing maps."""

import json
import subprocess
import sys
from dataclasses import replace

import msgpack
import numpy as np
import pytest
import zmq

from stm_live.engines.classical import ClassicalReconstructor
from stm_live.localize.drift import DriftTracker, frame_shift
from stm_live.localize.evaluation import evaluate, evaluate_drift, match, sparse_peaks
from stm_live.localize.lattice import LatticeError, analyze_lattice, classify
from stm_live.localize.molecules import GRID_NM, STRIDE, MoleculeDetector, decode, evaluate_detector, iou
from stm_live.localize.locmap import Atoms, combine_traces, localization_map, stochastic_reconstructions
from stm_live.localize.peaks import dominant_spacing_nm, find_peaks, pixel_noise
from stm_live.plans import parse_plan
from stm_live.protocol import Decoder, LocMap, ProtocolError, encode

from conftest import REAL, Harness, scan_start

LATTICES = {
    "hexagonal": ((1.0, 0.0), (0.5, np.sqrt(3) / 2)),
    "square": ((1.0, 0.0), (0.0, 1.0)),
    "rectangular": ((1.0, 0.0), (0.0, 1.4)),
    "centered_rectangular": ((1.0, 0.0), (0.5, 0.7)),
    "oblique": ((1.0, 0.0), (0.3, 1.25)),
}


def lattice_frame(kind="hexagonal", size=128, frame_nm=12.0, a_nm=1.0, angle=0.4, noise=0.0, seed=0):
    """Gaussian atoms on a rotated lattice; returns the image and the atom positions (nm)."""
    rng = np.random.default_rng(seed)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    a1, a2 = (rot @ (a_nm * np.asarray(v)) for v in LATTICES[kind])
    n = int(3 * frame_nm / a_nm)
    ij = np.stack(np.meshgrid(np.arange(-n, n), np.arange(-n, n)), -1).reshape(-1, 2)
    sites = ij @ np.stack([a1, a2]) + rng.uniform(0, 1, 2) @ np.stack([a1, a2])
    sites = sites[np.all((sites > -a_nm) & (sites < frame_nm + a_nm), axis=1)]
    pixel = frame_nm / size
    axis = (np.arange(size) + 0.5) * pixel
    x, y = np.meshgrid(axis, axis)
    sigma = 0.18 * a_nm
    image = np.zeros((size, size))
    for sx, sy in sites:
        image += np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / (2 * sigma**2))
    image += noise * rng.standard_normal(image.shape)
    return image.astype(np.float32), sites, pixel


def interior(xy, frame_nm, edge):
    return xy[np.all((xy >= edge) & (xy < frame_nm - edge), axis=1)]


def test_peaks_are_found_to_a_small_fraction_of_a_pixel():
    image, sites, pixel = lattice_frame(size=160, noise=0.0)
    found = find_peaks(image, pixel, 1.0)
    truth = interior(sites, 12.0, 1.0)
    i, j = match(interior(found.xy_nm, 12.0, 1.0), truth, 0.3)
    assert len(j) == len(truth)
    error = np.linalg.norm(interior(found.xy_nm, 12.0, 1.0)[i] - truth[j], axis=1)
    assert np.sqrt(np.mean(error**2)) < 0.05 * pixel


def test_peaks_on_non_square_pixels_land_in_physical_units():
    image, sites, pixel = lattice_frame(size=160)
    mask = parse_plan("lines:4").mask(160, 160)
    refined = sparse_peaks(image, mask, pixel, 1.0, refine=True)
    plain = sparse_peaks(image, mask, pixel, 1.0, refine=False)
    truth = interior(sites, 12.0, 1.0)
    errors = {}
    for name, found in (("refined", refined), ("plain", plain)):
        xy = interior(found.xy_nm, 12.0, 1.0)
        i, j = match(xy, truth, 0.3)
        assert len(j) >= 0.95 * len(truth)
        errors[name] = np.sqrt(np.mean(np.sum((xy[i] - truth[j]) ** 2, axis=1)))
    assert errors["refined"] < 0.5 * errors["plain"] and errors["plain"] < 2.5 * pixel


def test_noise_level_and_spacing_are_measured_from_the_frame():
    image, _, pixel = lattice_frame(size=192, a_nm=0.8, noise=0.02, seed=3)
    noise_only = 0.02 * np.random.default_rng(0).standard_normal((128, 128))
    assert pixel_noise(noise_only) == pytest.approx(0.02, rel=0.05)
    assert 0.02 <= pixel_noise(image) < 0.03, "atoms 2 px wide add some curvature: an upper bound"
    assert dominant_spacing_nm(image, pixel) == pytest.approx(0.8, rel=0.05)
    with pytest.raises(ValueError):
        dominant_spacing_nm(np.zeros((8, 8)), 0.1)


def test_localization_map_pools_reconstructions_without_touching_the_measurement():
    image, sites, pixel = lattice_frame(size=128, noise=0.03, seed=1)
    mask = parse_plan("lines:4").mask(128, 128)
    measured = np.where(mask, image, np.nan).astype(np.float32)
    before = measured.copy()
    result = localization_map(ClassicalReconstructor(), measured, mask, pixel, 1.0, 12, np.random.default_rng(0))
    assert np.array_equal(measured, before, equal_nan=True)
    atoms, truth = result.atoms, interior(sites, 12.0, 1.0)
    xy = interior(atoms.xy_nm, 12.0, 1.0)
    i, j = match(xy, truth, 0.3)
    assert len(j) >= 0.95 * len(truth) and len(i) >= 0.95 * len(xy)
    assert atoms.samples == 12 and atoms.support.max() <= 12 and atoms.support.min() >= 6
    assert np.all(atoms.precision_nm > 0) and np.median(atoms.precision_nm) < 0.1
    assert result.density.shape == (256, 256) and result.density_pixel_nm == pytest.approx(pixel / 2)
    per_atom = result.density.sum() * 1.0 / len(atoms)
    assert 0.8 < per_atom < 1.3, "each atom found in (nearly) every reconstruction integrates to about 1"


def test_stochastic_reconstructions_vary_where_nothing_was_measured():
    image, _, pixel = lattice_frame(size=192, noise=0.02, seed=2)
    mask = parse_plan("lines:4").mask(192, 192)
    samples = stochastic_reconstructions(ClassicalReconstructor(), image, mask, 6, 1.0, pixel,
                                         np.random.default_rng(0))
    assert samples.shape == (6, 192, 192)
    spread = samples[:, mask].std(axis=0, ddof=1).mean()
    assert 0.02 < spread < 0.03, "measured pixels vary by about the scan's own noise"
    assert samples[:, ~mask].std(axis=0).mean() > 0


def test_a_model_with_uncertainty_adds_its_own_spread():
    from stm_live.engines.registry import create_engine

    model = create_engine("model")
    image, _, pixel = lattice_frame(size=64, noise=0.02, seed=2)
    mask = parse_plan("lines:4").mask(64, 64)
    samples = stochastic_reconstructions(model, image, mask, 4, 1.0, pixel, np.random.default_rng(0))
    gaps = samples[:, ~mask & np.isfinite(samples[0])]
    assert np.isfinite(gaps).all() and gaps.std(axis=0).mean() > 0


@pytest.mark.parametrize("lag", [0.03, 0.2])
def test_forward_and_backward_atoms_pair_up_and_the_lag_cancels(lag):
    """A lag of 0.2 nm each way puts the traces' atoms 0.4 nm apart: beyond the pairing radius
    (0.3 of the 1 nm spacing) until the measured offset is removed."""
    truth = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 2.0]])
    one = lambda shift, extra: Atoms(np.r_[truth[:, 0] + shift, extra], np.r_[truth[:, 1], 5.0], np.ones(4),
                                     np.full(4, 0.004), np.array([16, 15, 14, 9]), 16)
    both, offset = combine_traces(one(lag, 7.0), one(-lag, 8.0), 1.0)
    assert np.allclose(offset, [2 * lag, 0.0])
    assert len(both) == 5 and np.allclose(np.sort(both.xy_nm[:3], axis=0), truth)
    assert np.allclose(both.xy_nm[3:], [[7.0 - lag, 5.0], [8.0 + lag, 5.0]]), "lone atoms move back by the lag"
    assert np.allclose(both.precision_nm, [0.004 / np.sqrt(2)] * 3 + [0.004] * 2), "traces agree: bootstrap only"
    assert both.support.tolist() == [16, 15, 14, 9, 9]
    wobbly = one(-lag, 8.0)
    wobbly = Atoms(wobbly.x_nm + np.array([0.0, 0.0, 0.06, 0.0]), *(getattr(wobbly, c) for c in
                   ("y_nm", "height", "precision_nm", "support")), 16)
    precision = combine_traces(one(lag, 7.0), wobbly, 1.0)[0].precision_nm
    assert precision[2] == pytest.approx(np.hypot(0.004 / np.sqrt(2), 0.06 / (2 * np.sqrt(2))), rel=1e-3), \
        "traces that disagree on an atom say so in its precision"


def test_a_super_resolved_crop_keeps_atoms_where_they_are():
    """The crop's samples keep their physical positions on the 4x finer grid: no offset."""
    from stm_live.localize.crops import crop_atoms

    image, sites, pixel = lattice_frame(size=64, frame_nm=12.0, noise=0.02, seed=3)
    box = np.array([3.0, 3.0, 9.0, 9.0])
    atoms = crop_atoms(ClassicalReconstructor(), image, pixel, box, 1.0, 8, np.random.default_rng(0))
    truth = sites[(sites[:, 0] >= 3) & (sites[:, 0] < 9) & (sites[:, 1] >= 3) & (sites[:, 1] < 9)]
    i, j = match(atoms.xy_nm, truth, 0.3)
    assert len(i) == len(truth) == len(atoms)
    offset = atoms.xy_nm[i] - truth[j]
    assert np.abs(offset.mean(axis=0)).max() < 0.005 and np.sqrt((offset**2).sum(axis=1).mean()) < 0.02


def test_drift_between_successive_simulated_frames_of_one_area():
    """Si(111)-7x7 rescanned with drift and every other artefact but creep and miscalibration:
    most pairs get an estimate, typically a fraction of a pixel off and never far."""
    result = evaluate_drift(ClassicalReconstructor(), 6, "full", 192, np.random.default_rng(3))["si111_7x7"]
    assert result["no_estimate"] <= 3
    assert result["error_px"]["median"] <= 0.5 and result["error_px"]["max"] <= 1.5


def test_drift_is_not_claimed_between_unrelated_frames_or_a_moved_window():
    first, _, _ = lattice_frame(size=128, frame_nm=12.0, noise=0.05, seed=1)
    other = np.random.default_rng(2).standard_normal((128, 128)).astype(np.float32)
    assert frame_shift(first, other, (12.0, 12.0), 1.0) is None
    blobs = np.zeros((256, 256), np.float32)
    rng = np.random.default_rng(4)
    for r, c in rng.integers(0, 256, (40, 2)):
        blobs[r, c] = 1.0
    from scipy import ndimage

    blobs = ndimage.gaussian_filter(blobs, 4)
    shifted = np.roll(blobs, (3, -5), axis=(0, 1))
    dx, dy = frame_shift(blobs[32:224, 32:224], shifted[32:224, 32:224], (19.2, 19.2), 0.5)
    assert (dx, dy) == (pytest.approx(-0.5, abs=0.02), pytest.approx(0.3, abs=0.02))
    moved = np.roll(blobs, (80, 0), axis=(0, 1))
    assert frame_shift(blobs[32:224, 32:224], moved[32:224, 32:224], (19.2, 19.2), 0.5) is None

    tracker = DriftTracker()
    assert tracker.update(("Z", "forward"), blobs[32:224, 32:224], (19.2, 19.2), 100.0, 0.5) is None
    drift = tracker.update(("Z", "forward"), shifted[32:224, 32:224], (19.2, 19.2), 150.0, 0.5)
    assert drift.velocity_nm_s == (pytest.approx(-0.01, abs=1e-3), pytest.approx(0.006, abs=1e-3))
    assert tracker.update(("Z", "forward"), shifted[32:224, 32:224], (20.0, 20.0), 200.0, 0.5) is None, \
        "a new frame size is a new area"


@pytest.mark.parametrize("kind", list(LATTICES))
def test_lattice_vectors_and_class_of_each_bravais_lattice(kind):
    image, _, pixel = lattice_frame(kind, size=192, frame_nm=14.0, a_nm=1.1, noise=0.05, seed=4)
    lattice = analyze_lattice(image, pixel)
    assert lattice.bravais == kind
    expected = sorted(np.linalg.norm(1.1 * np.asarray(v)) for v in LATTICES[kind])
    if kind == "centered_rectangular":  # the reduced cell of a centred lattice is the rhombus
        expected = [np.linalg.norm(1.1 * np.asarray(LATTICES[kind][1]))] * 2
    assert sorted(lattice.lengths_nm) == pytest.approx(expected, rel=0.01)


def test_stripes_and_noise_are_not_lattices():
    rng = np.random.default_rng(0)
    x = np.arange(128)
    stripes = np.sin(2 * np.pi * x / 9.0)[None, :].repeat(128, axis=0)
    for image in (stripes + 0.01 * rng.standard_normal((128, 128)), rng.standard_normal((128, 128))):
        with pytest.raises(LatticeError):
            analyze_lattice(image, 0.1)


def test_classify_tolerates_measurement_error_but_not_distortion():
    assert classify(np.array([1.0, 0.0]), np.array([0.51, 0.86])) == "hexagonal"
    assert classify(np.array([1.0, 0.0]), np.array([0.7, 0.9])) == "oblique"


def test_simulator_evaluation_runs_and_the_map_beats_plain_peaks_on_molecules():
    result = evaluate(ClassicalReconstructor(), frames=1, lattice_frames=5, samples=4, size=192, seed=1,
                      molecule_frames=2, drift_pairs=2, molecule_atom_frames=1)
    molecules = result["atoms"]["molecular_layer"]
    assert molecules["methods"]["locmap"]["recall"] >= 0.9
    assert molecules["rms_reduction_vs_raw"]["locmap"] > 1.5
    assert molecules["methods"]["locmap_fb"]["rms_error_pm"] < molecules["methods"]["locmap"]["rms_error_pm"]
    assert result["lattice"]["class_accuracy"] >= 0.8
    assert set(result["atoms"]) == {"si111_7x7", "graphite", "molecular_layer"}
    assert set(result["drift"]) == {"si111_7x7", "graphite", "au111", "molecular_layer", "si001_h"}
    assert result["molecule_atoms"]["frame_map"]["atoms_true"] > 0
    assert set(result["molecule_atoms"]) == {"frames", "molecules", "frame_map", "crop_sr4"}


def test_locmap_message_round_trips_and_is_checked():
    density = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    for count in (0, 7):
        atoms = np.arange(5 * count, dtype=np.float64).reshape(5, count)
        molecules = np.ones((5, count // 2))
        motion = {"drift_x_nm_s": 0.01, "drift_y_nm_s": -0.02} if count else {}
        msg = LocMap("scan-1", "Z", "forward", "classical", 16, 0.77, 0.077, 0.05, "hexagonal",
                     {"a_nm": 2.688, "b_nm": 2.688, "angle_deg": 120.0}, 0.4, 1.0, density, atoms, molecules, motion)
        back = Decoder().decode(encode(msg))
        assert isinstance(back, LocMap) and back.atoms.shape == (5, count) and back.bravais == "hexagonal"
        assert back.motion == motion
        assert np.array_equal(back.density, density) and back.lattice["a_nm"] == 2.688
        assert back.molecules.shape == (5, count // 2)
    frames = encode(msg)
    bad = LocMap("scan-1", "Z", "forward", "classical", 16, 0.77, 0.077, 0.05, "none",
                 {"a_nm": 1.0, "b_nm": 1.0, "angle_deg": 90.0}, 0.4, 1.0, density, atoms, molecules)
    with pytest.raises(ProtocolError):
        Decoder().decode(encode(bad))
    with pytest.raises(ProtocolError, match="whole pairs"):
        Decoder().decode(encode(replace(msg, motion={"drift_x_nm_s": 0.1})))
    with pytest.raises(ProtocolError):
        Decoder().decode([*frames[:3], np.zeros((4, 7)), frames[4]])


def test_daemon_publishes_a_localization_map_of_every_final_height_frame(settings):
    settings.localize.samples_cpu = 6
    settings.localize.spacing_nm = 1.0
    settings.localize.molecules = True
    context = zmq.Context()
    harness = Harness(settings, context).start()
    try:
        image, sites, pixel = lattice_frame(size=96, frame_nm=9.0, noise=0.02, seed=5)
        start = scan_start("lattice", rows=96, cols=96, plan="lines:2", directions=("forward", "backward"))
        start = type(start)(**{**start.__dict__, "size_nm": (9.0, 9.0)})
        pub = harness.publisher
        pub.scan_start(start)
        for row in range(0, 96, 2):
            pub.line("lattice", row, "forward", start.channels, [image[row], image[row] * 0])
            pub.line("lattice", row, "backward", start.channels, [image[row], image[row] * 0])
        pub.scan_end("lattice")
        maps = lambda: {m.direction: m for m in harness.listener.messages if isinstance(m, LocMap)}
        harness.listener.until(lambda ms: len(maps()) == 3, timeout=60, what="forward, backward and both maps")
        locmap = maps()["forward"]
        assert (locmap.uid, locmap.channel, locmap.samples) == ("lattice", "Z", 6)
        assert np.allclose(maps()["both"].atoms[:2].mean(axis=1), locmap.atoms[:2].mean(axis=1), atol=0.2)
        assert locmap.method == "classical" and locmap.bravais == "hexagonal"
        assert locmap.molecules.shape[0] == 5, "detection ran (a bare lattice holds no supramolecule)"
        assert locmap.lattice["a_nm"] == pytest.approx(1.0, rel=0.02)
        xy = interior(locmap.atoms[:2].T, 9.0, 1.0)
        truth = interior(sites, 9.0, 1.0)
        i, j = match(xy, truth, 0.3)
        assert len(j) >= 0.9 * len(truth) and len(i) >= 0.9 * len(xy)
        assert set(maps()["both"].motion) == {"trace_offset_x_nm", "trace_offset_y_nm"}
        assert np.hypot(maps()["both"].motion["trace_offset_x_nm"], maps()["both"].motion["trace_offset_y_nm"]) < 0.05
        status = harness.status_after(lambda s: s.counters["locmaps_published"] == 3)
        assert status.counters["locmap_errors"] == 0
    finally:
        harness.stop()
        context.destroy(linger=0)


def test_daemon_measures_drift_between_rescans_of_one_area(settings):
    """The same 12 nm area scanned twice 20 s apart, its content 0.4 nm right and 0.25 nm up the
    second time: the second forward map carries the drift, the first none."""
    settings.localize.samples_cpu = 4
    settings.localize.spacing_nm = 1.0
    settings.localize.directions = ["forward"]
    context = zmq.Context()
    harness = Harness(settings, context).start()
    try:
        from scipy import ndimage

        area, _, pixel = lattice_frame(size=160, frame_nm=15.0, noise=0.02, seed=6)
        rng = np.random.default_rng(7)
        clusters = np.zeros_like(area)
        clusters[tuple(rng.integers(0, 160, (2, 12)))] = 60.0
        area = area + ndimage.gaussian_filter(clusters, 3.0)
        pub = harness.publisher
        for uid, t, (dr, dc) in (("first", 1000.0, (0, 0)), ("second", 1020.0, (-2, 4))):
            frame = np.roll(area, (dr, dc), axis=(0, 1))[16:144, 16:144]
            start = scan_start(uid, rows=128, cols=128, plan="lines:2")
            pub.scan_start(replace(start, size_nm=(128 * pixel, 128 * pixel), t=t))
            for row in range(0, 128, 2):
                pub.line(uid, row, "forward", start.channels, [frame[row], frame[row] * 0])
            pub.scan_end(uid)
        maps = lambda: {m.uid: m for m in harness.listener.messages if isinstance(m, LocMap)}
        harness.listener.until(lambda ms: len(maps()) == 2, timeout=60, what="two forward maps")
        assert maps()["first"].motion == {}
        motion = maps()["second"].motion
        assert motion["drift_x_nm_s"] == pytest.approx(4 * pixel / 20, abs=0.1 * pixel)
        assert motion["drift_y_nm_s"] == pytest.approx(-2 * pixel / 20, abs=0.1 * pixel)
    finally:
        harness.stop()
        context.destroy(linger=0)


@pytest.mark.skipif(not (REAL / "Si_7x7_051.sxm").exists(), reason="needs ../shared/data/real")
def test_locate_a_real_scan_from_the_command_line(tmp_path):
    out, plot = tmp_path / "atoms.json", tmp_path / "atoms.png"
    subprocess.run([sys.executable, "-m", "stm_live", "locate", str(REAL / "Si_7x7_051.sxm"), "--plan", "lines:4",
                    "--spacing", "0.67", "--samples", "4", "--json", str(out), "--plot", str(plot)],
                   check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["inferred"] and report["plan"] == "lines:4" and report["spacing_source"] == "given"
    lattice = report["lattice"]
    cell_nm2 = lattice["a_nm"] * lattice["b_nm"] * np.sin(np.radians(lattice["angle_deg"]))
    expected = 12 * 20.0 * 20.0 / cell_nm2  # twelve adatoms per 7x7 cell, in this scan's own (drifted) cell
    assert 0.6 * expected < report["atom_count"] < 1.1 * expected
    assert all(a["support"] >= 2 for a in report["atoms"]) and plot.stat().st_size > 10_000
    assert isinstance(report["molecules"], list)


def test_boxes_overlap_and_heatmap_maxima_become_boxes():
    a = np.array([[0.0, 0.0, 2.0, 2.0]])
    b = np.array([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 2.0, 2.0]])
    assert iou(a, b)[0] == pytest.approx([1 / 7, 0.0, 1.0])
    out = np.full((2, 20, 20), -10.0)
    out[0, 5, 8], out[1, 5, 8] = 5.0, 1.2
    found = decode(out, 0.4, 8.0, 8.0)
    centre = ((8 + 0.5) * GRID_NM * STRIDE, (5 + 0.5) * GRID_NM * STRIDE)
    assert len(found) == 1 and found.boxes_nm[0] == pytest.approx(
        [centre[0] - 1.2, centre[1] - 1.2, centre[0] + 1.2, centre[1] + 1.2])


def test_the_shipped_detector_finds_supramolecules_among_other_molecules():
    result = evaluate_detector(MoleculeDetector(), frames=8, seed=123, plan="lines:4")
    assert result["supramolecules"] > 20
    assert result["precision"] >= 0.85 and result["recall"] >= 0.85


def test_daemon_localizes_molecules_on_their_crops_when_asked(settings):
    """A simulated supramolecule scene streamed through the daemon; `stm-live crops` asks for its
    molecules: the map comes back with their atoms, each inside its own box. Bad requests are
    refused with a reason and counted; the daemon keeps serving."""
    from stm_live.localize.evaluation import truth_frame
    from stm_live.localize.peaks import nearest_neighbour_nm
    from stm_live.localize.requests import REQUEST_VERSION, request_crops
    from stm_live.demo import free_tcp_endpoint

    frame = truth_frame("supramolecules", np.random.default_rng(3), 160)
    size_nm = frame.topography.canvas.frame_nm
    image = frame.forward_z_nm.astype(np.float32) * 1e-9
    settings.localize.samples_cpu = 4
    settings.localize.spacing_nm = nearest_neighbour_nm(frame.topography.atoms_nm)
    settings.localize.directions = ["forward"]
    settings.localize.molecules = True
    settings.localize.requests = free_tcp_endpoint()
    settings.localize.crop_factor = 8  # a crop may span 128 px of this 160 px frame
    context = zmq.Context()
    harness = Harness(settings, context).start()
    try:
        endpoint = settings.localize.requests
        refused = request_crops(endpoint, "Z")
        assert refused["outcome"] == "refused" and "no localization map" in refused["detail"]
        start = scan_start("scene", rows=160, cols=160)
        harness.publisher.scan_start(replace(start, size_nm=(size_nm, size_nm)))
        for row in range(160):
            harness.publisher.line("scene", row, "forward", start.channels, [image[row], image[row] * 0])
        harness.publisher.scan_end("scene")
        maps = lambda: [m for m in harness.listener.messages if isinstance(m, LocMap)]
        harness.listener.until(lambda ms: len(maps()) == 1, timeout=60, what="the frame's map")
        first = maps()[0]
        assert first.molecules.shape[1] >= 1 and first.molecule_atoms.shape == (6, 0)

        command = subprocess.run([sys.executable, "-m", "stm_live", "crops", "--connect", endpoint, "--channel", "Z"],
                                 capture_output=True, text=True, timeout=60)
        assert command.returncode == 0, command.stderr
        queued = json.loads(command.stdout)
        assert queued["outcome"] == "queued" and queued["uid"] == "scene"
        assert queued["boxes"] == min(first.molecules.shape[1], settings.localize.max_crops)
        harness.listener.until(lambda ms: len(maps()) == 2, timeout=60, what="the map with crop atoms")
        again = maps()[1]
        assert again.uid == "scene" and np.array_equal(again.atoms, first.atoms)
        atoms = again.molecule_atoms
        assert atoms.shape[0] == 6 and atoms.shape[1] >= queued["boxes"]
        boxes = again.molecules[:4].T[atoms[5].astype(int)]
        x, y = atoms[0], atoms[1]
        assert np.all((x >= boxes[:, 0]) & (x < boxes[:, 2]) & (y >= boxes[:, 1]) & (y < boxes[:, 3]))
        found, _ = match(atoms[:2].T, frame.topography.atoms_nm, 0.3 * settings.localize.spacing_nm)
        assert len(found) >= 0.8 * atoms.shape[1], "the crop atoms are the true metal centres"

        outside = request_crops(endpoint, "Z", boxes_nm=[[size_nm + 1, 0, size_nm + 2, 1]])
        assert outside["outcome"] == "refused" and "outside" in outside["detail"]
        assert request_crops(endpoint, "Current", "backward")["outcome"] == "refused"
        whole = request_crops(endpoint, "Z", boxes_nm=[[0, 0, size_nm, size_nm]])
        assert whole["outcome"] == "refused" and "crops are for molecules" in whole["detail"]
        raw = context.socket(zmq.REQ)
        raw.connect(endpoint)
        raw.send(b"\xc1 not msgpack")
        assert raw.poll(5000) and b"refused" in raw.recv()
        raw.send(msgpack.packb({"v": REQUEST_VERSION, "channel": "Z", "boxes_nm": [[1, 1, 0, 0]]}))
        assert raw.poll(5000) and b"x1 > x0" in raw.recv()
        raw.close()
        status = harness.status_after(lambda s: s.counters["crop_requests"] == 7)
        assert status.counters["crop_requests_refused"] == 6 and status.counters["crop_maps_published"] == 1
    finally:
        harness.stop()
        context.destroy(linger=0)
