"""The user-facing commands, run as a user runs them."""

import json
import subprocess
import sys

import numpy as np
import pytest

from stm_live.bench import bench_e2e, bench_infer, bench_ingest, bench_tip
from stm_live.config import Settings
from stm_live.demo import free_tcp_endpoint
from stm_live.protocol import TIP_STATES
from stm_live.tip.classifier import TipClassifier
from stm_live.tip.episodes import simulate_sequence, windows


def stm_live(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "stm_live", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_sim_and_tap_show_the_wire():
    endpoint = free_tcp_endpoint()
    tap = subprocess.Popen([sys.executable, "-m", "stm_live", "tap", "--connect", endpoint, "--count", "8",
                            "--timeout", "60"], stdout=subprocess.PIPE, text=True)
    sim = stm_live("sim", "--bind", endpoint, "--frames", "1", "--size", "32", "--plan", "lines:8",
                   "--line-rate", "200")
    out, _ = tap.communicate(timeout=60)
    assert sim.returncode == 0, sim.stderr
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["type"] for r in rows[:3]] == ["truth", "scan_start", "heartbeat"]
    assert [r["topic"] for r in rows[:3]] == ["truth", "scan_start", "heartbeat"]
    assert rows[0]["channels"] == ["Z", "Current", "clean", "tip_state"] and rows[0]["shapes"][3] == [32]
    assert rows[1]["plan"] == "lines:8" and rows[1]["channels"][0] == {"name": "Z", "unit": "m", "dtype": "float32"}
    line = rows[3]
    first_row = 0 if rows[1]["scan_direction"] == "down" else 24
    assert line["type"] == "line" and line["row"] == first_row and line["shapes"] == [[32], [32]]
    assert "arrays" not in line


