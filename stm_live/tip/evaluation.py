"""`stm-live eval tip`: how well and how fast the monitor tells a bad tip, on simulator episodes.

Episodes are simulated frames streamed row by row through a TipMonitor exactly as the daemon
runs it (same features, classifier, hop and state machine), on seeds the classifier never saw:
- window scores: AUROC of P(degraded) for good vs degraded rows, and one-vs-rest AUROC per
  state, each window labelled by the tip state of its newest row; for the monitor's belief
  (filtered over windows, what it publishes) and for single windows alone;
- tip changes: a good tip turns blunt or multi mid-frame, in a rescan of an area it has just
  scanned (the monitor reads on from the last scan's rows); the delay is the number of rows from
  the change to the alert (alerts before the change count as false alerts; no alert in the
  frame as missed, and for those, whether the next scan of the area, the new tip throughout,
  raises it);
- clean frames: good tips through one monitor, each area scanned twice in a row (a rescan reads
  on from the scan before); false alerts per 100 frames;
- visibility: the same AUROCs with degraded windows kept only where the degradation changed the
  image enough to be seen at all (episodes.degradation_visibility): in the window itself for
  single windows, in any row since the tip degraded for the monitor's belief, which remembers;
- whole frames: each steady frame (blunt, multi, unstable or clean) scored by the mean of its
  windows' probabilities, as the published whole-image classifiers are measured;
- steady frames alerted: of the frames scanned with a degraded tip from their first row (a
  session that starts with a bad tip), how many raise an alert at all, how many name the kind
  in their first alert, and the row of that alert.
Recorded scans (.sxm, ...) run through the same monitor row by row give the rows it flags.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from stm_live.drivers.scanfiles import ScanFileError, read_scan_file
from stm_live.protocol import TIP_STATES
from stm_live.sim.scan import acquisition_rows
from stm_live.tip.classifier import WINDOW_ROWS, TipClassifier
from stm_live.tip.episodes import RowSequence, evaluation_sequences
from stm_live.tip.monitor import GOOD, DEFAULTS, TipMonitor

EVALUATION_SEED = 1_000_003
VISIBILITY_THRESHOLDS = (20.0, 100.0, 500.0)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U); None when one class is absent."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


Reading = tuple[int, np.ndarray, np.ndarray]


def stream(monitor: TipMonitor, sequence: RowSequence, uid: str) -> tuple[list[Reading], list[tuple[int, str]]]:
    """Feed one sequence; returns (acquired index, window probabilities, monitor belief) per window
    and (index, new state) per alert."""
    monitor.start_scan(uid, sequence.pixel_nm, ("forward", "backward"))
    readings, alerts = [], []
    for i in range(len(sequence.labels)):
        monitor.add_line(uid, i, "forward", sequence.forward[i])
        reading, transition = monitor.add_line(uid, i, "backward", sequence.backward[i])
        if reading is not None:
            readings.append((i, np.array([reading.window_probabilities[c] for c in TIP_STATES]),
                             np.array([reading.probabilities[c] for c in TIP_STATES])))
        if transition is not None:
            alerts.append((i, transition.state))
    monitor.end_scan(uid)
    return readings, alerts


def _collect(readings: list[Reading], sequence: RowSequence, scores: list, beliefs: list, labels: list,
             surfaces: list, visible: list) -> None:
    seen = np.maximum.accumulate(sequence.visibility)
    for i, window, belief in readings:
        scores.append(window)
        beliefs.append(belief)
        labels.append(int(sequence.labels[i]))
        surfaces.append(sequence.surface)
        visible.append((sequence.visibility[max(0, i - WINDOW_ROWS + 1):i + 1].max(), seen[i]))


def _aurocs(p: np.ndarray, y: np.ndarray) -> dict:
    good = TIP_STATES.index(GOOD)
    return {"auroc_good_vs_degraded": auroc(1 - p[:, good], y != good),
            "auroc_per_class": {state: auroc(p[:, c], y == c) for c, state in enumerate(TIP_STATES)}}


def _per_surface(p: np.ndarray, y: np.ndarray, surfaces: np.ndarray) -> dict:
    """Where the monitor is weak: good vs degraded and good vs multi, one surface at a time."""
    good, multi = TIP_STATES.index(GOOD), TIP_STATES.index("multi")
    out = {}
    for surface in sorted(set(surfaces)):
        on = surfaces == surface
        pair = on & ((y == good) | (y == multi))
        out[surface] = {"windows": int(on.sum()),
                        "auroc_good_vs_degraded": auroc(1 - p[on, good], y[on] != good),
                        "auroc_good_vs_multi": auroc(1 - p[pair, good], y[pair] == multi)}
    return out


def _by_visibility(p: np.ndarray, y: np.ndarray, visibility: np.ndarray) -> dict:
    """Good vs degraded and good vs multi with only the degraded windows whose degradation was at
    least this visible, and the share of blunt and multi windows that are."""
    good, multi, blunt = (TIP_STATES.index(s) for s in (GOOD, "multi", "blunt"))
    out = {}
    for threshold in VISIBILITY_THRESHOLDS:
        kept = (y == good) | (visibility >= threshold)
        pair = kept & ((y == good) | (y == multi))
        out[f"{threshold:g}"] = {
            "auroc_good_vs_degraded": auroc(1 - p[kept, good], y[kept] != good),
            "auroc_good_vs_multi": auroc(1 - p[pair, good], y[pair] == multi),
            "multi_windows_visible": round(float(np.mean(visibility[y == multi] >= threshold)), 3),
            "blunt_windows_visible": round(float(np.mean(visibility[y == blunt] >= threshold)), 3)}
    return out


def _add_frame(frames: list[tuple[str, np.ndarray]], state: str, readings: list[Reading]) -> None:
    """A steady frame's whole-frame score: the mean of its windows' probabilities."""
    if readings:
        frames.append((state, np.mean([window for _, window, _ in readings], axis=0)))


def _whole_frames(frames: list[tuple[str, np.ndarray]]) -> dict:
    """AUROC of the frames' P(degraded) for good vs degraded frames, and for good frames against
    each kind of degraded frame."""
    states = [state for state, _ in frames]
    p, kind = np.array([score for _, score in frames]), np.array(states)
    degraded = 1 - p[:, TIP_STATES.index(GOOD)]
    out = {"frames": {state: int((kind == state).sum()) for state in dict.fromkeys(states)},
           "auroc_good_vs_degraded": auroc(degraded, kind != GOOD)}
    for state in ("blunt", "multi", "unstable"):
        pair = (kind == GOOD) | (kind == state)
        out[f"auroc_good_vs_{state}"] = auroc(degraded[pair], kind[pair] == state)
    return out


def _alerted(first_alerts: dict[str, list[tuple[int, str] | None]]) -> dict:
    """Per degraded kind: frames, frames with an alert, first alerts naming the kind, median row
    of the first alert."""
    out = {}
    for state, firsts in first_alerts.items():
        raised = [first for first in firsts if first is not None]
        out[state] = {"frames": len(firsts), "alerted": len(raised),
                      "first_alert_names_it": sum(kind == state for _, kind in raised),
                      "median_row_of_first_alert": float(np.median([row for row, _ in raised])) if raised else None}
    return out


def evaluate_tip(classifier: TipClassifier, episodes: int = 100, stride: int = 1, hop: int = DEFAULTS.hop,
                 progress: Callable[[int], None] = lambda n: None, size: int = 256,
                 event_mads: float = DEFAULTS.event_mads) -> dict:
    scores: list[np.ndarray] = []
    beliefs: list[np.ndarray] = []
    labels: list[int] = []
    surfaces: list[str] = []
    visible: list[tuple[float, float]] = []
    frames: list[tuple[str, np.ndarray]] = []
    first_alerts: dict[str, list[tuple[int, str] | None]] = {}
    delays: list[int] = []
    next_scan_delays: list[int] = []
    missed = early = 0
    started = time.perf_counter()

    for scenario in ("blunt", "multi", "unstable", "change"):
        around = 1 if scenario == "change" else 0
        for k, scans in enumerate(evaluation_sequences(EVALUATION_SEED, episodes, scenario, size, stride,
                                                       visibility=True, before=around, after=around)):
            monitor = TipMonitor(classifier, hop=hop, event_mads=event_mads)
            if around:
                stream(monitor, scans[0], f"{scenario}-{k}-before")
            sequence = scans[around]
            readings, alerts = stream(monitor, sequence, f"{scenario}-{k}")
            _collect(readings, sequence, scores, beliefs, labels, surfaces, visible)
            progress(1)
            if scenario != "change":
                _add_frame(frames, scenario, readings)
                raised = [(i, state) for i, state in alerts if state != GOOD]
                first_alerts.setdefault(scenario, []).append(raised[0] if raised else None)
            if scenario != "change" or sequence.change_at is None:
                continue
            if TIP_STATES[int(sequence.labels[-1])] == GOOD:
                continue
            early += sum(1 for i, _ in alerts if i < sequence.change_at)
            late = [i for i, state in alerts if i >= sequence.change_at and state != GOOD]
            if late:
                delays.append(late[0] - sequence.change_at)
                continue
            missed += 1
            if monitor.state != GOOD:  # raised in this frame and withdrawn again: not a late catch
                continue
            _, next_alerts = stream(monitor, scans[-1], f"{scenario}-{k}-after")
            caught = [i for i, state in next_alerts if state != GOOD]
            if caught:
                next_scan_delays.append(len(sequence.labels) - sequence.change_at + caught[0])

    clean_monitor = TipMonitor(classifier, hop=hop, event_mads=event_mads)
    false_alerts: list[dict] = []
    clean_frames = 0
    for k, scans in enumerate(evaluation_sequences(EVALUATION_SEED + 1, episodes, "good", size, stride,
                                                   visibility=True, before=1)):
        for j, sequence in enumerate(scans):
            readings, alerts = stream(clean_monitor, sequence, f"good-{k}-{j}")
            false_alerts.extend({"area": k, "scan": j, "surface": sequence.surface, "row": i, "state": state,
                                 "frame_nm": round(sequence.pixel_nm * sequence.forward.shape[1], 1)}
                                for i, state in alerts if state != GOOD)
            _collect(readings, sequence, scores, beliefs, labels, surfaces, visible)
            _add_frame(frames, GOOD, readings)
            clean_frames += 1
        progress(1)

    y = np.array(labels)
    belief = np.array(beliefs)
    in_window, since_degraded = np.array(visible).T
    return {
        "episodes_per_scenario": episodes, "size": size, "stride": stride, "hop": hop, "event_mads": event_mads,
        "windows": int(len(y)),
        "window_counts": {state: int((y == c).sum()) for c, state in enumerate(TIP_STATES)},
        "monitor": _aurocs(belief, y), "single_window": _aurocs(np.array(scores), y),
        "whole_frames": _whole_frames(frames),
        "steady_frames_alerted": _alerted(first_alerts),
        "monitor_per_surface": _per_surface(belief, y, np.array(surfaces)),
        "visibility": {"thresholds": list(VISIBILITY_THRESHOLDS),
                       "monitor": _by_visibility(belief, y, since_degraded),
                       "single_window": _by_visibility(np.array(scores), y, in_window)},
        "tip_changes": {"detected": len(delays), "missed": missed, "alerts_before_change": early,
                        "median_delay_rows": float(np.median(delays)) if delays else None,
                        "p90_delay_rows": float(np.percentile(delays, 90)) if delays else None,
                        "missed_then_caught_in_next_scan": len(next_scan_delays),
                        "next_scan_median_delay_rows": float(np.median(next_scan_delays)) if next_scan_delays else None},
        "clean_frames": clean_frames, "false_alerts": len(false_alerts),
        "false_alerts_per_100_clean_frames": round(100 * len(false_alerts) / clean_frames, 2),
        "false_alert_list": false_alerts,
        "seconds": round(time.perf_counter() - started, 1),
    }


def monitor_scan_file(path: str | Path, classifier: TipClassifier, hop: int = DEFAULTS.hop, channel: str = "Z",
                      event_mads: float = DEFAULTS.event_mads) -> dict:
    """Run the monitor over a recorded scan in acquisition order; per row, the state it published."""
    scan = read_scan_file(path)
    data = next((c for c in scan.channels if c.name == channel), None)
    if data is None or data.unit != "m":
        raise ScanFileError(f"{path}: no height channel {channel!r} in metres")
    forward = data.forward.astype(np.float64) * 1e9
    backward = data.backward.astype(np.float64) * 1e9 if data.backward is not None else forward
    rows, cols = forward.shape
    monitor = TipMonitor(classifier, hop=hop, event_mads=event_mads)
    directions = ("forward", "backward") if data.backward is not None else ("forward",)
    uid = Path(path).stem
    monitor.start_scan(uid, scan.size_nm[0] / cols, directions)
    state = np.full(rows, "", dtype=object)
    degraded = np.full(rows, np.nan)
    alerts = []
    for row in acquisition_rows(rows, scan.scan_direction):
        reading = transition = None
        for direction, trace in zip(directions, (forward, backward)):
            reading, transition = monitor.add_line(uid, int(row), direction, trace[row])
        state[row] = monitor.state
        if reading is not None:
            degraded[row] = 1 - reading.probabilities[GOOD]
        if transition is not None:
            alerts.append({"row": int(row), "from": transition.previous, "to": transition.state})
    flagged = [int(r) for r in np.flatnonzero(state != GOOD) if state[r]]
    return {"name": Path(path).name, "rows": rows, "cols": cols, "scan_direction": scan.scan_direction,
            "windows": monitor.counters["tip_windows"], "alerts": alerts, "rows_flagged": len(flagged),
            "flagged_ranges": _ranges(flagged), "state": state.tolist(), "p_degraded": degraded.tolist(),
            "image": forward}


def _ranges(rows: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for r in rows:
        if out and r == out[-1][1] + 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    return out


def plot_scan_files(results: list[dict], path: str | Path) -> None:
    """Each scan beside a strip of the monitor's state per row and its P(degraded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"good": "#2ca02c", "blunt": "#ff7f0e", "multi": "#d62728", "unstable": "#9467bd",
               "changed": "#1f77b4", "": "#ffffff"}
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.2), squeeze=False)
    for ax, result in zip(axes[0], results):
        image = result["image"]
        rows, cols = image.shape
        y, x = np.mgrid[0:rows, 0:cols]
        design = np.stack([x.ravel(), y.ravel(), np.ones(x.size)], 1)
        plane = np.linalg.lstsq(design, image.ravel(), rcond=None)[0]
        flat = image - (design @ plane).reshape(rows, cols)
        lo, hi = np.percentile(flat, [1, 99])
        ax.imshow(flat, cmap="afmhot", vmin=lo, vmax=hi, extent=(0, cols, rows, 0))
        strip = max(4, cols // 16)
        for r, s in enumerate(result["state"]):
            ax.add_patch(plt.Rectangle((cols, r), strip, 1, color=colours[s], lw=0))
        p = np.asarray(result["p_degraded"], float)
        known = np.isfinite(p)
        ax.plot(cols + strip + 2 * strip * p[known], np.flatnonzero(known) + 0.5, color="k", lw=0.8)
        ax.set_xlim(0, cols + 3 * strip)
        ax.set_ylim(rows, 0)
        ax.set_title(f"{result['name']}\n{result['rows_flagged']} of {rows} rows flagged", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for s, c in colours.items() if s]
    fig.legend(handles, [s for s in colours if s], loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
