"""Tips and constant-current imaging.

The tunnelling current through apex a at lateral position r is I_a ~ s_a exp(-2 kappa (z - h_a(r))),
where h_a is the surface height seen through that apex's lateral resolution, shifted by the
apex's offset, and s_a its relative strength. The feedback holds I = sum_a I_a at the setpoint,
so the recorded height is the log-sum-exp

    z(r) = (1 / 2 kappa) ln sum_a s_a exp(2 kappa h_a(r))

For one apex this is h itself; for several, each feature appears once per apex, weaker apices
showing only where they are closest to the surface: the familiar double-tip ghosts. Resolution
is an effective Gaussian width (s-wave Tersoff-Hamann would give sqrt((R + d) / 2 kappa) for an
apex of radius R at gap d, coarser than the atomic resolution real tips reach through p and d
orbitals, so the width is a parameter with ranges per tip class rather than derived from R).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stm_live.protocol import TIP_STATES
from stm_live.sim.surfaces import Topography

KAPPA_PER_NM = 10.0
STATE_CODE = {name: code for code, name in enumerate(TIP_STATES)}

GOOD_RESOLUTION_NM = (0.02, 0.08)
BLUNT_RESOLUTION_NM = (0.25, 0.8)


@dataclass(frozen=True)
class Apex:
    offset_nm: tuple[float, float]
    strength: float


@dataclass(frozen=True)
class Tip:
    state: str
    resolution_nm: float
    apices: tuple[Apex, ...] = (Apex((0.0, 0.0), 1.0),)

    def describe(self) -> dict:
        return {"state": self.state, "resolution_nm": self.resolution_nm,
                "apices": [{"offset_nm": list(a.offset_nm), "strength": a.strength} for a in self.apices]}


def good_tip(rng: np.random.Generator, frame_nm: float = 10.0) -> Tip:
    return Tip("good", float(rng.uniform(*GOOD_RESOLUTION_NM)))


def blunt_tip(rng: np.random.Generator, frame_nm: float = 10.0) -> Tip:
    return Tip("blunt", float(rng.uniform(*BLUNT_RESOLUTION_NM)))


def multi_tip(rng: np.random.Generator, apices: int | None = None, frame_nm: float = 10.0) -> Tip:
    """2-4 apices 0.4-2.5 nm (at most a quarter frame) from the main one, at 30-100 % of its strength."""
    n = int(apices or rng.integers(2, 5))
    extra = []
    far = min(2.5, max(0.5, frame_nm / 4))
    for _ in range(n - 1):
        distance, angle = rng.uniform(min(0.4, far / 2), far), rng.uniform(0, 2 * np.pi)
        extra.append(Apex((float(distance * np.cos(angle)), float(distance * np.sin(angle))), float(rng.uniform(0.3, 1.0))))
    return Tip("multi", float(rng.uniform(*GOOD_RESOLUTION_NM)), (Apex((0.0, 0.0), 1.0), *extra))


TIP_MAKERS = {"good": good_tip, "blunt": blunt_tip, "multi": multi_tip}


def image(topo: Topography, tip: Tip) -> np.ndarray:
    """Constant-current height (nm) on the padded grid, through every apex of the tip."""
    x, y = topo.canvas.grid_nm()
    views = []
    for apex in tip.apices:
        dx, dy = apex.offset_nm
        h = topo.canvas.image(tip.resolution_nm * topo.resolution_scale, (dx, dy))
        if len(topo.steps.positions_nm):
            h = h + topo.terrace_height(x + dx, y + dy).astype(np.float32)
        views.append(h)
    if len(views) == 1:
        return views[0]
    top = np.maximum.reduce(views)
    total = np.zeros_like(top)
    for apex, view in zip(tip.apices, views):
        total += apex.strength * np.exp(2 * KAPPA_PER_NM * (view - top))
    return top + np.log(total) / (2 * KAPPA_PER_NM)


def max_offset_nm(tip: Tip) -> float:
    return max(float(np.hypot(*a.offset_nm)) for a in tip.apices)
