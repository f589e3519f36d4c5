"""The tip monitor: every row scored, every window classified, alerts only on confirmed transitions.

Rows arrive as lines (forward and backward). Once both traces of a row are in, the row's
physical features are computed against the row scanned before it; every `hop` rows, and on any
row that stands out from the rows before it (a tip change under way), the last WINDOW_ROWS rows
are classified. The published state changes only through a state machine with
hysteresis on the filtered evidence: P(degraded) must stay above `enter` for `confirm` windows
in a row to leave `good`, and below `leave` for `clear` windows to return, so one noisy line
raises nothing; a tip change is announced from one window. The tip is a property of the
instrument, not of a scan: the state carries across scans, and so does the window when the next
scan continues the last one (same pixel size, line length and directions, no conditioning in
between), so that a rescan is read from its first row, not only after WINDOW_ROWS of its rows;
on `lines:K` plans that is most of a frame.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from stm_live.config import TipSettings
from stm_live.protocol import TipAlert, TipReport
from stm_live.tip.classifier import WINDOW_ROWS, TipClassifier, summarize, window_of_rows
from stm_live.tip.features import FEATURE_NAMES, Row, compile_kernels, features_of, prepare_row, stands_out

log = logging.getLogger(__name__)
DEFAULTS = TipSettings()  # the monitor's defaults are the config's (`[tip]`), held in one place

GOOD = "good"
CHANGED = "changed"
RECOMMENDATIONS = {
    "good": "none",
    "blunt": "sharpen the apex: a bias pulse or a controlled dip into a clean area",
    "multi": "remove the extra apex: a bias pulse, or a gentle dip if pulses do not help",
    "unstable": "let the tip settle (or pulse it); check the feedback gain and the setpoint",
    "changed": "the tip changed: check the image and condition it if the resolution got worse",
}


class TipStateMachine:
    """Debounced tip state from per-window class probabilities.

    Window probabilities are filtered (exponential moving average, weight `smoothing` on the
    newest) into a belief; a window that calls a tip change restarts the belief, since what came
    before the change says nothing about the new apex. The state follows the belief only after
    `confirm` windows agree; a tip change itself is announced from one window. The belief leaves
    `good` when P(degraded) reaches `enter`, or when one kind alone reaches `kind_enter`: so
    much on one kind catches a third more multi-apex tips for few more false alerts
    (docs/tip-monitor.md). Once a kind of
    degradation is named, another kind replaces it only while its belief leads by `kind_margin`:
    two kinds the classifier finds about equally likely do not take turns in the alerts.
    """

    def __init__(self, classes: tuple[str, ...], enter: float = DEFAULTS.enter, leave: float = DEFAULTS.leave,
                 confirm: int = DEFAULTS.confirm, clear: int = DEFAULTS.clear, smoothing: float = DEFAULTS.smoothing,
                 kind_margin: float = DEFAULTS.kind_margin, kind_enter: float = DEFAULTS.kind_enter) -> None:
        self.classes = classes
        self.good = classes.index(GOOD)
        self.changed = classes.index(CHANGED)
        self.enter, self.leave, self.confirm, self.clear, self.smoothing = enter, leave, confirm, clear, smoothing
        self.kind_margin, self.kind_enter = kind_margin, kind_enter
        self.state = GOOD
        self.belief: np.ndarray | None = None
        self._agree = 0
        self._candidate: str | None = None

    def reset(self) -> None:
        """Forget the evidence (after a conditioning action the tip is a new one)."""
        self.belief, self._agree, self._candidate = None, 0, None

    def update(self, p: np.ndarray) -> str | None:
        """Feed one window's probabilities; returns the new state on a transition, else None."""
        if p[self.changed] >= self.enter:
            self.belief = p.copy()
            return self._switch(CHANGED) if self.state != CHANGED else None
        self.belief = p.copy() if self.belief is None else (1 - self.smoothing) * self.belief + self.smoothing * p
        degraded = 1.0 - float(self.belief[self.good])
        if self.state != GOOD and degraded <= self.leave:
            return self._vote(GOOD, self.clear)
        ranked = self.belief.copy()
        ranked[[self.good, self.changed]] = -1.0
        candidate = int(np.argmax(ranked))
        if degraded < self.enter and ranked[candidate] < self.kind_enter:
            self._agree, self._candidate = 0, None
            return None
        if self.state not in (GOOD, CHANGED) and \
                ranked[candidate] - ranked[self.classes.index(self.state)] < self.kind_margin:
            candidate = self.classes.index(self.state)  # not clearly another kind: the named one stands
        return self._vote(self.classes[candidate], self.confirm)

    def _vote(self, candidate: str, needed: int) -> str | None:
        if candidate == self.state:
            self._agree, self._candidate = 0, None
            return None
        self._agree = self._agree + 1 if candidate == self._candidate else 1
        self._candidate = candidate
        return self._switch(candidate) if self._agree >= needed else None

    def _switch(self, state: str) -> str:
        self.state, self._agree, self._candidate = state, 0, None
        return state


