"""Tip monitor: physical features, the state machine, the shipped classifier, conditioning policy."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from stm_live.config import ConditioningSettings
from stm_live.protocol import TIP_STATES
from stm_live.tip import features
from stm_live.tip.classifier import CLEARLY_GOOD, WINDOW_ROWS, TipClassifier, window_image, window_of_rows
from stm_live.tip.conditioning import ConditioningPolicy
from stm_live.tip.episodes import rescan_windows, simulate_scans, simulate_sequence, windows
from stm_live.tip.evaluation import auroc, evaluate_tip, monitor_scan_file, stream
from stm_live.tip.features import FEATURE_NAMES, features_of, prepare_row
from stm_live.tip.monitor import TipMonitor, TipStateMachine
from stm_live.tip.training import epoch_batches

from conftest import REAL

F = {name: i for i, name in enumerate(FEATURE_NAMES)}


@pytest.fixture(scope="module")
def classifier():
    return TipClassifier()


def row_features(forward, backward, previous, pixel_nm):
    """Features of a row (`previous`: the forward trace scanned before it), as the monitor reads them."""
    return features_of(prepare_row(forward, backward), None if previous is None else prepare_row(previous), pixel_nm)


def lattice_line(rng, n=256, period_px=8.0, noise=0.002):
    x = np.arange(n)
    return 0.05 * np.cos(2 * np.pi * x / period_px + rng.uniform(0, 6)) + noise * rng.standard_normal(n)


# -- features ----------------------------------------------------------------------------------

def test_features_read_what_a_user_sees():
    rng = np.random.default_rng(0)
    line = lattice_line(rng)
    calm = row_features(line, line.copy(), line.copy(), 0.05)
    assert calm[F["disagreement"]] == pytest.approx(0.0, abs=1e-6)
    assert calm[F["row_correlation"]] == pytest.approx(1.0)

    jumped = row_features(line + 0.3, line + 0.3, line, 0.05)
    assert jumped[F["step"]] > calm[F["step"]] + 1.0

    spiky = line.copy()
    spiky[100:103] += 0.4
    assert row_features(spiky, None, None, 0.05)[F["spikes"]] > calm[F["spikes"]] + 1.0

    noisy = line + 0.1 * rng.standard_normal(line.size)
    assert row_features(noisy, None, None, 0.05)[F["roughness"]] > calm[F["roughness"]] + 0.5
    assert row_features(noisy, None, None, 0.05)[F["hf_fraction"]] > calm[F["hf_fraction"]]

    blurred = ndimage.gaussian_filter1d(rng.standard_normal(256), 6.0)
    sharp = ndimage.gaussian_filter1d(rng.standard_normal(256), 1.0)
    assert row_features(blurred, None, None, 0.05)[F["width_nm"]] > row_features(sharp, None, None, 0.05)[F["width_nm"]]

    other = lattice_line(rng)
    assert row_features(line, other, None, 0.05)[F["disagreement"]] > 0.5
    assert row_features(line, None, other, 0.05)[F["row_correlation"]] < 0.9


def test_the_monitor_reads_rows_prepared_once_as_training_read_them():
    """The monitor detrends each row once, on arrival, and builds its windows from those rows;
    training builds windows and features from whole arrays. Both give the network the same input."""
    sequence = simulate_sequence(4242, 2, 96, scenario="multi", stride=1)
    span = slice(10, 10 + WINDOW_ROWS)
    rows = [prepare_row(f, b) for f, b in zip(sequence.forward[span], sequence.backward[span])]
    expected = window_image(sequence.forward[span], sequence.backward[span])
    assert window_of_rows(rows).dtype == np.float32
    np.testing.assert_allclose(window_of_rows(rows), expected, rtol=1e-6, atol=1e-6)
    one_direction = [prepare_row(f) for f in sequence.forward[span]]
    np.testing.assert_allclose(window_of_rows(one_direction), window_image(sequence.forward[span], sequence.forward[span]),
                               rtol=1e-6, atol=1e-6)
    trained = sequence.features()[span][1:]
    read = [features_of(row, previous, sequence.pixel_nm) for previous, row in zip(rows, rows[1:])]
    np.testing.assert_allclose(read, trained, rtol=1e-5, atol=1e-6)


def _reference_kernels(line, noise):
    """The compiled kernels' quantities in plain NumPy / SciPy, as features.py computed them before."""
    def acf(values):
        spectrum = np.fft.rfft(values, 2 * values.size)
        out = np.fft.irfft(spectrum * np.conj(spectrum))[: values.size // 2]
        return out / (out[0] + 1e-6)
    spectrum = np.abs(np.fft.rfft(line)) ** 2
    power = spectrum[1:]
    k = int(np.argmax(power))
    period = 0.0 if power[k] < 25 * np.median(power) + 1e-6 else line.size / (k + 1)
    gradient_acf = acf(np.diff(line))
    peaks = np.flatnonzero((gradient_acf[1:-1] > gradient_acf[:-2]) & (gradient_acf[1:-1] >= gradient_acf[2:])) + 1
    peaks = peaks[peaks > 2]
    if period:
        ratio = peaks / period
        peaks = peaks[(np.abs(ratio - np.round(ratio)) > 0.15) | (ratio < 0.5)]
    ghost = max(float(gradient_acf[peaks].max()) if peaks.size else 0.0, 0.0)
    residual = np.abs(line - ndimage.median_filter(line, size=5, mode="nearest"))
    spikes = residual.max() / (1.4826 * np.median(residual) + 0.1 * noise + 1e-6)
    return spectrum, acf(line), gradient_acf, period, ghost, spikes


@pytest.mark.parametrize("n", [512, 256, 255, 17])
def test_compiled_feature_kernels_compute_their_numpy_definitions(n):
    rng = np.random.default_rng(n)
    x = np.arange(n)
    lines = [lattice_line(rng, n), rng.standard_normal(n), np.zeros(n),
             np.cos(2 * np.pi * x / 9) + 0.7 * np.cos(2 * np.pi * (x - 5) / 9) + 0.3 * (x == n // 2)]
    for line in lines:
        spectrum, acf, gradient_acf, period, ghost, spikes = _reference_kernels(line, 0.01)
        got = features._spectra(line)
        for mine, theirs in zip(got, (spectrum, acf, gradient_acf)):
            np.testing.assert_allclose(mine, theirs, rtol=1e-9, atol=1e-9)
        assert features._period_px(got[0], n) == pytest.approx(period)
        assert features._ghost(got[2], period) == pytest.approx(ghost, abs=1e-12)
        assert features._spike_ratio(line, 0.01) == pytest.approx(spikes)


def test_ghost_feature_sees_a_second_apex():
    rng = np.random.default_rng(1)
    x = np.arange(512)
    centres = rng.choice(np.arange(20, 490), 12, replace=False)
    single = sum(np.exp(-0.5 * ((x - c) / 2.0) ** 2) for c in centres)
    double = single + 0.8 * sum(np.exp(-0.5 * ((x - c - 13) / 2.0) ** 2) for c in centres)
    assert row_features(double, None, None, 0.05)[F["ghost"]] > row_features(single, None, None, 0.05)[F["ghost"]] + 0.2


# -- state machine -----------------------------------------------------------------------------

def probabilities(**named):
    p = np.array([named.get(s, 0.0) for s in TIP_STATES])
    return p / p.sum()


def test_one_noisy_window_raises_nothing():
    machine = TipStateMachine(TIP_STATES, enter=0.7, confirm=2, smoothing=1.0)
    assert machine.update(probabilities(good=0.05, blunt=0.95)) is None
    assert machine.update(probabilities(good=0.95, blunt=0.05)) is None
    assert machine.state == "good"


def test_degradation_needs_confirmation_and_recovery_needs_more():
    machine = TipStateMachine(TIP_STATES, enter=0.7, confirm=2, clear=3, smoothing=1.0)
    bad = probabilities(good=0.1, multi=0.8, blunt=0.1)
    assert machine.update(bad) is None
    assert machine.update(bad) == "multi"
    assert machine.update(probabilities(good=0.5, multi=0.5)) is None  # between leave and enter: stays
    fine = probabilities(good=0.95, multi=0.05)
    assert [machine.update(fine) for _ in range(3)] == [None, None, "good"]


def test_a_tip_change_is_announced_from_one_window_and_restarts_the_belief():
    machine = TipStateMachine(TIP_STATES, enter=0.7, confirm=2, smoothing=0.2)
    for _ in range(10):
        machine.update(probabilities(good=0.97, blunt=0.03))
    assert machine.update(probabilities(good=0.1, changed=0.9)) == "changed"
    assert machine.belief[TIP_STATES.index("changed")] > 0.8
    assert machine.update(probabilities(good=0.05, blunt=0.9, changed=0.05)) is None
    assert machine.update(probabilities(good=0.05, blunt=0.9, changed=0.05)) == "blunt"


def test_one_kind_alone_near_certain_leaves_good_below_the_degraded_bar():
    """P(degraded) 0.93 is under `enter`; spread over two kinds it raises nothing, on one kind
    (0.91, over `kind_enter`) it raises that kind after the usual confirmation."""
    spread = probabilities(good=0.07, blunt=0.46, multi=0.47)
    one_kind = probabilities(good=0.07, blunt=0.02, multi=0.91)
    machine = TipStateMachine(TIP_STATES, enter=0.95, confirm=2, smoothing=1.0, kind_enter=0.9)
    assert [machine.update(spread) for _ in range(4)] == [None] * 4
    assert [machine.update(one_kind) for _ in range(2)] == [None, "multi"]
    without = TipStateMachine(TIP_STATES, enter=0.95, confirm=2, smoothing=1.0, kind_enter=1.0)
    assert [without.update(one_kind) for _ in range(4)] == [None] * 4


def test_a_named_kind_gives_way_only_to_a_kind_clearly_ahead():
    """Blunt and multi nearly tied, now one ahead, now the other, raise one alert, not one per
    turn; a kind ahead by the margin takes over after the usual confirmation."""
    machine = TipStateMachine(TIP_STATES, enter=0.7, confirm=2, smoothing=1.0, kind_margin=0.3)
    blunt_ahead = probabilities(good=0.05, blunt=0.5, multi=0.45)
    multi_ahead = probabilities(good=0.05, blunt=0.4, multi=0.55)
    assert [machine.update(blunt_ahead) for _ in range(2)] == [None, "blunt"]
    assert [machine.update(p) for p in [multi_ahead] * 4 + [blunt_ahead, multi_ahead] * 3] == [None] * 10
    assert machine.state == "blunt"
    clearly_multi = probabilities(good=0.05, blunt=0.15, multi=0.8)
    assert [machine.update(clearly_multi) for _ in range(2)] == [None, "multi"]
    tied = TipStateMachine(TIP_STATES, enter=0.7, confirm=2, smoothing=1.0, kind_margin=0.0)
    assert [tied.update(p) for p in [blunt_ahead] * 2 + [multi_ahead] * 2] == [None, "blunt", None, "multi"]


# -- the shipped classifier in the monitor -----------------------------------------------------

def _first_window(sequence):
    images, summaries, _ = windows(sequence, np.array([WINDOW_ROWS - 1]))
    return images[0].astype(np.float32), summaries[0]


def test_a_window_in_doubt_is_read_with_its_mirror_image(classifier):
    image, summary = _first_window(simulate_sequence(4242, 1, 64, scenario="multi", stride=1))
    before = classifier.mirrored
    p = classifier.probabilities(image, summary)
    assert p[classifier.good] < CLEARLY_GOOD and p.sum() == pytest.approx(1.0, abs=1e-5)
    assert classifier.mirrored == before + 1
    assert classifier.probabilities(image[..., ::-1].copy(), summary) == pytest.approx(p, abs=1e-5)


def test_a_clearly_good_window_is_read_once(classifier):
    image, summary = _first_window(simulate_sequence(4242, 2, 64, scenario="good", stride=1))
    before = classifier.mirrored
    p = classifier.probabilities(image, summary)
    assert p[classifier.good] >= CLEARLY_GOOD and classifier.mirrored == before


def test_the_classifier_runs_the_trained_network(classifier):
    image, summary = _first_window(simulate_sequence(4242, 1, 64, scenario="multi", stride=1))
    with torch.inference_mode():
        logits = classifier.net(torch.from_numpy(image[None]), torch.from_numpy(summary[None]))
    assert classifier._softmax(image[None], summary[None]) == pytest.approx(torch.softmax(logits, 1)[0].numpy(), abs=1e-5)


def test_monitor_classifies_every_hop_rows_once_it_has_enough_rows(classifier):
    sequence = simulate_sequence(4242, 0, 128, scenario="good", stride=1)
    monitor = TipMonitor(classifier, hop=4, event_mads=0)
    readings, _ = stream(monitor, sequence, "scan")
    first = WINDOW_ROWS
    assert [i for i, _, _ in readings][:3] == [first - 1, first + 3, first + 7]
    assert monitor.counters["tip_rows"] == 128
    for _, window, belief in readings:
        assert window.sum() == pytest.approx(1.0, abs=1e-3) and belief.sum() == pytest.approx(1.0, abs=1e-3)


def test_a_row_that_stands_out_is_read_between_scheduled_windows(classifier):
    """A tip change is read on the row it shows in, not at the next scheduled window, and the
    window read there calls it a change."""
    before, after = simulate_scans(4242, 3, 128, scenario="change", stride=1, before=1)
    assert after.change_at is not None
    scheduled = TipMonitor(classifier, hop=1000, event_mads=0)
    stream(scheduled, before, "before")
    assert stream(scheduled, after, "after")[0] == []
    monitor = TipMonitor(classifier, hop=1000)
    stream(monitor, before, "before")
    readings, alerts = stream(monitor, after, "after")
    read_rows = [i for i, _, _ in readings]
    assert set(read_rows) & {after.change_at, after.change_at + 1}
    assert len(read_rows) < len(after.labels) // 4
    assert (after.change_at <= alerts[0][0] <= after.change_at + 1) and alerts[0][1] == "changed"


def test_stands_out_reads_the_newest_row_against_the_window():
    rng = np.random.default_rng(0)
    window = list(rng.normal(size=(WINDOW_ROWS, len(FEATURE_NAMES))))
    assert not features.stands_out(window, 8.0)
    for name in ("step", "disagreement", "row_correlation", "spikes"):
        odd = window[:-1] + [window[-1].copy()]
        odd[-1][FEATURE_NAMES.index(name)] += 10.0
        assert features.stands_out(odd, 8.0) and not features.stands_out(odd, 40.0)
    quiet = window[:-1] + [window[-1].copy()]
    quiet[-1][FEATURE_NAMES.index("roughness")] += 10.0  # not a sign of a tip change
    assert not features.stands_out(quiet, 8.0)


def test_monitor_skips_lines_it_cannot_read(classifier):
    monitor = TipMonitor(classifier)
    monitor.start_scan("s", 0.05, ("forward", "backward"))
    bad = np.full(256, np.nan)
    assert monitor.add_line("s", 0, "forward", bad) == (None, None)
    assert monitor.add_line("unknown", 0, "forward", np.zeros(256)) == (None, None)
    assert monitor.counters["tip_rows_skipped"] == 1
    for row in range(1, 6):  # backward traces lost: rows waiting for them do not pile up
        monitor.add_line("s", row, "forward", np.random.default_rng(row).normal(size=256))
    assert len(monitor.scans["s"].pending) == 2 and monitor.counters["tip_rows_skipped"] == 4


def test_a_gap_in_the_lines_restarts_the_window(classifier):
    sequence = simulate_sequence(4242, 1, 128, scenario="good", stride=1)
    monitor = TipMonitor(classifier, hop=1)
    monitor.start_scan("s", sequence.pixel_nm, ("forward", "backward"))
    first = WINDOW_ROWS
    for i in range(first + 4):
        monitor.add_line("s", i, "forward", sequence.forward[i])
        monitor.add_line("s", i, "backward", sequence.backward[i])
    assert monitor.counters["tip_windows"] == 5
    monitor.restart_window("s")
    for i in range(60, 60 + first - 1):
        monitor.add_line("s", i, "forward", sequence.forward[i])
        monitor.add_line("s", i, "backward", sequence.backward[i])
    assert monitor.counters["tip_windows"] == 5 and len(monitor.scans["s"].features) == first - 1


def test_a_rescan_is_read_from_its_first_row_as_trained(classifier):
    """The window carries on from the scan before: what the monitor gives the classifier at the
    start of a rescan is what training gave it (rescan_windows)."""
    before, rescan = simulate_scans(4242, 2, 128, scenario="multi", stride=2, before=1)
    monitor = TipMonitor(classifier, hop=2, event_mads=0)
    stream(monitor, before, "before")
    readings, _ = stream(monitor, rescan, "rescan")
    ends = np.array([i for i, _, _ in readings[:4]])
    assert ends.tolist() == [1, 3, 5, 7]
    images, summaries, _ = rescan_windows(rescan, before, ends)
    for (_, monitored, _), image, summary in zip(readings, images, summaries):
        trained = classifier.probabilities(image.astype(np.float32), summary)
        assert np.allclose(monitored, trained, atol=2e-3)


def test_only_a_scan_that_continues_the_last_reads_on_from_it(classifier):
    sequence = simulate_sequence(4242, 3, 128, scenario="good", stride=1)
    both = ("forward", "backward")
    monitor = TipMonitor(classifier)
    for uid, pixel_nm, directions, carried in (("same", sequence.pixel_nm, both, WINDOW_ROWS),
                                               ("zoomed", sequence.pixel_nm / 2, both, 0),
                                               ("forward only", sequence.pixel_nm, ("forward",), 0)):
        stream(monitor, sequence, f"before {uid}")
        monitor.start_scan(uid, pixel_nm, directions)
        assert len(monitor.scans[uid].features) == carried, uid
        monitor.end_scan(uid)
    stream(monitor, sequence, "before the action")
    monitor.reset()  # a conditioning action: the rows of the old apex say nothing about the new one
    monitor.start_scan("after the action", sequence.pixel_nm, both)
    assert len(monitor.scans["after the action"].features) == 0


def test_monitor_alerts_soon_after_a_tip_change(classifier):
    """A tip change with its height step and streaks: the alert comes within a few rows."""
    delays = []
    for index in range(6):
        sequence = simulate_sequence(777, index, 256, scenario="change", stride=1)
        _, alerts = stream(TipMonitor(classifier), sequence, "scan")
        after = [i - sequence.change_at for i, state in alerts if i >= sequence.change_at and state != "good"]
        delays.append(after[0] if after else 999)
    assert np.median(delays) <= 6, delays


def test_a_tip_change_in_a_sparse_rescan_is_called_at_once(classifier):
    """lines:4: the rescan's window holds the scan before, so a change in its first rows is read."""
    delays = []
    for index in range(8):
        before, sequence = simulate_scans(777, index, 256, scenario="change", stride=4, before=1)
        if sequence.labels[-1] == 0:  # a good tip that stays good: nothing to alert on
            continue
        monitor = TipMonitor(classifier)
        stream(monitor, before, "before")
        _, alerts = stream(monitor, sequence, "rescan")
        after = [i - sequence.change_at for i, state in alerts if i >= sequence.change_at and state != "good"]
        delays.append(after[0] if after else 999)
    assert len(delays) >= 3 and np.median(delays) <= 2, delays


def test_auroc_matches_its_definition():
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True])) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([False, False, True, True])) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([False, True])) == 0.5
    assert auroc(np.array([0.5]), np.array([True])) is None