def test_demo_reports_quality_and_latency(tmp_path):
    out_json = tmp_path / "demo.json"
    result = stm_live("demo", "--frames", "2", "--size", "128", "--line-rate", "1000", "--record", str(tmp_path / "rec"),
                      "--json", str(out_json), "--view", "snapshots", "--snapshots", str(tmp_path / "view"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(out_json.read_text())
    assert summary["frames_scored"] == 2 and summary["dropped"] == 0
    assert summary["lines_received"] == 2 * 32 * 2
    for key in ("engine", "classical", "model"):
        assert summary["mean"][key]["psnr_db"] > 15 and 0 < summary["mean"][key]["ssim"] <= 1
    assert summary["engine"] == "classical" and summary["scores"][0]["method"] == "classical"
    assert summary["mean"]["engine"] == summary["mean"]["classical"]
    assert summary["latency_ms"]["p50"] > 0
    assert "dB" in result.stdout and "lines/s" in result.stdout
    assert len(list((tmp_path / "rec").glob("*.journal"))) == 2
    assert (tmp_path / "view" / "view-last.png").stat().st_size > 10_000
    assert summary["tip"]["simulated"] == "good" and summary["tip"]["true_states"]
    assert summary["localization"]["maps"] >= 1 and summary["localization"]["last"]["uid"] in {
        s["uid"] for s in summary["scores"]}, "the demo waits for the last scan's localization map"
    assert "localization" in result.stdout


def test_bench_ingest_counts_every_line():
    result = bench_ingest(Settings(), lines=4000, cols=128, channels=2)
    assert result["dropped"] == 0 and result["lines_received"] == 4000
    assert result["lines_per_s"] > 0 and result["machine"]["cores"] >= 1


def test_bench_tip_times_rows_with_and_without_a_classification_apart():
    result = bench_tip(cols=128, rows=128, hop=2, event_mads=0)
    assert result["windows"] == (128 - 32) // 2 + 1
    per_line = result["per_line_ms"]
    assert per_line["mean_rows_with_classification"] > per_line["mean_rows_without_classification"] > 0
    with_share = result["windows"] / result["rows"]
    assert per_line["mean"] == pytest.approx(with_share * per_line["mean_rows_with_classification"]
                                             + (1 - with_share) * per_line["mean_rows_without_classification"], rel=1e-3)


def test_bench_infer_and_e2e_report_latency_and_throughput():
    infer = bench_infer("classical", sizes=(64,), repeats=3, batches=(1, 4), throughput_s=0.05)
    assert infer["latency_batch1"]["64"]["p50_ms"] > 0 and set(infer["frames_per_s"]["64"]) == {"1", "4"}
    learned = bench_infer("model", sizes=(64,), repeats=3, batches=(1,), throughput_s=0.05)["latency_batch1"]["64"]
    assert learned["network_p50_ms"] > 0 and learned["p50_ms"] > 0, "the learned engine's network is timed on its own too"
    settings = Settings()
    settings.daemon.progressive_max_hz = 0  # a frame per line: how many come does not hang on timing
    e2e = bench_e2e(settings, engine="classical", frames=1, size=64, rate=400.0)
    assert e2e["latency_ms"]["n"] >= 8 and e2e["latency_ms"]["p50"] > 0
    assert e2e["batches"] >= 1 and e2e["frames_per_batch"] >= 1


def test_config_errors_are_reported_not_raised(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nengine = 3\n")
    result = stm_live("--config", str(bad), "config")
    assert result.returncode == 2 and "daemon.engine" in result.stderr


def test_busy_endpoint_is_a_clear_error():
    import zmq
    endpoint = free_tcp_endpoint()
    context = zmq.Context()
    holder = context.socket(zmq.PUB)
    holder.bind(endpoint)
    try:
        result = stm_live("run", "--input", free_tcp_endpoint(), "--output", endpoint, "--record", "")
    finally:
        holder.close(0)
        context.destroy(linger=0)
    assert result.returncode == 3 and "Address already in use" in result.stderr


def test_sim_dataset_command_writes_shards(tmp_path):
    result = stm_live("sim", "dataset", "--out", str(tmp_path / "ds"), "--n", "5", "--size", "48",
                      "--shard-size", "2", "--workers", "2", "--seed", "4")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["frames"] == 5 and summary["shards"] == 3
    assert sorted(p.name for p in (tmp_path / "ds").glob("*.h5")) == [f"shard-0000{i}.h5" for i in range(3)]
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["seed"] == 4


def test_sim_images_are_reproducible_and_scored_by_eval(tmp_path):
    for out in ("a", "b"):
        result = stm_live("sim", "images", "--out", str(tmp_path / out), "--n", "3", "--size", "64")
        assert result.returncode == 0, result.stderr
    names = ["00_si111_7x7.npy", "01_si001_h.npy", "02_au111.npy"]
    assert sorted(p.name for p in (tmp_path / "a").glob("*.npy")) == names
    for name in names:
        image = np.load(tmp_path / "a" / name)
        assert image.shape == (64, 64) and np.array_equal(image, np.load(tmp_path / "b" / name))
    result = stm_live("eval", str(tmp_path / "a" / names[0]), "--plan", "lines:4", "--json", str(tmp_path / "e.json"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "e.json").read_text())["images"][0]["name"] == names[0]


def test_drive_replay_reports_a_bad_file_and_exits(tmp_path):
    bad = tmp_path / "broken.sxm"
    bad.write_bytes(b":NANONIS_VERSION:\n2\n")
    result = stm_live("drive", "replay", str(bad), "--bind", free_tcp_endpoint(), "--wait-subscriber", "0")
    assert result.returncode == 4 and "broken.sxm" in result.stderr


def test_train_tip_learns_from_both_line_lengths_caches_each_and_writes_the_weights_asked_for(tmp_path):
    config = tmp_path / "tip.toml"
    config.write_text(f'cache = "{tmp_path / "windows.npz"}"\nframes = 4\nvalidation_frames = 2\n'
                      'long_validation_frames = 1\nwindows_per_frame = 4\nbatch = 8\nworkers = 1\n')
    weights = tmp_path / "out" / "tip.safetensors"
    args = ("train", "tip", "--train-config", str(config), "--epochs", "1", "--long-frames", "2",
            "--weights", str(weights), "--json", str(tmp_path / "summary.json"))
    result = stm_live(*args)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["weights"] == str(weights) and weights.exists()
    counts = summary["windows_by_line_length"]
    assert set(counts) == {"256", "512"} and counts["256"] >= 4 * 4 and counts["512"] >= 2 * 4
    assert json.loads(weights.with_suffix(".json").read_text())["training"]["frames"] == 4
    assert (tmp_path / "windows-512.npz").exists()

    again = stm_live(*args)
    assert again.returncode == 0, again.stderr
    assert "9/9" in again.stderr  # every frame counted, read back from the caches
    assert json.loads((tmp_path / "summary.json").read_text())["simulation_s"] < summary["simulation_s"]
    trained = TipClassifier(weights)
    sequence = simulate_sequence(1, 0, size=512, scenario="good", stride=1)
    image, features, _ = windows(sequence, np.array([40]))
    p = trained.probabilities(image[0].astype(np.float32), features[0])
    assert p.shape == (len(TIP_STATES),) and abs(p.sum() - 1) < 1e-5

    config.write_text("frames = 4\nframe_count = 4\n")
    result = stm_live("train", "tip", "--train-config", str(config))
    assert result.returncode == 2 and "unknown training settings: ['frame_count']" in result.stderr
