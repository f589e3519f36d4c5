"""Benchmarks behind `stm-live bench ...`; each returns a JSON-ready dict naming the machine."""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from stm_live.config import Settings
from stm_live.daemon import Daemon
from stm_live.demo import free_tcp_endpoint
from stm_live.protocol import ChannelInfo, ScanStart


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


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
                threads: int = 2, backend: str = "auto") -> dict[str, Any]:
    """Reconstruction latency of one frame at batch 1 through the engine (normalisation included)."""

    from stm_live.engines import create_engine, reconstruct_exact
    from stm_live.sim.dataset import make_frame

    engine = create_engine(engine_name, threads, backend)
    results = {}
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
        results[str(size)] = {"p50_ms": round(float(np.percentile(ms, 50)), 2),
                              "p99_ms": round(float(np.percentile(ms, 99)), 2)}
    return {"benchmark": "infer", "machine": machine(), "engine": engine.name,
            "backend": getattr(engine, "backend", "-"), "threads": threads,
            "plan": "lines:4", "batch": 1, "latency": results}
