"""The `stm-live` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from stm_live.config import ConfigError, Settings, TipSettings, dataclass_from_toml, load_settings, settings_as_toml
from stm_live.fuzz import TARGETS as FUZZ_TARGETS
from stm_live.security import SecurityError


def _settings(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> Settings:
    return load_settings(args.config, overrides)


def _security(settings: Settings):
    from stm_live.security import from_settings

    return from_settings(settings.security.curve, settings.security.keys_dir)


def _print_json(result: dict[str, Any], path: str | None) -> None:
    """Print a result as JSON and, when asked, write the same text to a file."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        with open(path, "w") as fh:
            fh.write(text + "\n")


def _stop_on_signals(stop) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop())


def cmd_run(args: argparse.Namespace) -> int:
    from stm_live.daemon import Daemon

    settings = _settings(args, {"daemon": {
        "input": args.input, "output": args.output, "record_dir": args.record, "engine": args.engine,
        "reconstruct_every_lines": args.every,
    }})
    daemon = Daemon(settings)
    _stop_on_signals(daemon.stop)
    daemon.run()
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from stm_live.sim.instrument import SimInstrument

    settings = _settings(args, {"sim": {
        "bind": args.bind, "frames": args.frames, "size": args.size, "plan": args.plan,
        "line_rate_hz": args.line_rate, "seed": args.seed, "wait_topics": args.wait_topic,
        "surface": args.surface, "tip": args.tip, "frame_nm": args.frame_nm,
    }})
    s = settings.sim
    stopping = []
    _stop_on_signals(lambda: stopping.append(True))
    instrument = SimInstrument(s.bind, size=s.size, plan=s.plan, line_rate_hz=s.line_rate_hz, seed=s.seed,
                               surface=s.surface, tip=s.tip, frame_nm=s.frame_nm, artefacts=s.artefacts,
                               actions=settings.conditioning.endpoint if s.tip == "episode" else "",
                               gate=_gate(settings), degrade_probability=s.degrade_probability,
                               pulse_outcomes=s.pulse_outcomes, security=_security(settings))
    try:
        sent = instrument.run(s.frames, s.wait_subscriber_s, lambda: bool(stopping), s.wait_topics)
    finally:
        instrument.close()
    logging.getLogger("stm_live.sim").info("sent %d lines", sent)
    return 0


