"""The viewers' stream: every slot's frames again on `view:` topics, at most a display's rate.

A viewer draws at 30 Hz; at video rate the daemon publishes a slot's frames two to three times
as often. What a subscriber does not draw still costs the daemon the sending (measured: a
subscriber that discarded everything raised the daemon's latency tail as much as the viewer),
so the daemon sends viewers the newest frame of each (direction, channel, kind) at most
`max_hz` times a second. A frame that comes too soon is held, replaced by any newer one of its
slot, and sent once its slot's interval has passed: the newest picture always arrives.
"""

from __future__ import annotations

from typing import Any

PreviewKey = tuple[str, str, str]  # direction, channel, kind


class PreviewPacer:
    """Per key, lets a message through at most once per interval and holds the newest other one."""

    def __init__(self, max_hz: float) -> None:
        self.interval = 1.0 / max_hz if max_hz > 0 else 0.0
        self._next: dict[PreviewKey, float] = {}
        self._held: dict[PreviewKey, list[Any]] = {}

    def offer(self, key: PreviewKey, frames: list[Any], now: float) -> list[Any] | None:
        """The frames to send now, or None: held (in place of any older held message of `key`)."""
        if now >= self._next.get(key, 0.0):
            self._next[key] = now + self.interval
            self._held.pop(key, None)
            return frames
        self._held[key] = frames
        return None

    def due(self, now: float) -> list[list[Any]]:
        """The held messages whose interval has passed; forgets keys idle for a whole interval."""
        ready = []
        for key, frames in list(self._held.items()):
            if now >= self._next[key]:
                del self._held[key]
                self._next[key] = now + self.interval
                ready.append(frames)
        for key, next_at in list(self._next.items()):
            if key not in self._held and now >= next_at + self.interval:
                del self._next[key]
        return ready

    def next_due(self) -> float:
        """When the earliest held message may go (inf when none is held), on the clock of `now`."""
        return min((self._next[key] for key in self._held), default=float("inf"))
