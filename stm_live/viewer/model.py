"""What the viewer shows, kept apart from Qt: the latest frame of each kind, tip state, status.

Every received message goes through `ViewerModel.apply`; frames only replace the slot of their
(scan, channel, direction, kind), so however fast the daemon publishes, the viewer holds one
frame per slot and renders the newest one. The model follows the scan that spoke last. A
localization map arrives after its scan's final frame, usually when the next scan has begun, so
the newest map per (channel, direction) is kept whichever scan it belongs to ('both' being the
direction of the map that averages the two traces).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from stm_live.protocol import ActionReport, Frame, LocMap, Message, Status, TipAlert, TipReport

SlotKey = tuple[str, str, str, str]
TOPICS = ("frame", "status", "tip", "alert", "action", "locmap")


@dataclass
class ViewerModel:
    frames: dict[SlotKey, Frame] = field(default_factory=dict)
    current_uid: str | None = None
    tip: TipReport | None = None
    alert: TipAlert | None = None
    actions: deque = field(default_factory=lambda: deque(maxlen=20))
    status: Status | None = None
    locmaps: dict[tuple[str, str], LocMap] = field(default_factory=dict)
    received: int = 0
    invalid: int = 0
    missed: int = 0
    version: int = 0
    _published_last: int | None = None
    _taken_last: int = 0
    _arrivals: deque = field(default_factory=lambda: deque(maxlen=4096))

    def apply(self, msg: Message, now: float | None = None) -> None:
        self.received += 1
        self.version += 1
        if isinstance(msg, Frame):
            self.frames[(msg.uid, msg.channel, msg.direction, msg.kind)] = msg
            if msg.uid != self.current_uid:
                self._switch_scan(msg.uid)
            self._arrivals.append((now or time.monotonic(), msg.rows_seen, msg.uid))
        elif isinstance(msg, TipReport):
            self.tip = msg
            if self.alert is not None and msg.state == "good" and self.alert.state != "good":
                self.alert = None
        elif isinstance(msg, TipAlert):
            self.alert = msg if msg.state != "good" else None
        elif isinstance(msg, ActionReport):
            self.actions.append(msg)
        elif isinstance(msg, Status):
            self.status = msg
            self._count_missed(msg)
        elif isinstance(msg, LocMap):
            self.locmaps[(msg.channel, msg.direction)] = msg

    def _count_missed(self, status: Status) -> None:
        """Messages of our topics the daemon published since the previous status, less those that
        arrived: what ZeroMQ dropped because this viewer fell behind. A daemon restart (its counts
        went back) starts the count afresh without losing the total."""
        published = sum(status.counters.get(f"published_{topic}", 0) for topic in TOPICS) + 1
        taken = self.received + self.invalid
        if self._published_last is not None and published >= self._published_last:
            self.missed += (published - self._published_last) - (taken - self._taken_last)
        self._published_last, self._taken_last = published, taken

    def _switch_scan(self, uid: str) -> None:
        """A new scan: drop the old scan's frames (one scan on screen at a time)."""
        self.frames = {k: v for k, v in self.frames.items() if k[0] == uid}
        self.current_uid = uid

    def frame(self, channel: str, direction: str, kind: str) -> Frame | None:
        if self.current_uid is None:
            return None
        return self.frames.get((self.current_uid, channel, direction, kind))

    def rows_per_s(self, window_s: float = 2.0, now: float | None = None) -> float:
        """Rows landing per second in the current scan, from the rows_seen of frames over the last seconds."""
        now = now or time.monotonic()
        recent = [(t, rows) for t, rows, uid in self._arrivals if uid == self.current_uid and now - t <= window_s]
        if len(recent) < 2 or recent[-1][0] == recent[0][0]:
            return 0.0
        return max(0.0, (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0]))


def robust_levels(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """Colour levels from percentiles of the finite pixels (spikes do not wash out the frame);
    read from about 16k of them, evenly spread, which sets levels as well as all of them."""
    stride = max(1, int(np.sqrt(image.size / 16_384)))
    sample = image[::stride, ::stride]
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [low, high])
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1e-12)
