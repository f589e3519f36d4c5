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

from stm_live.protocol import (
    ActionReport, Frame, LocMap, Message, Status, TipAlert, TipReport, preview_topic,
)

SlotKey = tuple[str, str, str, str]
TOPICS = ("status", "tip", "alert", "action", "locmap")  # plus the frames of the shown slot
RATE_WINDOW_S = 2.0


def slot_topics(channel: str | None, direction: str) -> tuple[str, ...]:
    """The frames a viewer showing this slot takes: the slot's paced `view:` stream (at most the
    rate it draws at); every channel's of the direction while no channel is known yet (the
    first frames name the channels)."""
    return (preview_topic(direction, channel),)


def viewer_topic(msg: Message) -> str:
    """The topic a viewer takes a message on: frames come on their `view:` topic."""
    return preview_topic(msg.direction, msg.channel) if isinstance(msg, Frame) else msg.type


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
    subscriptions: tuple[str, ...] | None = None  # topic prefixes taken; None: every message
    _published_last: int | None = None
    _taken_last: int = 0
    _arrivals: deque = field(default_factory=deque)  # (t, rows_seen) of the current scan's last RATE_WINDOW_S

    def subscribe(self, subscriptions: tuple[str, ...]) -> None:
        """The topics the socket now takes; what was missed is counted afresh from the next status."""
        if subscriptions != self.subscriptions:
            self.subscriptions = subscriptions
            self._published_last = None

    def apply(self, msg: Message, now: float | None = None) -> None:
        if self.subscriptions is not None and not viewer_topic(msg).startswith(self.subscriptions):
            return  # a slot no longer shown, still in flight when the selection changed
        self.received += 1
        self.version += 1
        if isinstance(msg, Frame):
            self.frames[(msg.uid, msg.channel, msg.direction, msg.kind)] = msg
            if msg.uid != self.current_uid:
                self._switch_scan(msg.uid)
            self._arrivals.append((now or time.monotonic(), msg.rows_seen))
            self._forget_arrivals(self._arrivals[-1][0])
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
        published = sum(count for key, count in status.counters.items() if key.startswith("published_")
                        and (self.subscriptions is None or key[len("published_"):].startswith(self.subscriptions))) + 1
        taken = self.received + self.invalid
        if self._published_last is not None and published >= self._published_last:
            self.missed += (published - self._published_last) - (taken - self._taken_last)
        self._published_last, self._taken_last = published, taken

    def _switch_scan(self, uid: str) -> None:
        """A new scan: drop the old scan's frames (one scan on screen at a time)."""
        self.frames = {k: v for k, v in self.frames.items() if k[0] == uid}
        self.current_uid = uid
        self._arrivals.clear()

    def _forget_arrivals(self, now: float) -> None:
        while self._arrivals and now - self._arrivals[0][0] > RATE_WINDOW_S:
            self._arrivals.popleft()

    def frame(self, channel: str, direction: str, kind: str) -> Frame | None:
        if self.current_uid is None:
            return None
        return self.frames.get((self.current_uid, channel, direction, kind))

    def rows_per_s(self, now: float | None = None) -> float:
        """Rows landing per second in the current scan, from the rows_seen of its frames over the
        last RATE_WINDOW_S; it costs the same however fast frames arrive (the viewer asks every render)."""
        self._forget_arrivals(now or time.monotonic())
        if len(self._arrivals) < 2 or self._arrivals[-1][0] == self._arrivals[0][0]:
            return 0.0
        (t0, rows0), (t1, rows1) = self._arrivals[0], self._arrivals[-1]
        return max(0.0, (rows1 - rows0) / (t1 - t0))


def robust_levels(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """Colour levels from percentiles of the finite pixels (spikes do not wash out the frame);
    read from about 16k of them, evenly spread, which sets levels as well as all of them, by
    nearest rank in one partial sort (np.percentile's interpolation costs twice that)."""
    stride = max(1, int(np.sqrt(image.size / 16_384)))
    sample = image[::stride, ::stride]
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return 0.0, 1.0
    ranks = (round(low / 100 * (finite.size - 1)), round(high / 100 * (finite.size - 1)))
    lo, hi = np.partition(finite, ranks)[list(ranks)]
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1e-12)


BLANK_RGB = (96, 96, 96)  # pixels with no value (not measured yet): a grey none of the colour maps has


def colourize(image: np.ndarray, levels: tuple[float, float], table: np.ndarray) -> np.ndarray:
    """Float image -> (rows, cols) uint32 pixels from a (257,) table of them (256 colours, then the
    blank one), levels clipped to the ends of the map and missing (NaN) pixels blank. Done here
    rather than by the image item, whose 8-bit indexed image Qt converts again on every paint
    (about 0.6 ms a panel against 0.16): one gather a pixel."""
    lo, hi = levels
    scaled = (np.asarray(image, np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo) if hi > lo else 0.0)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    np.nan_to_num(scaled, copy=False, nan=256.0)
    return np.take(table, scaled.astype(np.uint16))