@dataclass
class _ScanRows:
    pixel_nm: float
    directions: tuple[str, ...]
    pending: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    window: deque = field(default_factory=lambda: deque(maxlen=WINDOW_ROWS))  # prepared rows
    features: deque = field(default_factory=lambda: deque(maxlen=WINDOW_ROWS))
    previous: Row | None = None  # the row scanned just before, in this scan
    rows: int = 0  # rows of this scan read
    filled: int = 0  # rows in the window since it last started afresh (may exceed WINDOW_ROWS)

    def continued(self, pixel_nm: float, directions: tuple[str, ...]) -> _ScanRows:
        """A new scan whose window starts with this scan's rows, when it continues this one."""
        rows = _ScanRows(pixel_nm, directions)
        if directions == self.directions and np.isclose(pixel_nm, self.pixel_nm, rtol=1e-6, atol=0.0):
            for mine, theirs in ((self.window, rows.window), (self.features, rows.features)):
                theirs.extend(mine)
            rows.filled = self.filled
        return rows

    def clear(self) -> None:
        for rows in (self.window, self.features):
            rows.clear()
        self.pending.clear()
        self.previous = None
        self.filled = 0


class TipMonitor:
    """Per-scan row windows, one classifier, one state machine (the instrument's tip)."""

    def __init__(self, classifier: TipClassifier, hop: int = DEFAULTS.hop, enter: float = DEFAULTS.enter,
                 leave: float = DEFAULTS.leave, confirm: int = DEFAULTS.confirm, clear: int = DEFAULTS.clear,
                 smoothing: float = DEFAULTS.smoothing, kind_margin: float = DEFAULTS.kind_margin,
                 kind_enter: float = DEFAULTS.kind_enter, event_mads: float = DEFAULTS.event_mads) -> None:
        self.classifier = classifier
        self.hop = hop
        self.event_mads = event_mads
        self.machine = TipStateMachine(classifier.classes, enter, leave, confirm, clear, smoothing, kind_margin,
                                       kind_enter)
        self.scans: dict[str, _ScanRows] = {}
        self._last: _ScanRows | None = None  # the last scan ended, whose rows a continuing scan reads on from
        self.counters = {"tip_rows": 0, "tip_windows": 0, "tip_alerts": 0, "tip_rows_skipped": 0}
        compile_kernels()

    @property
    def state(self) -> str:
        return self.machine.state

    def start_scan(self, uid: str, pixel_nm: float, directions: tuple[str, ...]) -> None:
        last = self._last
        self.scans[uid] = last.continued(pixel_nm, directions) if last else _ScanRows(pixel_nm, directions)

    def end_scan(self, uid: str) -> None:
        self._last = self.scans.pop(uid, None)

    def reset(self) -> None:
        """The tip was conditioned: forget the evidence and the rows imaged by the old apex."""
        self.machine.reset()
        self._last = None
        for scan in self.scans.values():
            scan.clear()

    def restart_window(self, uid: str) -> None:
        """Lines were skipped: rows on either side of the gap are not neighbours, start afresh."""
        scan = self.scans.get(uid)
        if scan is not None:
            scan.clear()

    def add_line(self, uid: str, row: int, direction: str, heights_nm: np.ndarray, pixel_nm: float | None = None
                 ) -> tuple[TipReport | None, TipAlert | None]:
        """One trace of one row (heights in nm, evenly spaced); a reading when a window completes."""
        scan = self.scans.get(uid)
        if scan is None:
            return None, None
        if not np.isfinite(heights_nm).all() or heights_nm.size < 16:
            self.counters["tip_rows_skipped"] += 1
            scan.pending.pop(row, None)
            return None, None
        traces = scan.pending.setdefault(row, {})
        traces[direction] = heights_nm
        if len(traces) < len(scan.directions):
            if len(scan.pending) > 2:
                del scan.pending[next(iter(scan.pending))]
                self.counters["tip_rows_skipped"] += 1
            return None, None
        del scan.pending[row]
        forward = traces.get("forward", traces.get("backward"))
        if scan.window and scan.window[-1].forward.size != forward.size:
            scan.clear()
        prepared = prepare_row(forward, traces["backward"] if len(traces) > 1 else None)
        features = features_of(prepared, scan.previous, pixel_nm or scan.pixel_nm)
        scan.window.append(prepared)
        scan.features.append(features)
        scan.previous = prepared
        scan.rows += 1
        scan.filled += 1
        self.counters["tip_rows"] += 1
        if scan.filled < WINDOW_ROWS or ((scan.filled - WINDOW_ROWS) % self.hop and not self._event(scan)):
            return None, None
        return self._classify(uid, row, scan, features)

    def _event(self, scan: _ScanRows) -> bool:
        """A row between scheduled windows that stands out (a tip change under way) is read at once."""
        return self.event_mads > 0 and stands_out(scan.features, self.event_mads)

    def _classify(self, uid: str, row: int, scan: _ScanRows, features: np.ndarray
                  ) -> tuple[TipReport, TipAlert | None]:
        p = self.classifier.probabilities(window_of_rows(scan.window), summarize(np.stack(scan.features)))
        self.counters["tip_windows"] += 1
        previous = self.machine.state
        changed = self.machine.update(p)
        probabilities = self._named(self.machine.belief)
        now = time.time()
        reading = TipReport(uid, row, scan.rows, self.machine.state, probabilities, self._named(p),
                            {n: round(float(v), 4) for n, v in zip(FEATURE_NAMES, features)}, now)
        if changed is None:
            return reading, None
        self.counters["tip_alerts"] += 1
        log.warning("tip %s -> %s at scan %s row %d (P=%s)", previous, changed, uid, row, probabilities)
        return reading, TipAlert(uid, row, previous, changed, probabilities, RECOMMENDATIONS[changed], now)

    def _named(self, p: np.ndarray) -> dict[str, float]:
        return {c: round(float(v), 4) for c, v in zip(self.classifier.classes, p)}
