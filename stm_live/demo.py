"""`stm-live demo`: the simulator and the daemon as separate processes on loopback, scored live.

The demo subscribes to the daemon's frames and status and to the simulator's `truth` topic,
waits for every final frame, and reports line rate, reconstruction latency and the quality of
the daemon's reconstruction, next to the classical one of the same measurement, against the frame
a full scan would have measured (forward Z channel); and what the tip monitor said (readings,
alerts) next to the simulator's own tip labels.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from stm_live.config import Settings
from stm_live.engines import Reconstructor, create_engine, reconstruct_exact
from stm_live.engines.classical import ClassicalReconstructor
from stm_live.metrics import quality
from stm_live.protocol import TIP_STATES, Decoder, Frame, LocMap, ProtocolError, Status, TipAlert, TipReport, Truth

log = logging.getLogger(__name__)

SCORED_CHANNEL = "Z"
LOCALIZATION_WAIT_S = 60.0  # after the last frame: its localization map (seconds on a CPU) may still come


def free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stm_live", "--log-level", "WARNING", *args]


def run_demo(settings: Settings, record_dir: str | None = None, timeout_s: float = 300.0) -> dict[str, Any]:
    demo = settings.demo
    instrument, output = free_tcp_endpoint(), free_tcp_endpoint()
    temp = None if record_dir else tempfile.mkdtemp(prefix="stm-live-demo-")
    record = record_dir or temp
    context = zmq.Context()
    frames_sock = context.socket(zmq.SUB)
    for topic in (b"frame", b"status", b"heartbeat", b"tip", b"alert", b"locmap"):
        frames_sock.setsockopt(zmq.SUBSCRIBE, topic)
    frames_sock.connect(output)
    truth_sock = context.socket(zmq.SUB)
    truth_sock.setsockopt(zmq.SUBSCRIBE, b"truth")
    truth_sock.connect(instrument)
    daemon = subprocess.Popen(_cli("run", "--input", instrument, "--output", output, "--record", record))
    view_mode = _view_mode(demo.view)
    viewer = None
    if view_mode == "window":
        viewer = subprocess.Popen(_cli("view", "--connect", output))
    elif view_mode == "snapshots":
        for old in Path(demo.snapshot_dir).glob("view-*.png"):
            old.unlink()
        viewer = subprocess.Popen(_cli("view", "--connect", output, "--offscreen", "--snapshots", demo.snapshot_dir,
                                       "--every", str(demo.snapshot_every_s)))
    sim = None
    decoder = Decoder()
    truths: dict[str, np.ndarray] = {}
    finals: dict[str, Frame] = {}
    status: Status | None = None
    latencies: list[float] = []
    tip_states: dict[str, int] = {}
    alerts: list[dict[str, Any]] = []
    true_tip: dict[str, list[str]] = {}
    locmaps: list[LocMap] = []
    try:
        poller = zmq.Poller()
        poller.register(frames_sock, zmq.POLLIN)
        poller.register(truth_sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        started = finished = None
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited with code {daemon.returncode}")
            for sock, _ in poller.poll(200):
                try:
                    msg = decoder.decode(sock.recv_multipart(copy=False))
                except ProtocolError as exc:
                    log.warning("demo received an invalid message: %s", exc)
                    continue
                if sim is None and msg.type == "heartbeat" and _viewer_ready(view_mode, demo.snapshot_dir):
                    sim = subprocess.Popen(_cli(
                        "sim", "--bind", instrument, "--frames", str(demo.frames), "--size", str(demo.size),
                        "--plan", demo.plan, "--line-rate", str(demo.line_rate_hz), "--seed", str(demo.seed),
                        "--wait-topic", "line", "--wait-topic", "truth", "--tip", demo.tip))
                elif isinstance(msg, Truth):
                    started = started or time.monotonic()
                    truths[msg.uid] = msg.arrays[msg.channels.index(SCORED_CHANNEL)].copy()
                    labels = msg.arrays[msg.channels.index("tip_state")]
                    true_tip[msg.uid] = sorted({TIP_STATES[int(code)] for code in labels})
                elif isinstance(msg, TipReport):
                    tip_states[msg.state] = tip_states.get(msg.state, 0) + 1
                elif isinstance(msg, TipAlert):
                    alerts.append({"uid": msg.uid, "row": msg.row, "from": msg.previous, "to": msg.state})
                elif isinstance(msg, LocMap):
                    locmaps.append(msg)
                elif isinstance(msg, Status):
                    status = msg
                    if finished is not None and msg.t > finished and _localized(settings, locmaps, finals):
                        deadline = 0.0
                elif isinstance(msg, Frame) and msg.kind == "reconstructed":
                    latencies.append(msg.latency_s)
                    if msg.final and msg.channel == SCORED_CHANNEL and msg.direction == "forward":
                        finals[msg.uid] = msg
            if finished is None and len(finals) >= demo.frames:
                finished, elapsed = time.time(), time.monotonic() - started
                wait = LOCALIZATION_WAIT_S if settings.localize.enabled else 3 * settings.daemon.status_interval_s
                deadline = min(deadline, time.monotonic() + wait)
        if finished is None:
            raise TimeoutError(f"only {len(finals)} of {demo.frames} frames finished within {timeout_s:.0f} s")
    finally:
        closing = (sim, daemon, viewer if view_mode == "snapshots" else None)
        for proc in closing:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in closing:
            if proc is not None:
                proc.wait(timeout=30)
        frames_sock.close(0)
        truth_sock.close(0)
        context.term()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    model = create_engine("model")
    scores = [_score(uid, frame, truths[uid], model) for uid, frame in sorted(finals.items())
              if uid in truths and np.isfinite(frame.image).all()]
    lines = status.counters.get("lines", 0) if status else 0
    lat = np.asarray(latencies) * 1000
    return {
        "plan": demo.plan, "frames": demo.frames, "size": demo.size, "line_rate_hz": demo.line_rate_hz,
        "engine": status.engine if status else "unknown",
        "lines_received": lines, "lines_per_s": round(lines / elapsed, 1) if elapsed else 0.0,
        "dropped": status.counters.get("dropped", 0) if status else None,
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2), "p99": round(float(np.percentile(lat, 99)), 2),
                       "n": int(lat.size)} if lat.size else {},
        "tip": {"simulated": demo.tip, "true_states": true_tip, "readings_by_state": tip_states, "alerts": alerts},
        "frames_scored": len(scores), "scores": scores,
        "mean": {key: {m: round(float(np.mean([sc[key][m] for sc in scores])), 4) for m in ("psnr_db", "ssim")}
                 for key in ("engine", "classical", "model")} if scores else {},
        "localization": _locmap_summary(locmaps),
        "recording": str(Path(record_dir)) if record_dir else "(temporary, removed)",
        "viewer": {"window": "a viewer window stays open", "snapshots": f"PNG snapshots in {demo.snapshot_dir}/",
                   "off": "off"}[view_mode],
    }


def _localized(settings: Settings, locmaps: list[LocMap], finals: dict[str, Frame]) -> bool:
    """True once the last scan has its localization map (or none is coming)."""
    return not settings.localize.enabled or any(m.uid == next(reversed(finals)) for m in locmaps)


def _locmap_summary(locmaps: list[LocMap]) -> dict[str, Any]:
    if not locmaps:
        return {"maps": 0}
    last = locmaps[-1]
    return {"maps": len(locmaps), "last": {"uid": last.uid, "direction": last.direction, "atoms": last.atoms.shape[1],
                                           "bravais": last.bravais, "lattice": last.lattice, "motion": last.motion,
                                           "samples": last.samples, "method": last.method}}


def _viewer_ready(view_mode: str, snapshot_dir: str) -> bool:
    """Headless, the viewer's first snapshot says it is up and subscribed: scan only then."""
    return view_mode != "snapshots" or (Path(snapshot_dir) / "view-0000.png").exists()