def test_eval_tip_reports_every_figure(classifier):
    result = evaluate_tip(classifier, episodes=1, hop=4)
    assert set(result["monitor"]["auroc_per_class"]) == set(TIP_STATES)
    assert result["windows"] == sum(result["window_counts"].values()) > 0
    assert 0.0 <= result["monitor"]["auroc_good_vs_degraded"] <= 1.0
    assert result["false_alerts_per_100_clean_frames"] >= 0
    assert len(result["false_alert_list"]) == result["false_alerts"]
    assert result["clean_frames"] == 2  # one area, scanned twice
    assert result["whole_frames"]["frames"] == {"blunt": 1, "multi": 1, "unstable": 1, "good": 2}
    assert 0.0 <= result["whole_frames"]["auroc_good_vs_degraded"] <= 1.0
    alerted = result["steady_frames_alerted"]
    assert set(alerted) == {"blunt", "multi", "unstable"}
    for kind in alerted.values():
        assert kind["frames"] == 1 and kind["first_alert_names_it"] <= kind["alerted"] <= 1
        assert (kind["median_row_of_first_alert"] is None) == (kind["alerted"] == 0)
    assert alerted["unstable"]["alerted"] == alerted["unstable"]["first_alert_names_it"] == 1  # unmistakable
    surfaces = result["monitor_per_surface"]
    assert sum(s["windows"] for s in surfaces.values()) == result["windows"]
    for kind in ("monitor", "single_window"):
        by_threshold = result["visibility"][kind]
        assert list(by_threshold) == [f"{t:g}" for t in result["visibility"]["thresholds"]]
        shares = [v["multi_windows_visible"] for v in by_threshold.values()]
        assert shares == sorted(shares, reverse=True)  # a higher bar keeps fewer windows


