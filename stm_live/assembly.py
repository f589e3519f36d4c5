"""Frame assembly: a router from scan_start / line / scan_end messages to per-scan frames.

scan_start allocates a scan, each line fills its row, scan_end finalises. Lines are placed by
their explicit row index, so out-of-order arrival is harmless (it is counted); duplicates, lines
for unknown scans, rows the plan does not measure and lines whose shape disagrees with the scan
are refused with an AssemblyError naming the reason. Non-finite values are left unmeasured.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from stm_live.plans import PlanError, parse_plan
from stm_live.protocol import CHANNEL_DTYPES, Line, ScanEnd, ScanStart


class AssemblyError(ValueError):
    """A valid message that cannot be placed in a frame; `reason` is a counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class DirectionFrames:
    """All channels of one line direction of a scan, as measured so far."""

    images: list[np.ndarray]
    measured: np.ndarray
    rows_seen: np.ndarray
    lines_since_publish: int = 0
    last_line_time: float = 0.0
    last_submit: float = float("-inf")


@dataclass
class ScanState:
    start: ScanStart
    planned: np.ndarray
    row_columns: list[slice | np.ndarray]
    row_lengths: np.ndarray
    directions: dict[str, DirectionFrames]
    channel_names: tuple[str, ...]
    last_seq: int = -1
    last_activity: float = 0.0
    lines: int = 0
    out_of_order: int = 0
    end_reason: str | None = None

    @property
    def uid(self) -> str:
        return self.start.uid

    @property
    def missing(self) -> int:
        """Sequence numbers (which start at 0 per scan) never placed in this scan's frames."""
        return max(0, self.last_seq + 1 - self.lines)


def _row_columns(planned: np.ndarray) -> list[slice | np.ndarray]:
    """Per row, the cheapest index that selects its planned columns."""
    cols = planned.shape[1]
    out: list[slice | np.ndarray] = []
    for row in planned:
        idx = np.flatnonzero(row)
        if idx.size == cols:
            out.append(slice(None))
        elif idx.size > 1 and np.all(np.diff(idx) == idx[1] - idx[0]) and idx[0] == 0:
            out.append(slice(0, None, int(idx[1] - idx[0])))
        else:
            out.append(idx)
    return out


class FrameAssembler:
    """Holds the open scans, at most `max_active_scans`, least recently fed evicted first."""

    def __init__(self, max_active_scans: int = 64) -> None:
        self.max_active_scans = max_active_scans
        self.scans: OrderedDict[str, ScanState] = OrderedDict()

    def start(self, msg: ScanStart) -> tuple[ScanState, ScanState | None]:
        """Open a scan; returns it and the scan evicted to make room, if any."""
        if msg.uid in self.scans:
            raise AssemblyError("duplicate_scan_start", f"scan {msg.uid} is already open")
        try:
            planned = parse_plan(msg.plan).mask(msg.rows, msg.cols, msg.scan_direction)
        except PlanError as exc:
            raise AssemblyError("bad_plan", str(exc)) from None
        evicted = None
        if len(self.scans) >= self.max_active_scans:
            evicted = self.finish(next(iter(self.scans)), "aborted")
        shape = (msg.rows, msg.cols)
        state = ScanState(
            start=msg, planned=planned, row_columns=_row_columns(planned),
            row_lengths=planned.sum(axis=1),
            directions={
                d: DirectionFrames(
                    images=[np.full(shape, np.nan, CHANNEL_DTYPES[c.dtype]) for c in msg.channels],
                    measured=np.zeros(shape, bool), rows_seen=np.zeros(msg.rows, bool),
                )
                for d in msg.line_directions
            },
            channel_names=tuple(c.name for c in msg.channels),
            last_activity=time.perf_counter(),
        )
        self.scans[msg.uid] = state
        return state, evicted

    def add_line(self, msg: Line, received: float) -> tuple[ScanState, DirectionFrames]:
        """Place a line in its scan; returns the scan and direction it changed."""
        state = self.scans.get(msg.uid)
        if state is None:
            raise AssemblyError("unknown_scan", f"line for scan {msg.uid} without scan_start")
        frames = state.directions.get(msg.direction)
        if frames is None:
            raise AssemblyError("bad_direction", f"scan {msg.uid} has no {msg.direction} lines")
        if msg.channels != state.channel_names:
            raise AssemblyError("bad_channels", f"line channels {msg.channels} != {state.channel_names}")
        row = msg.row
        if row >= state.start.rows:
            raise AssemblyError("bad_row", f"row {row} outside {state.start.rows} rows")
        expected = state.row_lengths[row]
        if expected == 0:
            raise AssemblyError("off_plan", f"row {row} is not measured by plan {state.start.plan}")
        if any(a.shape[0] != expected for a in msg.arrays):
            raise AssemblyError("bad_length", f"row {row} needs {expected} values per channel")
        if frames.rows_seen[row]:
            raise AssemblyError("duplicate_line", f"row {row} {msg.direction} already received")
        columns = state.row_columns[row]
        for image, values in zip(frames.images, msg.arrays):
            image[row, columns] = values
        frames.measured[row, columns] = np.isfinite(msg.arrays[0])
        frames.rows_seen[row] = True
        frames.lines_since_publish += 1
        frames.last_line_time = received
        if msg.seq <= state.last_seq:
            state.out_of_order += 1
        else:
            state.last_seq = msg.seq
        state.lines += 1
        state.last_activity = received
        self.scans.move_to_end(msg.uid)
        return state, frames

    def end(self, msg: ScanEnd) -> ScanState:
        if msg.uid not in self.scans:
            raise AssemblyError("unknown_scan", f"scan_end for scan {msg.uid} without scan_start")
        return self.finish(msg.uid, msg.reason)

    def restore(self, state: ScanState) -> None:
        """Take back a scan rebuilt from its journal (a restarted daemon resuming it)."""
        if state.uid in self.scans:
            raise AssemblyError("duplicate_scan_start", f"scan {state.uid} is already open")
        self.scans[state.uid] = state

    def finish(self, uid: str, reason: str) -> ScanState:
        """Close a scan (at its end, on eviction or at shutdown) and hand it back."""
        state = self.scans.pop(uid)
        state.end_reason = reason
        return state

    def close_all(self, reason: str = "aborted") -> list[ScanState]:
        return [self.finish(uid, reason) for uid in list(self.scans)]
