"""Benchmarks behind `stm-live bench ...`; each returns a JSON-ready dict naming the machine."""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from stm_live.config import Settings, TipSettings
from stm_live.daemon import Daemon
from stm_live.demo import free_tcp_endpoint
from stm_live.machine import machine
from stm_live.protocol import ChannelInfo, ScanStart


def _null_subscriber(endpoint: str, topics: tuple[str, ...]) -> None:
    """Subscriber process: takes what a viewer takes and does nothing with it (the sending's cost alone)."""
    sub = zmq.Context().socket(zmq.SUB)
    for topic in topics:
        sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sub.connect(endpoint)
    while True:
        sub.recv_multipart(copy=False)


def _send_lines(endpoint: str, lines: int, cols: int, channels: int, rate: float, sent: Any) -> None:
    """Sender process: full scans of `cols` rows, forward and backward, at `rate` lines/s (0 = flat out)."""
    from stm_live.drivers.publisher import InstrumentPublisher

    infos = tuple(ChannelInfo(f"ch{i}", "V", "float32") for i in range(channels))
    values = [np.random.default_rng(i).normal(size=cols).astype(np.float32) for i in range(channels)]
    pub = InstrumentPublisher(endpoint, "bench-sender", sndhwm=0)
    pub.wait_for_subscriber(30)
    count, scan, start = 0, 0, time.perf_counter()
    while count < lines:
        uid = f"bench-{scan:05d}"
        pub.scan_start(ScanStart(uid, "bench", infos, cols, cols, (100.0, 100.0), "down", "full",
                                 ("forward", "backward"), 0.001, 1.0, 1e-10, time.time()))
        for row in range(cols):
            for direction in ("forward", "backward"):
                if count >= lines:
                    break
                if rate and count % 64 == 0:
                    delay = start + count / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                pub.line(uid, row, direction, infos, values)
                count += 1
        pub.scan_end(uid, "complete")
        scan += 1
    sent.value = count
    pub.close(linger_s=None)


def bench_ingest(settings: Settings, lines: int = 200_000, cols: int = 512, channels: int = 2,
                 rate: float = 0.0, export_hdf5: bool = False, timeout_s: float = 600.0) -> dict[str, Any]:
    """Lines/s through the daemon's real ingest path (decode + assembly + journal), no reconstruction.

    The sender runs on the same machine. With `export_hdf5` the per-scan HDF5 export runs too.
    """
    endpoint, output = free_tcp_endpoint(), free_tcp_endpoint()
    with tempfile.TemporaryDirectory(prefix="stm-live-bench-") as record:
        cfg = settings.model_copy(deep=True)
        cfg.daemon.input, cfg.daemon.output, cfg.daemon.record_dir = endpoint, output, record
        cfg.daemon.engine, cfg.daemon.reconstruct_every_lines = "none", 0
        cfg.daemon.export_hdf5 = export_hdf5
        context = zmq.Context()
        daemon = Daemon(cfg, context)
        sent = mp.get_context("spawn").Value("q", 0)
        sender = mp.get_context("spawn").Process(target=_send_lines, args=(endpoint, lines, cols, channels, rate, sent))
        sender.start()
        thread = threading.Thread(target=daemon.run, name="bench-daemon")
        thread.start()
        first = last = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            n = daemon.counters["lines"]
            if n and first is None:
                first = time.perf_counter()
            if n >= lines:
                last = time.perf_counter()
                break
            if not sender.is_alive() and n < lines and _idle_for(daemon, 10.0):
                break
            time.sleep(0.02)
        cpu = time.process_time()
        sender.join(60)
        daemon.stop()
        thread.join(60)
        context.term()
        journal_bytes = sum(p.stat().st_size for p in Path(record).glob("*.journal"))
    received = daemon.counters["lines"]
    seconds = (last or time.perf_counter()) - (first or time.perf_counter())
    return {
        "benchmark": "ingest", "machine": machine(), "lines_offered": int(sent.value) or lines,
        "cols": cols, "channels": channels, "offered_rate": rate or "max", "hdf5_export": export_hdf5,
        "lines_received": received, "messages_recorded": daemon.counters["recorded"],
        "dropped": (int(sent.value) or lines) - received, "drops_by_reason": dict(daemon.drops.counts),
        "seconds": round(seconds, 3), "lines_per_s": round(received / seconds, 1) if seconds > 0 else None,
        "journal_mb": round(journal_bytes / 1e6, 1), "daemon_process_cpu_s": round(cpu, 2),
        "daemon_counters": dict(daemon.counters),
    }