def test_degradation_visibility_is_what_the_tip_changes_in_the_image():
    """A second apex sitting on the first changes nothing visible; moved off it, it doubles the
    molecules; a blunt tip smears them; a good tip's rows are 0 and a tip change is always seen."""
    from dataclasses import replace

    from stm_live.sim.frames import SimFrame, random_spec, simulate_frame
    from stm_live.sim.scan import TipScenario, TipSegment
    from stm_live.sim.tip import Apex, Tip
    from stm_live.tip.episodes import degradation_visibility

    rng = np.random.default_rng(5)
    spec = random_spec(rng, 128, surface="supramolecules", scenario="good", frame_nm=12.0)
    frame = simulate_frame(spec, rng)
    assert (degradation_visibility(frame) == 0).all()

    def seen_through(*segments: TipSegment) -> np.ndarray:
        scenario = TipScenario("x", segments)
        return degradation_visibility(SimFrame(replace(spec, scenario=scenario), frame.measurement,
                                               frame.clean_nm, frame.topography))

    def multi(offset_nm: tuple[float, float]) -> Tip:
        return Tip("multi", 0.05, (Apex((0.0, 0.0), 1.0), Apex(offset_nm, 0.8)))

    assert seen_through(TipSegment(0, multi((0.0, 0.0)))).max() < 1.0
    doubled = seen_through(TipSegment(0, multi((1.2, 0.7))))
    assert np.median(doubled) > 20
    assert np.median(seen_through(TipSegment(0, Tip("blunt", 0.6)))) > 20
    changed = seen_through(TipSegment(0, Tip("good", 0.05)), TipSegment(64, Tip("blunt", 0.6), streak_lines=2))
    assert np.isinf(changed).sum() == 2


