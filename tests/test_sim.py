"""Physical properties of the simulator: lattices, tips, scan artefacts, data set reproducibility."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, maximum_filter
from skimage.feature import peak_local_max

from stm_live.sim import tip as tips
from stm_live.sim.compare import lattice_from_acf, spectral_peak_period_nm
from stm_live.sim.dataset import generate, make_frame, read_shard
from stm_live.sim.frames import FrameSpec, random_spec, simulate_frame
from stm_live.sim.render import Canvas
from stm_live.sim.scan import ScanSettings, TipScenario, TipSegment, _flicker, feedback, measure, random_scenario
from stm_live.sim.surfaces import SURFACES, Steps, Topography, surface_state_k
from stm_live.sim.tip import Tip

from conftest import REAL

QUIET = ScanSettings(white_noise_nm=0.0, flicker_noise_nm=0.0, feedback_period_px=2.0, feedback_damping=0.9,
                     current_noise=0.0)
HEX = np.sqrt(3) / 2


def frame(surface, frame_nm, bias_v=-1.0, seed=0, size=256, scenario="good", scan=QUIET, steps=False):
    rng = np.random.default_rng(seed)
    spec = random_spec(rng, size, surface=surface, scenario=scenario, frame_nm=frame_nm, bias_v=bias_v, steps=steps)
    spec = FrameSpec(spec.surface, spec.size_px, spec.frame_nm, spec.bias_v, spec.scenario, scan, spec.steps)
    return simulate_frame(spec, rng)


@pytest.mark.parametrize("surface, frame_nm, period_nm, band", [
    ("si111_7x7", 25.0, 2.688 * HEX, (1.5, 3.0)),
    ("si001_h", 12.0, 0.768, (0.6, 1.0)),
    ("au111", 5.0, 0.288 * HEX, (0.2, 0.3)),
    ("graphite", 6.0, 0.246 * HEX, (0.17, 0.25)),
    ("graphene", 6.0, 0.246 * HEX, (0.17, 0.25)),
])
def test_lattice_constant_from_the_fft(surface, frame_nm, period_nm, band):
    f = frame(surface, frame_nm)
    measured = spectral_peak_period_nm(f.clean_nm, frame_nm, *band)
    assert measured == pytest.approx(period_nm, rel=0.02)
    assert f.topography.lattice_nm == pytest.approx(period_nm / HEX if surface != "si001_h" else period_nm, rel=1e-6)


def test_molecular_layers_take_every_bravais_class_and_their_spacing_shows():
    seen = set()
    for seed in range(40):
        f = frame("molecular_layer", 12.0, seed=seed, size=192)
        seen.add(f.topography.bravais)
        if f.topography.bravais == "square":
            a = f.topography.lattice_nm
            assert spectral_peak_period_nm(f.clean_nm, 12.0, 0.7 * a, 1.3 * a) == pytest.approx(a, rel=0.02)
    assert seen == {"hexagonal", "square", "rectangular", "centered_rectangular", "oblique"}


@pytest.mark.parametrize("name, bias_v", [("cu111", 0.05), ("cu111", 0.3), ("ag111", 0.1)])
def test_standing_waves_follow_the_surface_state_dispersion(name, bias_v):
    f = frame(name, 30.0, bias_v=bias_v, seed=2)
    k = f.topography.params["k_per_nm"]
    assert k == pytest.approx(surface_state_k(bias_v, {"cu111": -0.44, "ag111": -0.065}[name], 0.41 if name == "cu111" else 0.40))
    period = np.pi / k
    measured = spectral_peak_period_nm(f.clean_nm - gaussian_filter(f.clean_nm, 8), 30.0, 0.6 * period, 1.6 * period)
    assert measured == pytest.approx(period, rel=0.05)


def test_no_standing_waves_below_the_band_bottom():
    f = frame("cu111", 20.0, bias_v=-0.6)
    assert f.topography.params["k_per_nm"] == 0.0 and f.topography.params["wave_period_nm"] is None


def test_si111_filled_states_show_the_faulted_half_and_corner_adatoms_brighter():
    f = frame("si111_7x7", 15.0, bias_v=-2.0)
    assert len(f.topography.atoms_nm) > 100
    canvas = Canvas(256, 15.0, 8)
    filled = SURFACES["si111_7x7"](canvas, np.random.default_rng(1), -2.0, steps=False)
    empty_canvas = Canvas(256, 15.0, 8)
    SURFACES["si111_7x7"](empty_canvas, np.random.default_rng(1), 2.0, steps=False)
    a, b = canvas.crop(canvas.image()), empty_canvas.crop(empty_canvas.image())
    sites = np.clip(np.rint(filled.atoms_nm / canvas.pixel_nm - 0.5).astype(int), 0, 255)
    spread = lambda img: np.std(img[sites[:, 1], sites[:, 0]])
    assert spread(a) > 2 * spread(b)


def test_supramolecule_metal_centres_are_where_the_truth_says():
    f = frame("supramolecules", 15.0, seed=3)
    metals = f.topography.atoms_nm
    assert len(metals) >= 3 and len(f.topography.molecules_nm) >= 2
    p = 15.0 / 256
    img = f.clean_nm
    peaks = np.argwhere((img == maximum_filter(img, size=7)) & (img > np.percentile(img, 97)))
    peak_nm = (peaks[:, ::-1] + 0.5) * p
    distances = np.min(np.linalg.norm(metals[:, None, :] - peak_nm[None, :, :], axis=2), axis=1)
    assert np.median(distances) < 0.05


def _single_bump():
    canvas = Canvas(128, 8.0, 48)
    canvas.add_points(np.array([[4.0, 4.0]]), 0.1, fwhm_nm=0.4)
    return Topography("test", canvas, Steps(), np.array([[4.0, 4.0]]), np.array(["atom"]), np.zeros((0, 4)),
                      np.zeros(0), 1.0, "hexagonal", {})


def test_multi_tip_duplicates_features_at_the_apex_offset():
    topo = _single_bump()
    offset = (1.2, -0.8)
    tip = Tip("multi", 0.03, (tips.Apex((0.0, 0.0), 1.0), tips.Apex(offset, 1.0)))
    img = topo.canvas.crop(tips.image(topo, tip))
    p = topo.canvas.pixel_nm
    peaks = peak_local_max(img, min_distance=4, threshold_abs=img.min() + 0.03)
    found = np.array(sorted(map(tuple, (peaks[:, ::-1] + 0.5) * p)))
    expected = np.array(sorted([(4.0, 4.0), (4.0 - offset[0], 4.0 - offset[1])]))
    assert found.shape == expected.shape and np.abs(found - expected).max() < 0.07


def test_weaker_apex_gives_a_weaker_ghost_and_blunt_tips_lose_resolution():
    topo = _single_bump()
    tip = Tip("multi", 0.03, (tips.Apex((0.0, 0.0), 1.0), tips.Apex((1.5, 0.0), 0.3)))
    img = topo.canvas.crop(tips.image(topo, tip))
    p = topo.canvas.pixel_nm
    main = img[int(4.0 / p), int(4.0 / p)]
    ghost = img[int(4.0 / p), int(2.5 / p)]
    assert 0 < ghost - img.min() < main - img.min()
    sharp = topo.canvas.crop(tips.image(topo, Tip("good", 0.03))).max()
    blunt = topo.canvas.crop(tips.image(topo, Tip("blunt", 0.5))).max()
    assert blunt < 0.5 * sharp


def test_every_good_tip_resolves_graphite_atoms_and_a_blunt_one_does_not():
    """Graphite's giant corrugation: even the widest good tip leaves atoms well above pixel noise."""
    def atomic_corrugation_pm(tip):
        canvas = Canvas(256, 4.0, 16)
        topo = SURFACES["graphite"](canvas, np.random.default_rng(0), 0.3, steps=False)
        img = canvas.crop(tips.image(topo, tip))
        return np.ptp(np.percentile(img - gaussian_filter(img, 8), [1, 99])) * 1000

    widest_good = atomic_corrugation_pm(Tip("good", tips.GOOD_RESOLUTION_NM[1]))
    assert widest_good > 10.0
    assert atomic_corrugation_pm(Tip("blunt", tips.BLUNT_RESOLUTION_NM[0])) < 0.3 * widest_good