def _started_daemon(cfg: Settings, context: zmq.Context) -> tuple[Daemon, threading.Thread]:
    """A daemon serving on its own thread of this process, ready for input."""
    daemon = Daemon(cfg, context)
    thread = threading.Thread(target=daemon.run, name="bench-daemon")
    thread.start()
    daemon.wait_ready(30)
    return daemon, thread


def _idle_for(daemon: Daemon, seconds: float) -> bool:
    before = daemon.counters["lines"]
    time.sleep(seconds)
    return daemon.counters["lines"] == before


def bench_sim(frames: int = 2048, size_px: int = 256, workers: int = 2, shard_size: int = 128) -> dict[str, Any]:
    """Training-data generation speed: simulated frames written as shards, per second, end to end
    (worker start-up, simulation and HDF5 writing included)."""
    from stm_live.sim.dataset import generate

    with tempfile.TemporaryDirectory(prefix="stm-live-bench-sim-") as out:
        generate(out, min(frames, 2 * workers), seed=1, size_px=size_px, shard_size=1, workers=workers)
        result = generate(Path(out) / "run", frames, seed=2, size_px=size_px, shard_size=shard_size, workers=workers)
    return {"benchmark": "sim", "machine": machine(), **result}


def bench_infer(engine_name: str = "model", sizes: tuple[int, ...] = (128, 256, 512), repeats: int = 30,
                threads: int = 2, backend: str = "auto", batches: tuple[int, ...] = (1, 8, 32),
                throughput_s: float = 3.0, half: bool = False) -> dict[str, Any]:
    """Per frame size: latency of one frame at batch 1, and frames/s at each batch size (calls
    repeated for about `throughput_s`, at least twice), through the engine (normalisation and
    restoring measured pixels included); for the learned engine also its network's share."""

    from stm_live.engines import create_engine, reconstruct_exact
    from stm_live.engines.runners import RunnerOptions
    from stm_live.sim.dataset import make_frame

    engine = create_engine(engine_name, threads, backend, RunnerOptions(threads=threads, half=half))
    latency, throughput = {}, {}
    for size in sizes:
        frame = make_frame(5, 0, size, surface="si111_7x7").measurement.z[0].astype(np.float32)
        mask = np.zeros(frame.shape, bool)
        mask[::4] = True
        measured, masks = np.where(mask, frame, np.nan)[None], mask[None]
        for _ in range(3):
            reconstruct_exact(engine, measured, masks)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            reconstruct_exact(engine, measured, masks)
            times.append(time.perf_counter() - start)
        ms = np.array(times) * 1000
        latency[str(size)] = {"p50_ms": round(float(np.percentile(ms, 50)), 2),
                              "p99_ms": round(float(np.percentile(ms, 99)), 2)}
        if hasattr(engine, "runner"):
            latency[str(size)]["network_p50_ms"] = _network_ms(engine, measured, masks, repeats)
        throughput[str(size)] = {}
        for batch in batches:
            stacked, stacked_masks = np.repeat(measured, batch, axis=0), np.repeat(masks, batch, axis=0)
            reconstruct_exact(engine, stacked, stacked_masks)
            calls, start = 0, time.perf_counter()
            while calls < 2 or time.perf_counter() - start < throughput_s:
                reconstruct_exact(engine, stacked, stacked_masks)
                calls += 1
            throughput[str(size)][str(batch)] = round(calls * batch / (time.perf_counter() - start), 1)
    return {"benchmark": "infer", "machine": machine(), "engine": engine.name,
            "backend": getattr(engine, "backend", "-"), "threads": threads, "half": half,
            "plan": "lines:4", "latency_batch1": latency, "frames_per_s": throughput}