# -- conditioning policy -----------------------------------------------------------------------

def test_policy_escalates_waits_and_gives_up():
    clock = [0.0]
    settings = ConditioningSettings(enabled=True, min_interval_s=10, max_attempts=2, recovery_windows=2,
                                    actions=["bias_pulse bias_v=1 width_s=0.01", "dip depth_nm=0.2 bias_v=0.1"])
    policy = ConditioningPolicy(settings, clock=lambda: clock[0])
    assert policy.step("stm", "changed", "changed") == (None, None)
    request, _ = policy.step("stm", "blunt", "blunt")
    assert request == {"action": "bias_pulse", "bias_v": 1.0, "width_s": 0.01}
    policy.executed("stm")
    assert policy.step("stm", "blunt", None) == (None, None)
    assert policy.step("stm", "blunt", None) == (None, "not_recovered")  # too soon for another
    clock[0] = 11.0
    request, _ = policy.step("stm", "blunt", None)
    assert request["action"] == "dip"
    policy.executed("stm")
    policy.step("stm", "blunt", None)
    clock[0] = 30.0
    assert policy.step("stm", "blunt", None) == (None, "not_recovered")  # max_attempts reached
    assert policy.step("stm", "good", "good") == (None, None)
    request, _ = policy.step("stm", "multi", "multi")
    assert request["action"] == "bias_pulse"
    policy.executed("stm")
    policy.step("stm", "good", "good")
    assert policy.step("stm", "good", None) == (None, "recovered")