def _probe(settings, seed=0):
    """A single-bump surface scanned with the given settings and a good tip."""
    topo = _single_bump()
    scenario = TipScenario("good", (TipSegment(0, Tip("good", 0.03)),))
    return measure(topo, scenario, settings, np.random.default_rng(seed)), topo


def _bump_position(img, p):
    r, c = np.unravel_index(np.argmax(img), img.shape)
    return (c + 0.5) * p, (r + 0.5) * p


def test_drift_shifts_features_by_the_set_amount():
    still, topo = _probe(QUIET)
    v = (0.02, 0.01)
    moving, _ = _probe(ScanSettings(**{**QUIET.__dict__, "drift_nm_per_s": v, "line_time_s": 0.1}))
    p = topo.canvas.pixel_nm
    x0, y0 = _bump_position(still.z[0], p)
    x1, y1 = _bump_position(moving.z[0], p)
    t = (y0 / p) * 0.1
    # a feature at true position X appears where nominal + v t = X, i.e. shifted by -v t
    assert x1 - x0 == pytest.approx(-v[0] * t, abs=1.5 * p)
    assert y1 - y0 == pytest.approx(-v[1] * t, abs=1.5 * p)


def test_creep_displacement_decays_with_time():
    p = 8.0 / 128
    shifts = []
    for tau in (10.0, 2.0):
        settings = ScanSettings(**{**QUIET.__dict__, "creep_nm": (0.5, 0.0), "creep_tau_s": tau, "line_time_s": 0.2})
        m, _ = _probe(settings)
        shifts.append(_bump_position(m.z[0], p)[0] - 4.0)
    t = (4.0 / p) * 0.2
    assert shifts[0] == pytest.approx(-0.5 * np.exp(-t / 10.0), abs=1.5 * p)
    assert abs(shifts[1]) < p