def cmd_sim_dataset(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stm_live.sim.dataset import generate

    with tqdm(total=args.n, unit="frame", desc="simulating") as bar:
        result = generate(args.out, args.n, seed=args.seed, size_px=args.size, shard_size=args.shard_size,
                          workers=args.workers, surface=args.surface, scenario=args.tip, progress=bar.update)
    print(json.dumps(result, indent=2))
    return 0


def cmd_sim_images(args: argparse.Namespace) -> int:
    from stm_live.sim.dataset import write_images

    for path in write_images(args.out, args.n, args.seed, args.size, args.tip):
        print(path)
    return 0


def cmd_sim_compare(args: argparse.Namespace) -> int:
    from stm_live.sim.compare import compare_real

    _print_json(compare_real(args.real, args.out), args.json)
    return 0


def _gate(settings: Settings):
    """The driver-side limits for conditioning requests; None when conditioning is off."""
    from stm_live.drivers.conditioning import ConditioningGate, ConditioningLimits

    c = settings.conditioning
    if not c.enabled:
        return None
    return ConditioningGate(ConditioningLimits(c.max_bias_v, c.max_pulse_width_s, c.max_dip_nm, c.min_interval_s,
                                               c.dry_run))


def cmd_drive_nanonis(args: argparse.Namespace) -> int:
    from stm_live.drivers.nanonis import NanonisDriver
    from stm_live.drivers.nanonis_client import NanonisClient
    from stm_live.drivers.publisher import InstrumentPublisher

    settings = _settings(args, {"nanonis": {"host": args.host, "port": args.port, "bind": args.bind,
                                            "plan": args.plan, "start_scans": args.start or None}})
    n = settings.nanonis
    security = _security(settings)
    publisher = InstrumentPublisher(n.bind, source="nanonis", security=security)
    driver = NanonisDriver(NanonisClient(n.host, n.port, n.timeout_s), publisher, plan=n.plan,
                           start_scans=n.start_scans, poll_s=n.poll_s, reconnect_s=n.reconnect_s,
                           gate=_gate(settings), actions_endpoint=settings.conditioning.endpoint, security=security)
    stopping: list[bool] = []
    _stop_on_signals(lambda: stopping.append(True))
    try:
        driver.run(lambda: bool(stopping), max_scans=args.scans)
    finally:
        publisher.close()
    return 0


def cmd_drive_replay(args: argparse.Namespace) -> int:
    from stm_live.drivers.publisher import InstrumentPublisher
    from stm_live.drivers.replay import ReplayDriver
    from stm_live.drivers.scanfiles import ScanFileError

    settings = _settings(args, {"replay": {"bind": args.bind, "line_rate_hz": args.line_rate, "plan": args.plan}})
    r = settings.replay
    publisher = InstrumentPublisher(r.bind, source="replay", security=_security(settings))
    stopping: list[bool] = []
    _stop_on_signals(lambda: stopping.append(True))
    try:
        if args.wait_subscriber and not publisher.wait_for_subscriber(args.wait_subscriber):
            logging.getLogger("stm_live.replay").warning("no subscriber after %.0f s; replaying anyway",
                                                         args.wait_subscriber)
        sent = ReplayDriver(publisher, r.plan, r.line_rate_hz, args.size_nm).replay(args.files, lambda: bool(stopping))
    except ScanFileError as exc:
        print(f"stm-live: {exc}", file=sys.stderr)
        return 4
    finally:
        publisher.close()
    logging.getLogger("stm_live.replay").info("published %d lines", sent)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.what == "tip":
        return _train_tip(args)
    if args.what == "molecules":
        return _train_molecules(args)
    from stm_live.models.training import TrainConfig, train

    summary = train(dataclass_from_toml(TrainConfig, args.train_config), resume=not args.restart)
    _print_json(summary, None)
    return 0


def _train_molecules(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stm_live.localize.molecules import MoleculeDetector, evaluate_detector, train_detector

    frames, epochs = args.frames or 2000, args.epochs or 15
    with tqdm(total=frames, unit="frame", desc="simulating") as bar:
        summary = train_detector(frames, epochs, progress=bar.update)
    summary["validation"] = evaluate_detector(MoleculeDetector(), 100, seed=10_000)
    _print_json(summary, args.json)
    return 0


def _train_tip(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stm_live.tip.training import TipTrainConfig, frames_to_simulate, train_tip

    cfg = replace(dataclass_from_toml(TipTrainConfig, args.train_config),
                  **({"frames": args.frames} if args.frames else {}),
                  **({"epochs": args.epochs} if args.epochs else {}),
                  **({"long_frames": args.long_frames} if args.long_frames is not None else {}),
                  **({"weights": args.weights} if args.weights else {}),
                  **({"real_good": tuple(args.real_good)} if args.real_good else {}))
    with tqdm(total=frames_to_simulate(cfg), unit="frame", desc="simulating") as bar:
        summary = train_tip(cfg, bar.update)
    _print_json(summary, args.json)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from stm_live.engines.registry import create_engine
    from stm_live.evaluation import evaluate

    model = None if args.no_model else create_engine("model")
    _print_json(evaluate(args.images, args.plan, model, args.plot), args.json)
    return 0


def cmd_eval_tip(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stm_live.tip.classifier import TipClassifier
    from stm_live.tip.evaluation import evaluate_tip, monitor_scan_file, plot_scan_files

    logging.getLogger("stm_live.tip.monitor").setLevel(logging.ERROR)
    schedule = _tip_schedule(args)
    classifier = TipClassifier(Path(args.weights)) if args.weights else TipClassifier()
    if args.real:
        results = [monitor_scan_file(path, classifier, schedule.hop, event_mads=schedule.event_mads)
                   for path in args.real]
        if args.plot:
            plot_scan_files(results, args.plot)
        hidden = ("image", "state", "p_degraded")
        _print_json({"scans": [{k: v for k, v in r.items() if k not in hidden} for r in results]}, args.json)
        return 0
    with tqdm(total=5 * args.episodes, unit="episode", desc="evaluating") as bar:
        result = evaluate_tip(classifier, args.episodes, args.stride, schedule.hop, bar.update, args.size,
                              schedule.event_mads)
    _print_json(result, args.json)
    return 0


def cmd_eval_locate(args: argparse.Namespace) -> int:
    from stm_live.engines.registry import create_engine
    from stm_live.localize.evaluation import evaluate

    engine = create_engine(args.engine)
    _print_json(evaluate(engine, args.frames, args.lattice_frames, args.samples, args.plan, args.size, args.seed,
                         args.plot, args.plot_surface, drift_pairs=args.drift_pairs), args.json)
    return 0


def cmd_locate(args: argparse.Namespace) -> int:
    from stm_live.engines.registry import create_engine
    from stm_live.localize.evaluation import locate_file
    from stm_live.localize.figures import plot_locate

    report, locmap, image, mask = locate_file(args.file, create_engine(args.engine), args.plan, args.spacing,
                                              args.samples, args.seed, args.crops)
    if args.plot:
        plot_locate(report, locmap, image, mask, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    shown = report if args.atoms else {k: v for k, v in report.items() if k != "atoms"}
    shown["molecule_count"] = len(report["molecules"])
    _print_json(shown, None)
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    import os

    stopping: list[bool] = []
    _stop_on_signals(lambda: stopping.append(True))
    if args.offscreen or not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from stm_live.viewer.window import run_viewer

    settings = _settings(args, {})
    connect = args.connect or settings.daemon.output.replace("*", "127.0.0.1")
    if args.nice and hasattr(os, "nice"):
        os.nice(args.nice)
    code = run_viewer(connect, args.snapshots, args.every, args.seconds, args.stats, _security(settings),
                      lambda: bool(stopping))
    # PySide6 can crash while the interpreter finalises its objects; everything is written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_tap(args: argparse.Namespace) -> int:
    from stm_live.tap import tap, to_json

    security = _security(_settings(args, {}))
    for summary in tap(args.connect, args.count, args.timeout, tuple(args.topic or [""]), security=security):
        print(to_json(summary), flush=True)
    return 0


def cmd_crops(args: argparse.Namespace) -> int:
    from stm_live.localize.requests import request_crops

    settings = _settings(args, {})
    endpoint = args.connect or settings.localize.requests
    if not endpoint:
        print("stm-live crops: no endpoint (--connect, or localize.requests in the config)", file=sys.stderr)
        return 2
    try:
        reply = request_crops(endpoint, args.channel, args.direction, args.box, args.timeout,
                              security=_security(settings))
    except (TimeoutError, ValueError) as exc:
        print(f"stm-live crops: {exc}", file=sys.stderr)
        return 5
    print(json.dumps(reply, indent=2))
    return 0 if reply["outcome"] == "queued" else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from stm_live.demo import format_summary, run_demo

    settings = _settings(args, {"demo": {
        "frames": args.frames, "size": args.size, "plan": args.plan, "line_rate_hz": args.line_rate,
        "seed": args.seed, "tip": args.tip, "view": args.view, "snapshot_dir": args.snapshots,
    }})
    summary = run_demo(settings, record_dir=args.record)
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0 if summary["frames_scored"] else 1


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    from stm_live.bench import bench_ingest

    result = bench_ingest(_settings(args, {}), lines=args.lines, cols=args.cols, channels=args.channels,
                          rate=args.rate, export_hdf5=args.hdf5)
    _print_json(result, args.json)
    return 0 if result["dropped"] == 0 else 1


def cmd_bench_sim(args: argparse.Namespace) -> int:
    from stm_live.bench import bench_sim

    _print_json(bench_sim(args.frames, args.size, args.workers), args.json)
    return 0


def cmd_bench_infer(args: argparse.Namespace) -> int:
    from stm_live.bench import bench_infer

    _print_json(bench_infer(args.engine, tuple(args.sizes), args.repeats, args.threads, args.backend,
                            half=args.half), args.json)
    return 0


def cmd_bench_e2e(args: argparse.Namespace) -> int:
    from stm_live.bench import bench_e2e

    _print_json(bench_e2e(_settings(args, {}), args.engine, args.frames, args.size, args.plan, args.rate,
                          args.every, args.localize), args.json)
    return 0


def cmd_bench_tip(args: argparse.Namespace) -> int:
    from stm_live.bench import bench_tip

    schedule = _tip_schedule(args)
    _print_json(bench_tip(args.cols, args.rows, schedule.hop, args.threads, args.tip, schedule.event_mads), args.json)
    return 0


def _tip_schedule(args: argparse.Namespace) -> TipSettings:
    """When the monitor reads a window, as the daemon would (config, env), unless --hop / --event-mads say otherwise."""
    return _settings(args, {"tip": {"hop": args.hop, "event_mads": args.event_mads}}).tip


def cmd_bench_view(args: argparse.Namespace) -> int:
    from stm_live.bench import bench_view

    _print_json(bench_view(args.rate, args.cols, args.seconds, args.repeats, args.null_subscriber), args.json)
    return 0


def cmd_bench_fuzz(args: argparse.Namespace) -> int:
    from stm_live.fuzz import fuzz

    result = fuzz(args.seconds, args.seed, args.crashes, tuple(args.target or FUZZ_TARGETS))
    _print_json(result, args.json)
    return 1 if result["crashes"] else 0


def cmd_bench_soak(args: argparse.Namespace) -> int:
    from stm_live.bench import bench_soak

    result = bench_soak(args.lines, args.size, args.rate)
    _print_json(result, args.json)
    return 1 if result["lost"] or result["dropped"] else 0


def cmd_engines(args: argparse.Namespace) -> int:
    from stm_live.engines.runners import describe_backends

    for row in describe_backends(_settings(args, {}).daemon.runner_options()):
        print(f"{row['backend']:<12} {'yes' if row['available'] else 'no ':<4} {row['detail']}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from stm_live.security import generate_keys

    _print_json(generate_keys(args.dir), None)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(settings_as_toml(_settings(args, {})), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stm-live", description=__doc__)
    parser.add_argument("--config", help="TOML settings file (default: $STM_LIVE_CONFIG, else built-in defaults)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the streaming daemon")
    p.add_argument("--input", help="instrument endpoint to connect to")
    p.add_argument("--output", help="endpoint to bind for frames and status")
    p.add_argument("--record", help="directory for journals and HDF5 files ('' disables recording)")
    p.add_argument("--engine", help="reconstruction engine: classical, model, linear, biharmonic or none")
    p.add_argument("--every", type=int, help="progressive reconstruction every N lines (0: at scan end only)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sim", help="a simulated instrument streaming synthetic scans")
    p.add_argument("--bind", help="endpoint to bind")
    p.add_argument("--frames", type=int)
    p.add_argument("--size", type=int, help="frame edge in pixels")
    p.add_argument("--plan", help="sampling plan, e.g. full, lines:4, pixels:0.25, sr:4, partial:64")
    p.add_argument("--line-rate", type=float, help="rows per second")
    p.add_argument("--seed", type=int)
    p.add_argument("--surface", help="si111_7x7, si001_h, au111, graphite, graphene, cu111, ag111, "
                                     "molecular_layer, supramolecules")
    p.add_argument("--tip", help="tip scenario: good, blunt, multi, unstable, change")
    p.add_argument("--frame-nm", type=float, help="frame edge in nm (0: typical for the surface)")
    p.add_argument("--wait-topic", action="append", help="start scanning once these topics have subscribers")
    p.set_defaults(func=cmd_sim)
    tasks = p.add_subparsers(dest="sim_command")
    d = tasks.add_parser("dataset", help="write training shards of simulated frames")
    d.add_argument("--out", required=True)
    d.add_argument("--n", type=int, required=True, help="number of frames")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--size", type=int, default=256)
    d.add_argument("--shard-size", type=int, default=64)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--surface", help="only this surface (default: all)")
    d.add_argument("--tip", help="only this tip scenario (default: a mix)")
    d.set_defaults(func=cmd_sim_dataset)
    i = tasks.add_parser("images", help="write forward heights of simulated frames as .npy, for stm-live eval")
    i.add_argument("--out", required=True)
    i.add_argument("--n", type=int, default=18, help="number of frames, cycling through the nine surfaces")
    i.add_argument("--seed", type=int, default=4242)
    i.add_argument("--size", type=int, default=256)
    i.add_argument("--tip", default="good", help="tip scenario")
    i.set_defaults(func=cmd_sim_images)
    c = tasks.add_parser("compare-real", help="figures and spectra: simulator next to the real scans")
    c.add_argument("--out", default="docs/img")
    c.add_argument("--real", default="../shared/data/real")
    c.add_argument("--json", help="also write the measured comparison here")
    c.set_defaults(func=cmd_sim_compare)

    p = sub.add_parser("drive", help="instrument drivers: publish a controller's or a file's scans")
    drivers = p.add_subparsers(dest="driver", required=True)
    d = drivers.add_parser("nanonis", help="follow (or start) scans on a Nanonis controller over TCP")
    d.add_argument("--host")
    d.add_argument("--port", type=int)
    d.add_argument("--bind", help="endpoint to publish on")
    d.add_argument("--plan", help="full, lines:K, sr:K or partial:N (with --start)")
    d.add_argument("--start", action="store_true", help="start scans with the plan instead of following")
    d.add_argument("--scans", type=int, help="stop after this many scans")
    d.set_defaults(func=cmd_drive_nanonis)
    d = drivers.add_parser("replay", help="replay .sxm, .dat, .sm4 or .npy files line by line")
    d.add_argument("files", nargs="+")
    d.add_argument("--bind", help="endpoint to publish on")
    d.add_argument("--line-rate", type=float, help="rows per second (0: the file's own line time)")
    d.add_argument("--plan", help="publish only this plan's pixels of each recorded frame")
    d.add_argument("--size-nm", type=float, help="frame size of .npy files")
    d.add_argument("--wait-subscriber", type=float, default=10.0, help="seconds to wait for a subscriber")
    d.set_defaults(func=cmd_drive_replay)

    p = sub.add_parser("train", help="train the reconstruction model (default) or the tip classifier (`train tip`)")
    p.add_argument("what", nargs="?", choices=("reconstruction", "tip", "molecules"), default="reconstruction")
    p.add_argument("--train-config", help="TOML file overriding the training defaults (stm_live/models/training.py; "
                                           "for `train tip`, TipTrainConfig in stm_live/tip/training.py)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--frames", type=int, help="tip, molecules: simulated training frames")
    p.add_argument("--epochs", type=int, help="tip, molecules: training epochs")
    p.add_argument("--long-frames", type=int, help="tip: simulated training frames of 512-pixel lines (0: none)")
    p.add_argument("--weights", help="tip: where to write the weights (default: the shipped ones, replaced)")
    p.add_argument("--real-good", nargs="+", metavar="SCAN",
                   help="tip: recorded scans (in ../shared/data/real) whose tip is good, added to training")
    p.add_argument("--json", help="tip, molecules: write the summary here too")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="PSNR/SSIM of the model and classical baselines on images")
    p.add_argument("images", nargs="+", help=".sxm (forward height) or .npy (2-D) files")
    p.add_argument("--plan", required=True)
    p.add_argument("--json", help="write the result here too")
    p.add_argument("--plot", help="write a figure: original, measured, reconstructions, error maps")
    p.add_argument("--no-model", action="store_true", help="baselines only")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-tip", help="`stm-live eval tip`: tip monitor AUROC, delay, false alerts on simulator episodes")
    p.add_argument("--episodes", type=int, default=100, help="episodes per tip scenario")
    p.add_argument("--stride", type=int, default=1, help="monitor every stride-th row (a lines:K scan)")
    p.add_argument("--hop", type=int, help="classify every hop rows (default: tip.hop)")
    p.add_argument("--event-mads", type=float, help="also classify a row that stands out by this many median "
                   "absolute deviations, 0: off (default: tip.event_mads)")
    p.add_argument("--size", type=int, default=256, help="pixels per line and lines per simulated frame")
    p.add_argument("--real", nargs="+", help="instead: run the monitor over these recorded scans (.sxm, .sm4, ...)")
    p.add_argument("--plot", help="with --real: write a figure of the rows the monitor flags")
    p.add_argument("--weights", help="classifier weights to evaluate (default: the shipped ones)")
    p.add_argument("--json", help="write the result here too")
    p.set_defaults(func=cmd_eval_tip)

    p = sub.add_parser("eval-locate", help="`stm-live eval locate`: atom positions, localization maps and lattices "
                                           "against simulator truth")
    p.add_argument("--frames", type=int, default=6, help="frames per surface for atom positions")
    p.add_argument("--lattice-frames", type=int, default=50, help="molecular-layer frames for the lattice analysis")
    p.add_argument("--drift-pairs", type=int, default=20, help="pairs of successive frames per surface for drift")
    p.add_argument("--samples", type=int, default=32, help="stochastic reconstructions per localization map")
    p.add_argument("--plan", default="lines:4")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--engine", default="classical")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", help="write a figure of one simulated frame with the true atoms")
    p.add_argument("--plot-surface", default="si111_7x7", help="the surface of that frame")
    p.add_argument("--json", help="write the result here too")
    p.set_defaults(func=cmd_eval_locate)

    p = sub.add_parser("locate", help="atoms (localization map) and lattice of a recorded scan")
    p.add_argument("file", help=".sxm, .sm4, .dat or .npy scan")
    p.add_argument("--plan", default="full", help="scan it through this plan first (e.g. lines:4) to see a sparse scan")
    p.add_argument("--spacing", type=float, help="atom spacing in nm (default: from the dominant Fourier period)")
    p.add_argument("--samples", type=int, default=32, help="stochastic reconstructions")
    p.add_argument("--engine", default="classical")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atoms", action="store_true", help="list every atom in the output")
    p.add_argument("--crops", action="store_true",
                   help="localize each detected molecule on its own 4x super-resolved crop (Localization-STM)")
    p.add_argument("--plot", help="write a figure: scan, reconstruction, localization map")
    p.add_argument("--json", help="write the result (with every atom) here too")
    p.set_defaults(func=cmd_locate)

    p = sub.add_parser("view", help="the live viewer: measured, reconstructed and uncertainty, tip state and alerts")
    p.add_argument("--connect", help="the daemon's output endpoint (default: daemon.output)")
    p.add_argument("--snapshots", help="write a PNG of the view to this directory every --every seconds")
    p.add_argument("--every", type=float, default=3.0, help="seconds between snapshots")
    p.add_argument("--seconds", type=float, help="quit after this many seconds")
    p.add_argument("--offscreen", action="store_true", help="render without a display (implied when there is none)")
    p.add_argument("--stats", help="at exit, write render rate and memory use as JSON here")
    p.add_argument("--nice", type=int, default=10,
                   help="lower the viewer's CPU priority by this much (POSIX), so that on a busy machine the "
                        "daemon and the instrument's software come first; 0 = unchanged")
    p.set_defaults(func=cmd_view)

    p = sub.add_parser("tap", help="print one JSON line per message on an endpoint")
    p.add_argument("--connect", required=True)
    p.add_argument("--count", type=int)
    p.add_argument("--timeout", type=float, help="seconds to listen")
    p.add_argument("--topic", action="append", help="only these message types (repeatable)")
    p.set_defaults(func=cmd_tap)

    p = sub.add_parser("crops", help="ask the daemon to localize the molecules of its newest map on their own "
                                     "super-resolved crops (published as that frame's locmap again)")
    p.add_argument("--connect", help="the daemon's localize.requests endpoint (default: from the config)")
    p.add_argument("--channel", default="Z")
    p.add_argument("--direction", default="forward", choices=("forward", "backward"))
    p.add_argument("--box", nargs=4, type=float, action="append", metavar=("X0", "Y0", "X1", "Y1"),
                   help="a box in nm instead of the detected molecules (repeatable)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply")
    p.set_defaults(func=cmd_crops)

    p = sub.add_parser("demo", help="simulator -> daemon on loopback, with a quality and latency summary")
    p.add_argument("--frames", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--plan")
    p.add_argument("--line-rate", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--tip", help="simulated tip scenario: good, blunt, multi, unstable, change")
    p.add_argument("--view", choices=("auto", "window", "snapshots", "off"), help="the live viewer (default: auto)")
    p.add_argument("--snapshots", help="directory for headless viewer snapshots (default: demo-view)")
    p.add_argument("--record", help="keep the recording here (default: a temporary directory)")
    p.add_argument("--json", help="also write the summary as JSON")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks (JSON output)")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("ingest", help="sustained lines/s through decode + assembly + record")
    b.add_argument("--lines", type=int, default=200_000)
    b.add_argument("--cols", type=int, default=512)
    b.add_argument("--channels", type=int, default=2)
    b.add_argument("--rate", type=float, default=0.0, help="offered lines/s (0: as fast as the sender can)")
    b.add_argument("--hdf5", action="store_true", help="also run the per-scan HDF5 export")
    b.add_argument("--json", help="write the result here too")
    b.set_defaults(func=cmd_bench_ingest)
    b = bench.add_parser("sim", help="simulated training frames per second (shards written)")
    b.add_argument("--frames", type=int, default=2048)
    b.add_argument("--size", type=int, default=256)
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--json", help="write the result here too")
    b.set_defaults(func=cmd_bench_sim)
    b = bench.add_parser("infer", help="reconstruction latency per frame at batch 1, frames/s at batch 1, 8, 32")
    b.add_argument("--engine", default="model")
    b.add_argument("--backend", default="auto",
                   help="for the model: auto, tensorrt, torch-cuda, onnxruntime, torch-cpu")
    b.add_argument("--half", action="store_true", help="half precision on CUDA backends")
    b.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    b.add_argument("--repeats", type=int, default=30)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--json", help="write the result here too")
    b.set_defaults(func=cmd_bench_infer)

    b = bench.add_parser("e2e", help="line arrival -> published frame through the daemon, simulator at a line rate")
    b.add_argument("--engine", default="model")
    b.add_argument("--frames", type=int, default=2)
    b.add_argument("--size", type=int, default=256)
    b.add_argument("--plan", default="lines:4")
    b.add_argument("--rate", type=float, default=20.0, help="lines/s the simulator scans at (0 = simulated line time)")
    b.add_argument("--every", type=int, default=1, help="reconstruct every N lines (daemon.reconstruct_every_lines)")
    b.add_argument("--localize", action="store_true", help="with the localization thread on")
    b.add_argument("--json", help="write the result here too")
    b.set_defaults(func=cmd_bench_e2e)

    b = bench.add_parser("tip", help="tip monitor cost per line (features every row, classifier every hop rows "
                                     "and on rows that stand out)")
    b.add_argument("--cols", type=int, default=512)
    b.add_argument("--rows", type=int, default=1024)
    b.add_argument("--hop", type=int, help="default: tip.hop")
    b.add_argument("--event-mads", type=float, help="default: tip.event_mads")
    b.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for the classifier")
    b.add_argument("--tip", choices=("good", "blunt", "multi"), default="good",
                   help="the simulated tip: windows a good tip leaves in no doubt take one classifier pass, "
                        "others two (the window and its mirror image)")
    b.add_argument("--json", help="write the result here too")
    b.set_defaults(func=cmd_bench_tip)

    b = bench.add_parser("view", help="daemon latency with and without the live viewer; the viewer's render rate and memory")
    b.add_argument("--rate", type=float, default=10_000.0, help="lines/s offered")
    b.add_argument("--cols", type=int, default=256)
    b.add_argument("--seconds", type=float, default=20.0)
    b.add_argument("--repeats", type=int, default=3, help="pairs of runs, without and with the viewer, alternating")
    b.add_argument("--null-subscriber", action="store_true",
                   help="a third arm per round: a subscriber that discards what the viewer takes")
    b.add_argument("--json", help="write the result here too")
    b.set_defaults(func=cmd_bench_view)

    b = bench.add_parser("fuzz", help="mutated inputs into every decoder; only their own errors may come out")
    b.add_argument("--seconds", type=float, default=60.0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--target", action="append", choices=FUZZ_TARGETS)
    b.add_argument("--crashes", default="fuzz-crashes", help="directory for inputs that crashed a decoder")
    b.add_argument("--json", help="write the result here too")
    b.set_defaults(func=cmd_bench_fuzz)

    b = bench.add_parser("soak", help="N lines simulator -> daemon -> subscriber: drops, latency p99 over time, memory")
    b.add_argument("--lines", type=int, default=1_000_000)
    b.add_argument("--size", type=int, default=256)
    b.add_argument("--rate", type=float, default=10_000.0, help="lines/s offered (forward and backward)")
    b.add_argument("--json", help="write the result here too")
    b.set_defaults(func=cmd_bench_soak)

    p = sub.add_parser("engines", help="list the model's inference backends here, and why any is missing")
    p.set_defaults(func=cmd_engines)

    p = sub.add_parser("keys", help="CURVE key pairs for remote links (server, client, allow-list)")
    p.add_argument("--dir", default="keys", help="where to write them (security.keys_dir)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("config", help="print the resolved settings as TOML")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import zmq

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] in (["eval", "tip"], ["eval", "locate"]):
        argv[:2] = [f"eval-{argv[1]}"]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"stm-live: configuration error: {exc}", file=sys.stderr)
        return 2
    except zmq.ZMQError as exc:
        print(f"stm-live: cannot use endpoint: {exc}", file=sys.stderr)
        return 3
    except SecurityError as exc:
        print(f"stm-live: {exc}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
