"""Tip-conditioning requests, checked against hard limits in the driver before anything moves.

Whoever asks (the daemon's tip monitor, a user, a remote client), the driver runs a request only
if it is a known action, every number is finite and inside the configured limits, and the last
accepted action is at least `min_interval_s` ago. Every request is logged with its origin and
the verdict; in dry-run mode accepted requests are logged but not executed.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

ACTIONS = {"bias_pulse": ("bias_v", "width_s"), "dip": ("depth_nm", "bias_v")}


def parse_action(text: str) -> dict:
    """'bias_pulse bias_v=3 width_s=0.02' -> {"action": "bias_pulse", "bias_v": 3.0, "width_s": 0.02}."""
    name, *pairs = text.split()
    if name not in ACTIONS:
        raise ValueError(f"unknown action {name!r}; allowed: {', '.join(ACTIONS)}")
    request: dict = {"action": name}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in ACTIONS[name]:
            raise ValueError(f"{name} takes {', '.join(ACTIONS[name])}; got {pair!r}")
        request[key] = float(value)
    if set(request) != {"action", *ACTIONS[name]}:
        raise ValueError(f"{name} needs {', '.join(ACTIONS[name])}")
    return request


@dataclass(frozen=True)
class ConditioningLimits:
    max_bias_v: float = 4.0
    max_pulse_width_s: float = 0.05
    max_dip_nm: float = 1.0
    min_interval_s: float = 10.0
    dry_run: bool = True


class ConditioningGate:
    def __init__(self, limits: ConditioningLimits, clock=time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.last_accepted: float | None = None
        self.log: list[dict] = []

    def check(self, request: dict, origin: str) -> dict:
        reason = self._problem(request)
        now = self.clock()
        if reason is None and self.last_accepted is not None and now - self.last_accepted < self.limits.min_interval_s:
            reason = f"rate limit: {now - self.last_accepted:.1f} s since the last action, minimum {self.limits.min_interval_s} s"
        verdict = {"accepted": reason is None, "reason": reason or "within limits", "dry_run": self.limits.dry_run,
                   "request": dict(request), "origin": origin, "executed": False}
        if reason is None:
            self.last_accepted = now
        self.log.append(verdict)
        log.warning("conditioning request from %s: %s -> %s%s", origin, request,
                    "accepted" if reason is None else "refused", f" ({reason})" if reason else "")
        return verdict

    def _problem(self, request: dict) -> str | None:
        action = request.get("action")
        if not isinstance(action, str) or action not in ACTIONS:
            return f"unknown action {action!r}; allowed: {', '.join(ACTIONS)}"
        if set(request) != {"action", *ACTIONS[action]}:
            return f"{action} takes exactly {', '.join(ACTIONS[action])}"
        values = {k: request[k] for k in ACTIONS[action]}
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values.values()):
            return "every value must be a finite number"
        lim = self.limits
        if abs(values["bias_v"]) > lim.max_bias_v:
            return f"|bias| {abs(values['bias_v'])} V exceeds the limit {lim.max_bias_v} V"
        if action == "bias_pulse" and not 0 < values["width_s"] <= lim.max_pulse_width_s:
            return f"pulse width {values['width_s']} s outside (0, {lim.max_pulse_width_s}] s"
        if action == "dip" and not 0 < values["depth_nm"] <= lim.max_dip_nm:
            return f"dip depth {values['depth_nm']} nm outside (0, {lim.max_dip_nm}] nm"
        return None


def tip_shaper_values(request: dict) -> dict[str, float]:
    """TipShaper.PropsSet values for a controlled dip of the requested depth (metres, seconds)."""
    depth_m = request["depth_nm"] * 1e-9
    return {"switch_off_delay_s": 0.05, "change_bias": 1, "bias_v": request["bias_v"], "tip_lift_m": -depth_m,
            "lift_time_1_s": 0.1, "bias_lift_v": request["bias_v"], "settling_time_s": 0.05,
            "lift_height_m": depth_m, "lift_time_2_s": 0.1, "end_wait_s": 0.05, "restore_feedback": 1}