def test_backward_trace_is_offset_by_the_hysteresis():
    m, topo = _probe(ScanSettings(**{**QUIET.__dict__, "hysteresis_nm": 0.3}))
    p = topo.canvas.pixel_nm
    assert _bump_position(m.z[0], p)[0] - _bump_position(m.z[1], p)[0] == pytest.approx(0.3, abs=1.5 * p)


def test_fraction_of_misaligned_lines_is_as_set_and_lines_really_move():
    f = frame("si111_7x7", 20.0, scan=ScanSettings(**{**QUIET.__dict__, "misalign_probability": 0.3,
                                                        "misalign_sigma_px": 2.0}), size=256)
    shifts = f.measurement.shift_px
    assert np.mean(shifts != 0) == pytest.approx(0.3, abs=0.08)
    reference = frame("si111_7x7", 20.0, size=256).measurement.z[0]
    row = int(np.argmax(np.abs(shifts)))
    lags = range(-6, 7)
    errors = [np.abs(np.roll(reference[row], -lag)[8:-8] - f.measurement.z[0, row, 8:-8]).mean() for lag in lags]
    assert list(lags)[int(np.argmin(errors))] == pytest.approx(shifts[row], abs=1.0)


def test_feedback_rings_after_a_step_and_keeps_its_level():
    step = np.zeros((1, 200))
    step[0, 100:] = 1.0
    out = feedback(step, period_px=8.0, damping=0.2)
    assert out[0, 100:130].max() > 1.3
    assert out[0, -1] == pytest.approx(1.0, abs=0.01) and abs(out[0, :100]).max() < 1e-9


def test_flicker_noise_is_one_over_f():
    series = _flicker(2**16, np.random.default_rng(0))
    power = np.abs(np.fft.rfft(series)) ** 2
    f = np.fft.rfftfreq(series.size)
    band = (f > 1e-3) & (f < 2e-2)
    slope = np.polyfit(np.log(f[band]), np.log(power[band]), 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.25)


def test_random_tip_change_scenarios_are_well_formed():
    for seed in range(20):
        scenario = random_scenario("change", 128, np.random.default_rng(seed))
        before, after = scenario.segments
        assert before.start == 0 and 128 // 5 <= after.start < 4 * 128 // 5
        assert 0.05 <= abs(after.height_step_nm) <= 0.3 and 1 <= after.streak_lines <= 4


def test_tip_change_leaves_a_step_streaks_and_new_labels():
    change = TipSegment(50, Tip("blunt", 0.4), height_step_nm=-0.2, streak_lines=3)
    scenario = TipScenario("change", (TipSegment(0, Tip("good", 0.05)), change))
    spec = random_spec(np.random.default_rng(4), 128, surface="si111_7x7", scenario="good", frame_nm=10.0, steps=False)
    spec = FrameSpec(spec.surface, 128, 10.0, -1.0, scenario, QUIET, False)
    f = simulate_frame(spec, np.random.default_rng(5))
    state = f.measurement.tip_state
    rows = np.arange(128)
    changed = rows[state == tips.STATE_CODE["changed"]]
    assert changed.tolist() == list(range(change.start, change.start + change.streak_lines))
    assert (state[:change.start] == tips.STATE_CODE["good"]).all()
    assert (state[change.start + change.streak_lines:] == tips.STATE_CODE[change.tip.state]).all()
    offset = f.measurement.z[0] - f.clean_nm
    before = np.median(offset[:change.start])
    after = np.median(offset[change.start + change.streak_lines:])
    assert after - before == pytest.approx(change.height_step_nm, abs=0.03)
    assert f.measurement.events[:, changed].all()


def test_unstable_tip_marks_about_the_set_fraction_of_lines():
    rng = np.random.default_rng(6)
    scenario = TipScenario("unstable", (TipSegment(0, Tip("good", 0.05), unstable=True),), 0.3)
    spec = FrameSpec("au111", 256, 10.0, 0.5, scenario, QUIET, False)
    f = simulate_frame(spec, rng)
    assert (f.measurement.tip_state == tips.STATE_CODE["unstable"]).all()
    assert f.measurement.events.mean() == pytest.approx(0.3, abs=0.06)
    roughness = np.abs(np.diff(f.measurement.z[0], axis=1)).mean(axis=1)
    events = f.measurement.events[0]
    assert roughness[events].mean() > 2 * roughness[~events].mean()