def _network_ms(engine: Any, measured: np.ndarray, masks: np.ndarray, repeats: int) -> float:
    """The learned engine's network alone (its runner on an input already prepared on the
    runner's device), p50 in ms: what of the engine's latency is not the network."""
    import torch

    from stm_live.models.normalize import network_input

    runner = engine.runner
    synchronize = torch.cuda.synchronize if runner.device == "cuda" else (lambda: None)
    with torch.inference_mode():
        inputs, _ = network_input(torch.from_numpy(measured).to(runner.device), torch.from_numpy(masks).to(runner.device))
        for _ in range(3):
            runner.infer(inputs)
        times = []
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            runner.infer(inputs)
            synchronize()
            times.append(time.perf_counter() - start)
    return round(float(np.percentile(np.array(times) * 1000, 50)), 2)


def _scan_from_sim(endpoint: str, frames: int, size: int, plan: str, rate: float) -> None:
    """Sender process: the simulator scanning `frames` frames at `rate` lines/s."""
    from stm_live.sim.instrument import SimInstrument

    sim = SimInstrument(endpoint, size=size, plan=plan, line_rate_hz=rate, seed=11)
    sim.run(frames, wait_subscriber_s=30)
    sim.close(linger_s=30)


def bench_e2e(settings: Settings, engine: str = "model", frames: int = 2, size: int = 256, plan: str = "lines:4",
              rate: float = 20.0, every_lines: int = 1, localize: bool = False,
              timeout_s: float = 600.0) -> dict[str, Any]:
    """Line arrival -> published updated frame, through the running daemon: the simulator (its
    own process) scans at `rate` lines/s, the daemon reconstructs every `every_lines` lines,
    and each reconstructed Frame's `latency_s` (the newest line's arrival to its publication) is
    collected by a subscriber on the daemon's output."""
    from stm_live.protocol import Decoder, Frame

    endpoint, output = free_tcp_endpoint(), free_tcp_endpoint()
    with tempfile.TemporaryDirectory(prefix="stm-live-bench-e2e-") as record:
        cfg = settings.model_copy(deep=True)
        cfg.daemon.input, cfg.daemon.output, cfg.daemon.record_dir = endpoint, output, record
        cfg.daemon.engine, cfg.daemon.reconstruct_every_lines = engine, every_lines
        cfg.localize.enabled = localize
        context = zmq.Context()
        daemon, thread = _started_daemon(cfg, context)
        listener = context.socket(zmq.SUB)
        listener.setsockopt(zmq.SUBSCRIBE, b"frame")
        listener.connect(output)
        sender = mp.get_context("spawn").Process(target=_scan_from_sim, args=(endpoint, frames, size, plan, rate))
        sender.start()
        decoder, latencies, finals = Decoder(), [], 0
        deadline = time.monotonic() + timeout_s
        while finals < 2 * frames and time.monotonic() < deadline:
            if not listener.poll(1000):
                if not sender.is_alive() and _idle_for(daemon, 5.0):
                    break
                continue
            msg = decoder.decode(listener.recv_multipart(copy=False))
            if isinstance(msg, Frame) and msg.kind == "reconstructed" and msg.channel == "Z":
                latencies.append(msg.latency_s)
                finals += msg.final
        sender.join(60)
        counters = daemon.scheduler.all_counters()
        daemon.stop()
        thread.join(60)
        listener.close(0)
        context.term()
    ms = np.asarray(latencies) * 1000
    return {
        "benchmark": "e2e", "machine": machine(), "engine": engine, "backend": daemon.scheduler.engine.backend
        if daemon.scheduler.engine else "-", "frames": frames, "size": size, "plan": plan, "line_rate_hz": rate,
        "reconstruct_every_lines": every_lines, "localization": localize,
        "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2),
                       "n": int(ms.size)} if ms.size else {},
        "batches": counters["batches"], "frames_per_batch": round(counters["batched_frames"] / counters["batches"], 2)
        if counters["batches"] else None,
        "jobs_superseded": counters["jobs_superseded"],
    }