# -- the simulator's episode tip and recorded scans ---------------------------------------------

def test_episode_tip_degrades_and_stays_degraded_until_conditioned():
    from stm_live.sim import tip as tips
    from stm_live.sim.scan import episode_scenario, tip_at

    rng = np.random.default_rng(5)
    good = tips.good_tip(rng)
    assert episode_scenario(good, 128, rng, 0.0).segments == episode_scenario(good, 128, rng, 0.0).segments
    changing = episode_scenario(good, 128, rng, 1.0)
    after = changing.segments[-1].tip
    assert changing.name == "change" and after.state in ("blunt", "multi")
    assert tip_at(changing, 0) is good and tip_at(changing, 127) is after
    assert episode_scenario(after, 128, rng, 1.0).segments[0].tip is after


@pytest.mark.skipif(not (REAL / "Si_7x7_051.sxm").exists(), reason="real scans not present in ../shared/data/real")
def test_monitor_runs_over_a_recorded_scan(classifier):
    result = monitor_scan_file(REAL / "Si_7x7_051.sxm", classifier)
    assert result["rows"] == 256 and (256 - WINDOW_ROWS) // 3 + 1 <= result["windows"] < (256 - WINDOW_ROWS) // 2
    assert len(result["state"]) == 256 and all(s in TIP_STATES for s in result["state"][WINDOW_ROWS:])
    assert result["rows_flagged"] == sum(b - a + 1 for a, b in result["flagged_ranges"])