def test_current_channel_shows_the_feedback_error():
    spec = random_spec(np.random.default_rng(7), 128, surface="si111_7x7", scenario="good", frame_nm=10.0, steps=False)
    slow = ScanSettings(**{**QUIET.__dict__, "feedback_period_px": 12.0, "feedback_damping": 0.5})
    f = simulate_frame(FrameSpec(spec.surface, 128, 10.0, -1.0, spec.scenario, slow, False), np.random.default_rng(7))
    error = np.log(f.measurement.current[0] / slow.setpoint_a)
    assert error.std() > 0.05
    assert np.corrcoef(error[:, 1:].ravel(), np.diff(f.measurement.z[0], axis=1).ravel())[0, 1] > 0.3


def test_dataset_is_deterministic_per_seed_and_independent_of_workers(tmp_path):
    a = generate(tmp_path / "a", 6, seed=11, size_px=64, shard_size=4, workers=1)
    b = generate(tmp_path / "b", 6, seed=11, size_px=64, shard_size=3, workers=2)
    generate(tmp_path / "c", 6, seed=12, size_px=64, shard_size=6, workers=1)
    assert a["frames"] == b["frames"] == 6
    join = lambda d, key: np.concatenate([read_shard(p)[key] for p in sorted((tmp_path / d).glob("shard-*.h5"))])
    for key in ("clean", "z", "current", "tip_state", "events", "frame_nm", "surface"):
        assert np.array_equal(join("a", key), join("b", key)), key
    assert not np.array_equal(join("a", "z"), join("c", "z"))
    shard = read_shard(tmp_path / "a" / "shard-00000.h5")
    assert shard["z"].shape == (4, 2, 64, 64) and shard["tip_state"].shape == (4, 64)
    assert (shard["atoms_frame"] < 4).all() and len(shard["spec"]) == 4
    assert np.array_equal(make_frame(11, 0, 64).measurement.z, shard["z"][0])


def test_acf_lattice_reports_distortion():
    f = frame("si111_7x7", 25.0, scan=ScanSettings(**{**QUIET.__dict__, "calibration": (1.1, 1.0, 0.0)}))
    lattice, anisotropy = lattice_from_acf(f.measurement.z[0].astype(float), 25.0)
    assert anisotropy > 1.04
    clean_lattice, clean_anisotropy = lattice_from_acf(f.clean_nm.astype(float), 25.0)
    assert clean_lattice == pytest.approx(2.688, rel=0.03) and clean_anisotropy < 1.03


def test_white_noise_floor_is_as_set():
    noisy = ScanSettings(**{**QUIET.__dict__, "white_noise_nm": 0.003})
    f = frame("cu111", 30.0, bias_v=-0.6, scan=noisy, seed=8)
    second = np.diff(f.measurement.z[0].astype(float), n=2, axis=1)
    assert np.median(np.std(second, axis=1)) / np.sqrt(6) == pytest.approx(0.003, rel=0.1)


@pytest.mark.parametrize("surface, height", [("si111_7x7", 0.314), ("au111", 0.235), ("graphite", 0.335)])
def test_terraces_step_by_the_monatomic_height(surface, height):
    for seed in range(30):
        f = frame(surface, 12.0, seed=seed, steps=True)
        steps = f.topography.steps
        if len(steps.positions_nm) == 1:
            break
    else:
        pytest.fail("no single-step frame drawn")
    p = 12.0 / 256
    centres = (np.arange(256) + 0.5) * p
    along = steps.normal[0] * centres[None, :] + steps.normal[1] * centres[:, None]
    below = f.clean_nm[along < steps.positions_nm[0] - 1.0]
    above = f.clean_nm[along > steps.positions_nm[0] + 1.0]
    assert abs(np.median(above) - np.median(below)) == pytest.approx(height, rel=0.08)




@pytest.mark.skipif(not (REAL / "Si_7x7_051.sxm").exists(), reason="real scans not found at ../shared/data/real")
def test_compare_real_measures_both_and_draws_the_figure(tmp_path):
    from stm_live.sim.compare import compare_real

    result = compare_real(REAL, tmp_path)
    assert (tmp_path / "compare_si7x7.png").stat().st_size > 10_000
    real = result["scans"]["Si_7x7_051.sxm"]["real"]
    simulated = result["scans"]["Si_7x7_051.sxm"]["simulated"]
    assert 2.5 < real["lattice_nm"] < 4.5 and simulated["lattice_nm"] == pytest.approx(2.688, rel=0.08)
    assert 0.2 < real["noise_floor_pm"] < 10 and 0.2 < simulated["noise_floor_pm"] < 10