def bench_tip(cols: int = 512, rows: int = 512, hop: int = TipSettings().hop, threads: int = 1, tip: str = "good",
              event_mads: float = TipSettings().event_mads) -> dict[str, Any]:
    """The tip monitor's cost per line: features on every row, the classifier every `hop` rows,
    on simulated Si(111)-7x7 rows of `cols` pixels (forward and backward traces) imaged by a
    `tip` (good, blunt, multi) tip. Rows with and without a classification are also averaged
    apart: with hop 3 a third of the rows classify (more where rows stand out)."""
    from stm_live.sim.frames import random_spec, simulate_frame
    from stm_live.tip.classifier import TipClassifier
    from stm_live.tip.monitor import TipMonitor

    rng = np.random.default_rng(0)
    z = simulate_frame(random_spec(rng, cols, surface="si111_7x7", scenario=tip), rng).measurement.z
    classifier = TipClassifier(threads=threads)
    monitor = TipMonitor(classifier, hop=hop, event_mads=event_mads)
    per_row, classified = [], []
    for repeat in range(max(1, rows // cols)):
        uid = f"bench-{repeat}"
        monitor.start_scan(uid, 20.0 / cols, ("forward", "backward"))
        for row in range(cols):
            windows = monitor.counters["tip_windows"]
            started = time.perf_counter()
            monitor.add_line(uid, row, "forward", z[0, row])
            monitor.add_line(uid, row, "backward", z[1, row])
            per_row.append(time.perf_counter() - started)
            classified.append(monitor.counters["tip_windows"] > windows)
        monitor.end_scan(uid)
    per_line_ms = np.asarray(per_row) * 1e3 / 2
    classified_rows = np.asarray(classified)
    return {"benchmark": "tip", "cols": cols, "rows": len(per_row), "hop": hop, "event_mads": event_mads,
            "classifier_threads": threads, "tip": tip,
            "windows": monitor.counters["tip_windows"], "windows_read_with_mirror_image": classifier.mirrored,
            "per_line_ms": {"mean": round(float(per_line_ms.mean()), 4),
                            "p50": round(float(np.percentile(per_line_ms, 50)), 4),
                            "p99": round(float(np.percentile(per_line_ms, 99)), 4),
                            "mean_rows_without_classification": round(float(per_line_ms[~classified_rows].mean()), 4),
                            "mean_rows_with_classification": round(float(per_line_ms[classified_rows].mean()), 4)},
            "machine": machine()}


VIEW_ARMS = {"none": "without_viewer", "null": "with_null_subscriber", "live": "with_viewer"}


def bench_view(rate: float = 10_000.0, cols: int = 256, seconds: float = 20.0, repeats: int = 1,
               null_subscriber: bool = False) -> dict[str, Any]:
    """The daemon with and without a live viewer attached, at `rate` lines/s of `cols` pixels.

    Each run: the daemon (classical engine, a reconstruction every 16 lines) fed by a sender
    process; in runs with the viewer a `stm-live view` process (offscreen) subscribes too and
    reports its render rate, CPU time, memory and missed messages. Runs alternate without / with
    the viewer `repeats` times, every other round in the opposite order, so both see the same
    machine and neither always goes first; the summary gives each arm's median and range, and the
    median over rounds of the difference with minus without. With `null_subscriber`, a third arm
    in each round subscribes to what the viewer takes and discards it: what the sending alone
    costs the daemon. A last run freezes the viewer
    (SIGSTOP) while the lines stream: what a hung viewer costs the daemon in memory and latency,
    and what the viewer counts as missed once it thaws.
    """
    modes = ("none", "null", "live") if null_subscriber else ("none", "live")
    runs: dict[str, list[dict[str, Any]]] = {VIEW_ARMS[m]: [] for m in modes}
    for round_ in range(repeats):
        for mode in modes if round_ % 2 == 0 else modes[::-1]:
            runs[VIEW_ARMS[mode]].append(_view_run(rate, cols, seconds, mode))
    runs["frozen_viewer"] = [_view_run(rate, cols, seconds, "frozen")]
    summary = {}
    for arm, results in runs.items():
        summary[arm] = {}
        for stat in ("p50", "p99"):
            values = [r["reconstruction_latency_ms"][stat] for r in results]
            summary[arm][f"latency_{stat}_ms"] = {"median": round(float(np.median(values)), 2),
                                                   "min": min(values), "max": max(values)}
        summary[arm]["lines_lost"] = sum(r["lines_offered"] - r["lines_received"] for r in results)
        summary[arm]["daemon_rss_growth_mb_max"] = max(r["daemon_rss_mb"]["peak"] - r["daemon_rss_mb"]["start"]
                                                       for r in results)
    for stat in ("p50", "p99"):
        differences = [w["reconstruction_latency_ms"][stat] - n["reconstruction_latency_ms"][stat]
                       for w, n in zip(runs["with_viewer"], runs["without_viewer"])]
        summary[f"with_minus_without_{stat}_ms"] = {
            "median": round(float(np.median(differences)), 2), "per_round": [round(d, 2) for d in differences]}
    return {"benchmark": "view", "rate": rate, "cols": cols, "seconds": seconds, "repeats": repeats,
            "summary": summary, **runs, "machine": machine()}


def _view_run(rate: float, cols: int, seconds: float, viewer_mode: str) -> dict[str, Any]:
    """One run of `bench_view` with no viewer ("none"), a subscriber that discards what a viewer
    takes ("null"), a live viewer ("live") or one stopped while the lines stream ("frozen").
    `daemon_cpu_s` and `daemon_rss_mb` are this process's, i.e. the daemon's threads (the sender,
    the viewer and the null subscriber are processes of their own)."""
    import json
    import signal
    import subprocess
    import sys

    lines = int(rate * seconds)
    endpoint, output = free_tcp_endpoint(), free_tcp_endpoint()
    with tempfile.TemporaryDirectory(prefix="stm-live-bench-view-") as work:
        cfg = Settings()
        cfg.daemon.input, cfg.daemon.output, cfg.daemon.record_dir = endpoint, output, work
        cfg.daemon.export_hdf5 = False
        context = zmq.Context()
        daemon, thread = _started_daemon(cfg, context)
        viewer = null = None
        stats = Path(work) / "viewer.json"
        if viewer_mode == "null":
            from stm_live.viewer.model import TOPICS, slot_topics

            topics = (*TOPICS, *slot_topics("ch0", "forward"))  # the viewer shows the first slot
            null = mp.get_context("spawn").Process(target=_null_subscriber, args=(output, topics), daemon=True)
            null.start()
            time.sleep(5.0)
        elif viewer_mode != "none":
            viewer = subprocess.Popen([sys.executable, "-m", "stm_live", "--log-level", "WARNING", "view",
                                       "--connect", output, "--offscreen", "--stats", str(stats)])
            time.sleep(5.0)
            if viewer_mode == "frozen":
                os.kill(viewer.pid, signal.SIGSTOP)
        sent = mp.get_context("spawn").Value("q", 0)
        sender = mp.get_context("spawn").Process(target=_send_lines, args=(endpoint, lines, cols, 2, rate, sent))
        rss_start = rss_peak = _rss_mb(os.getpid())
        started, cpu_started = time.perf_counter(), time.process_time()
        sender.start()
        deadline = time.monotonic() + seconds * 5 + 60
        while sender.is_alive() and time.monotonic() < deadline:
            sender.join(0.5)
            rss_peak = max(rss_peak, _rss_mb(os.getpid()))
        while daemon.counters["lines"] < lines and not _idle_for(daemon, 2.0):
            pass
        elapsed, daemon_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
        rss_peak = max(rss_peak, _rss_mb(os.getpid()))
        if viewer_mode == "frozen":
            os.kill(viewer.pid, signal.SIGCONT)
            time.sleep(3.0)  # thawed: it drains what was left and hears a status, which tells it what it missed
        time.sleep(1.0)
        latency = daemon.scheduler.latency.summary()
        if viewer is not None:
            viewer.terminate()
            viewer.wait(60)
        if null is not None:
            null.terminate()
            null.join(60)
        daemon.stop()
        thread.join(60)
        context.term()
        return {
            "lines_received": daemon.counters["lines"], "lines_offered": int(sent.value),
            "seconds": round(elapsed, 2), "daemon_cpu_s": round(daemon_cpu_s, 2),
            "daemon_rss_mb": {"start": round(rss_start, 1), "peak": round(rss_peak, 1)},
            "frames_published": daemon.scheduler.counters["frames_published"],
            "reconstruction_latency_ms": {k: round(v * 1e3, 2) for k, v in latency.items() if k != "n"},
            "dropped": sum(daemon.drops.counts.values()),
            **({"viewer": json.loads(stats.read_text())} if viewer is not None and stats.exists() else {}),
        }


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def bench_soak(lines: int = 1_000_000, size: int = 256, rate: float = 10_000.0, window_s: float = 10.0
               ) -> dict[str, Any]:
    """`lines` lines from the simulator (full scans of `size` rows, forward and backward) through a
    daemon process to a subscriber that keeps only statistics: drops, reconstruction latency p99
    per `window_s` and the daemon's memory over time."""
    import subprocess
    import sys

    from stm_live.protocol import Decoder, Frame, Status

    frames = -(-lines // (2 * size))
    instrument, output = free_tcp_endpoint(), free_tcp_endpoint()
    cli = [sys.executable, "-m", "stm_live", "--log-level", "WARNING"]
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    for topic in (b"frame", b"status"):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(output)
    decoder = Decoder()
    windows: list[dict[str, Any]] = []
    latencies: list[float] = []
    memory: list[float] = []
    status: Status | None = None
    with tempfile.TemporaryDirectory(prefix="stm-live-soak-") as record:
        daemon = subprocess.Popen([*cli, "run", "--input", instrument, "--output", output, "--record", record])
        time.sleep(3.0)
        sim = subprocess.Popen([*cli, "sim", "--bind", instrument, "--frames", str(frames), "--size", str(size),
                                "--plan", "full", "--line-rate", str(rate / 2), "--seed", "9"])
        started = window_start = time.monotonic()
        try:
            while True:
                if sub.poll(200):
                    msg = decoder.decode(sub.recv_multipart())
                    if isinstance(msg, Frame) and msg.kind == "reconstructed":
                        latencies.append(msg.latency_s)
                    elif isinstance(msg, Status):
                        status = msg
                now = time.monotonic()
                if now - window_start >= window_s:
                    memory.append(_rss_mb(daemon.pid))
                    windows.append({"t_s": round(now - started, 1), "frames": len(latencies),
                                    "latency_p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2)
                                    if latencies else None,
                                    "lines": status.counters.get("lines", 0) if status else 0,
                                    "daemon_rss_mb": round(memory[-1], 1)})
                    latencies, window_start = [], now
                done = status is not None and status.counters.get("lines", 0) >= 2 * size * frames
                if (sim.poll() is not None and done) or now - started > 3 * lines / rate + 600:
                    break
            time.sleep(2.0)
            while sub.poll(500):
                msg = decoder.decode(sub.recv_multipart())
                if isinstance(msg, Status):
                    status = msg
        finally:
            for proc in (sim, daemon):
                if proc.poll() is None:
                    proc.terminate()
                proc.wait(60)
            sub.close(0)
            context.term()
    counters = status.counters if status else {}
    sent = 2 * size * frames
    settled = memory[len(memory) // 4:] if len(memory) >= 4 else memory
    return {
        "benchmark": "soak", "lines_sent": sent, "lines_received": counters.get("lines", 0),
        "lines_recorded": counters.get("recorded", 0) - 2 * frames, "dropped": counters.get("dropped", 0),
        "lost": sent - counters.get("lines", 0), "frames": frames, "size": size, "offered_rate": rate,
        "locmaps_published": counters.get("locmaps_published", 0), "locmaps_dropped": counters.get("locmaps_dropped", 0),
        "seconds": round(time.monotonic() - started, 1), "windows": windows,
        "memory_growth_after_first_quarter": round(settled[-1] / settled[0] - 1, 4) if settled else None,
        "machine": machine(),
    }
