"""The tip monitor inside the daemon: its own thread, fed by the ingest thread, never blocking it.

The ingest thread hands over scan starts, lines and scan ends (references to the decoded arrays,
no copies). Lines beyond `max_queued_lines` waiting skip the monitor and are counted: the monitor
is advisory, recording and reconstruction never wait for it. One TipMonitor per instrument (the
tip belongs to the instrument); tip, alert and action messages go to the daemon's sink.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stm_live.assembly import ScanState
from stm_live.config import ConditioningSettings, TipSettings
from stm_live.drivers.actions import ActionClient, ActionError
from stm_live.protocol import ActionReport, Line, Message
from stm_live.security import LOOPBACK_ONLY, Security
from stm_live.tip.classifier import TipClassifier
from stm_live.tip.conditioning import ConditioningPolicy
from stm_live.tip.features import compile_kernels
from stm_live.tip.monitor import TipMonitor

log = logging.getLogger(__name__)

ORIGIN = "stm-live tip monitor"
HEIGHT_UNITS = {"m": 1e9, "nm": 1.0}


@dataclass(frozen=True)
class _ScanInfo:
    instrument: str
    channel: int
    scale: float
    pixel_nm: float


class TipService:
    def __init__(self, settings: TipSettings, conditioning: ConditioningSettings, sink: Callable[[Message], None],
                 classifier: TipClassifier | None = None, security: Security = LOOPBACK_ONLY) -> None:
        self.settings = settings
        self.sink = sink
        self.classifier = classifier or TipClassifier()
        compile_kernels()  # at the daemon's start, not when the first scan's monitor is built
        self.policy = ConditioningPolicy(conditioning) if conditioning.enabled else None
        self.actions = (ActionClient(conditioning.endpoint, conditioning.request_timeout_s, security=security)
                        if conditioning.enabled else None)
        self.monitors: dict[str, TipMonitor] = {}
        self.scans: dict[str, _ScanInfo] = {}
        self._watched: set[str] = set()
        self._gapped: set[str] = set()
        self.counters = {"tip_lines_skipped": 0, "tip_errors": 0}
        self._queue: deque = deque()
        self._queued_lines = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="stm-live-tip", daemon=True)

    # -- called on the ingest thread --------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def scan_started(self, state: ScanState) -> None:
        """Decide here whether the monitor reads this scan, so other scans' lines cost nothing."""
        info = self._watch(state)
        if info is not None:
            self._watched.add(state.uid)
            self._put(("start", state, info))

    def line(self, state: ScanState, msg: Line) -> None:
        if msg.uid not in self._watched:
            return
        if self._queued_lines >= self.settings.max_queued_lines:
            self.counters["tip_lines_skipped"] += 1
            if msg.uid not in self._gapped:
                self._gapped.add(msg.uid)
                self._put(("gap", msg.uid))
            return
        self._gapped.discard(msg.uid)
        self._put(("line", msg, state.row_columns[msg.row]))

    def scan_ended(self, uid: str) -> None:
        if uid in self._watched:
            self._watched.discard(uid)
            self._put(("end", uid))

    def _watch(self, state: ScanState) -> _ScanInfo | None:
        start = state.start
        names = [c.name for c in start.channels]
        if self.settings.channel not in names:
            log.info("scan %s has no %s channel: the tip monitor skips it", start.uid, self.settings.channel)
            return None
        index = names.index(self.settings.channel)
        unit = start.channels[index].unit
        if unit not in HEIGHT_UNITS:
            log.info("scan %s: channel %s is in %r, not a height; the tip monitor skips it",
                     start.uid, self.settings.channel, unit)
            return None
        return _ScanInfo(start.instrument, index, HEIGHT_UNITS[unit], start.size_nm[0] / start.cols)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.actions is not None:
            self.actions.close()

    def all_counters(self) -> dict[str, int]:
        counters = dict(self.counters)
        for monitor in list(self.monitors.values()):
            for key, value in monitor.counters.items():
                counters[key] = counters.get(key, 0) + value
        return counters

    def _put(self, item: tuple) -> None:
        with self._cond:
            self._queue.append(item)
            self._queued_lines += item[0] == "line"
            self._cond.notify()

    # -- the monitor thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                item = self._queue.popleft()
                self._queued_lines -= item[0] == "line"
            try:
                self._handle(item)
            except Exception:
                self.counters["tip_errors"] += 1
                log.exception("tip monitor failed on a %s event; it goes on with the next", item[0])

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "start":
            self._start(*item[1:])
        elif kind == "gap":
            info = self.scans.get(item[1])
            if info is not None:
                self.monitors[info.instrument].restart_window(item[1])
        elif kind == "end":
            info = self.scans.pop(item[1], None)
            if info is not None:
                self.monitors[info.instrument].end_scan(item[1])
        else:
            self._line(*item[1:])

    def _start(self, state: ScanState, info: _ScanInfo) -> None:
        start = state.start
        self.scans[start.uid] = info
        monitor = self.monitors.get(start.instrument)
        if monitor is None:
            s = self.settings
            monitor = self.monitors[start.instrument] = TipMonitor(
                self.classifier, hop=s.hop, enter=s.enter, leave=s.leave, confirm=s.confirm, clear=s.clear,
                smoothing=s.smoothing, kind_margin=s.kind_margin, kind_enter=s.kind_enter, event_mads=s.event_mads)
        monitor.start_scan(start.uid, info.pixel_nm, start.line_directions)

    def _line(self, msg: Line, columns: slice | np.ndarray) -> None:
        info = self.scans.get(msg.uid)
        if info is None:
            return
        monitor = self.monitors[info.instrument]
        if not isinstance(columns, slice):
            monitor.counters["tip_rows_skipped"] += 1
            return
        heights = msg.arrays[info.channel].astype(np.float64) * info.scale
        reading, alert = monitor.add_line(msg.uid, msg.row, msg.direction, heights, info.pixel_nm * (columns.step or 1))
        if reading is None:
            return
        self.sink(reading)
        if alert is not None:
            self.sink(alert)
        if self.policy is not None:
            self._condition(info.instrument, monitor, reading.state, alert.state if alert else None)

    def _condition(self, instrument: str, monitor: TipMonitor, state: str, transition: str | None) -> None:
        request, judgement = self.policy.step(instrument, state, transition)
        if judgement is not None:
            self.sink(ActionReport({}, ORIGIN, judgement, f"tip is {state} after the last action", time.time()))
        if request is None:
            return
        self.sink(ActionReport(request, ORIGIN, "requested", f"tip is {state}", time.time()))
        try:
            reply = self.actions.request(request, ORIGIN)
        except ActionError as exc:
            reply = {"outcome": "failed", "detail": str(exc)}
        log.warning("conditioning %s: %s (%s)", request, reply["outcome"], reply["detail"])
        self.sink(ActionReport(request, ORIGIN, reply["outcome"], reply["detail"], time.time()))
        if reply["outcome"] == "executed":
            self.policy.executed(instrument)
            monitor.reset()