@pytest.mark.skipif(not (REAL / "Si_7x7_028.sxm").exists(), reason="real scans not present in ../shared/data/real")
def test_recorded_scans_become_good_sequences_in_acquisition_order():
    from stm_live.drivers.scanfiles import read_scan_file
    from stm_live.tip.episodes import scan_file_sequences

    full, half, quarter = scan_file_sequences(REAL / "Au111_pySPM_test.sxm")
    z = next(c for c in read_scan_file(REAL / "Au111_pySPM_test.sxm").channels if c.name == "Z")
    assert np.allclose(full.forward[0], z.forward[-1] * 1e9)  # scanned upwards: the bottom row first
    assert len(half.labels) == 128 and len(quarter.labels) == 64 and not full.labels.any()
    assert half.pixel_nm == full.pixel_nm  # rows are skipped, not pixels along the line


def test_training_batches_never_mix_line_lengths_and_cover_every_window():
    rng = np.random.default_rng(0)
    batches = epoch_batches([70, 20], 8, rng)
    assert [k for k, _ in batches].count(0) == 8 and [k for k, _ in batches].count(1) == 2
    for k in (0, 1):
        taken = np.concatenate([idx for j, idx in batches if j == k])
        assert len(np.unique(taken)) == len(taken) == (64 if k == 0 else 16)
        assert taken.max() < (70 if k == 0 else 20)

