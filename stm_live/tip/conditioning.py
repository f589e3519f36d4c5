"""When the daemon asks the instrument to condition its tip, and whether it worked.

Off unless `conditioning.enabled`. A confirmed degradation (blunt, multi or unstable; a bare
tip change is only reported) asks for the first configured action; an action that ran is
judged after `recovery_windows` windows: recovered if the monitor says `good` again, else the
next action in the list is asked for, up to `max_attempts`, never sooner than `min_interval_s`
after the last one. The driver checks every request against its own limits again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from stm_live.config import ConditioningSettings
from stm_live.drivers.conditioning import parse_action
from stm_live.tip.monitor import GOOD

DEGRADED = ("blunt", "multi", "unstable")


@dataclass
class _Episode:
    attempts: int = 0
    last_request: float = float("-inf")
    judge_in: int = 0
    needs_action: bool = False


class ConditioningPolicy:
    def __init__(self, settings: ConditioningSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.actions = [parse_action(text) for text in settings.actions]
        self.clock = clock
        self.episodes: dict[str, _Episode] = {}

    def step(self, instrument: str, state: str, transition: str | None) -> tuple[dict | None, str | None]:
        """After one window: (request to send or None, judgement of the last action or None)."""
        episode = self.episodes.setdefault(instrument, _Episode())
        judgement = None
        if episode.judge_in:
            episode.judge_in -= 1
            if episode.judge_in:
                return None, None
            judgement = "recovered" if state == GOOD else "not_recovered"
            episode.needs_action = judgement == "not_recovered"
        if state == GOOD:
            episode.attempts, episode.needs_action = 0, False
            return None, judgement
        episode.needs_action |= transition in DEGRADED
        if (not episode.needs_action or state not in DEGRADED or episode.attempts >= self.settings.max_attempts
                or self.clock() - episode.last_request < self.settings.min_interval_s):
            return None, judgement
        request = dict(self.actions[min(episode.attempts, len(self.actions) - 1)])
        episode.attempts += 1
        episode.last_request = self.clock()
        episode.needs_action = False
        return request, judgement

    def executed(self, instrument: str) -> None:
        """The driver ran the last request: judge the tip after the recovery windows."""
        self.episodes.setdefault(instrument, _Episode()).judge_in = self.settings.recovery_windows