def _view_mode(setting: str) -> str:
    if setting != "auto":
        return setting
    return "window" if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") else "snapshots"


def _score(uid: str, frame: Frame, truth: np.ndarray, model: Reconstructor) -> dict[str, Any]:
    """The daemon's reconstruction and, for comparison, the classical and the learned one of the
    same measurement, all against the full scan."""
    truth = truth.astype(np.float64)
    measured = np.where(frame.mask, frame.image, np.nan)[None]
    classical = reconstruct_exact(ClassicalReconstructor(), measured, frame.mask[None]).images[0]
    learned = reconstruct_exact(model, measured, frame.mask[None]).images[0]
    out: dict[str, Any] = {"uid": uid, "rows_measured": frame.rows_seen, "method": frame.method}
    for key, image in (("engine", frame.image), ("classical", classical), ("model", learned)):
        q = quality(truth, image.astype(np.float64))
        out[key] = {"psnr_db": round(q.psnr, 2), "ssim": round(q.ssim, 4)}
    return out


def format_summary(s: dict[str, Any]) -> str:
    lat = s["latency_ms"]
    rows = [
        f"stm-live demo: {s['frames']} frame(s) of {s['size']}x{s['size']} px, plan {s['plan']}, "
        f"{s['line_rate_hz']:g} rows/s, engine {s['engine']}",
        f"  lines received      {s['lines_received']} ({s['lines_per_s']} lines/s, dropped {s['dropped']})",
        f"  reconstruction      latency p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms (line arrival -> frame, n={lat.get('n')})",
    ]
    for sc in s["scores"]:
        e, m = sc["engine"], sc["model"]
        rows.append(f"  {sc['uid']} ({sc['rows_measured']} rows measured) vs the full scan: daemon ({sc['method']}) "
                    f"{e['psnr_db']:.2f} dB / SSIM {e['ssim']:.4f}; learned model {m['psnr_db']:.2f} dB / SSIM {m['ssim']:.4f}")
    if s["mean"]:
        e, c, m = s["mean"]["engine"], s["mean"]["classical"], s["mean"]["model"]
        rows.append(f"  mean                daemon ({s['engine']}) {e['psnr_db']:.2f} dB / SSIM {e['ssim']:.4f}; "
                    f"classical {c['psnr_db']:.2f} dB; learned model {m['psnr_db']:.2f} dB / SSIM {m['ssim']:.4f}")
    tip = s["tip"]
    rows.append(f"  tip monitor         simulated tip '{tip['simulated']}'; readings by state {tip['readings_by_state']}; "
                f"{len(tip['alerts'])} alert(s)")
    rows.extend(f"    alert {a['uid']} row {a['row']}: {a['from']} -> {a['to']}" for a in tip["alerts"])
    loc = s["localization"]
    if loc["maps"]:
        last = loc["last"]
        lattice = (f"{last['bravais']} a={last['lattice']['a_nm']:.3f} nm" if last["lattice"] else "no lattice")
        rows.append(f"  localization        {loc['maps']} map(s); last {last['uid']} {last['direction']}: "
                    f"{last['atoms']} atoms from {last['samples']} {last['method']} reconstructions, {lattice} (inferred)")
    else:
        rows.append("  localization        no map arrived before the demo ended")
    rows.append(f"  recording           {s['recording']}")
    rows.append(f"  viewer              {s['viewer']}")
    return "\n".join(rows)
