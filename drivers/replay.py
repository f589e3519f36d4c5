"""Replay recorded scans through the pipeline, line by line, as if an instrument were scanning."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from stm_live.drivers.publisher import InstrumentPublisher
from stm_live.drivers.scanfiles import ScanFile, read_scan_file
from stm_live.plans import parse_plan
from stm_live.protocol import ChannelInfo, ScanStart

log = logging.getLogger(__name__)


def scan_uid(path: Path, index: int) -> str:
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.stem)[:80] or "scan"
    return f"replay-{index:03d}-{stem}"


class ReplayDriver:
    """Publishes each file's rows in acquisition order at `line_rate_hz` rows per second.

    A rate of 0 uses each file's recorded line time. A sparse plan publishes only the plan's
    pixels of the recorded frame, so a file can stand in for a sparse acquisition.
    """

    def __init__(self, publisher: InstrumentPublisher, plan: str = "full", line_rate_hz: float = 0.0,
                 size_nm: float | None = None) -> None:
        self.publisher = publisher
        self.plan = parse_plan(plan)
        self.line_rate_hz = line_rate_hz
        self.size_nm = size_nm

    def replay(self, files: Sequence[str | Path], should_stop: Callable[[], bool] = lambda: False) -> int:
        sent = 0
        for index, path in enumerate(files):
            if should_stop():
                break
            scan = read_scan_file(path, self.size_nm)
            sent += self.replay_scan(scan_uid(Path(path), index), scan, should_stop)
        return sent

    def replay_scan(self, uid: str, scan: ScanFile, should_stop: Callable[[], bool] = lambda: False) -> int:
        rows, cols = scan.shape
        channels = tuple(ChannelInfo(_safe_name(c.name), c.unit[:16], "float32") for c in scan.channels)
        directions = ("forward", "backward") if all(c.backward is not None for c in scan.channels) else ("forward",)
        period = 1.0 / self.line_rate_hz if self.line_rate_hz else (scan.line_time_s or 0.1)
        mask = self.plan.mask(rows, cols, scan.scan_direction)
        self.publisher.scan_start(ScanStart(
            uid=uid, instrument=f"replay-{scan.extra.get('format', 'file')}", channels=channels, rows=rows, cols=cols,
            size_nm=scan.size_nm, scan_direction=scan.scan_direction, plan=str(self.plan),
            line_directions=directions, line_time_s=period, bias_v=_finite(scan.bias_v),
            setpoint_a=_finite(scan.setpoint_a), t=time.time(),
            extra={"file": scan.path.name, **scan.extra,
                   **{f"{k}_unknown": True for k in ("bias_v", "setpoint_a") if not np.isfinite(getattr(scan, k))}},
        ))
        start = time.perf_counter()
        sent = 0
        for i, row in enumerate(self.plan.row_order(rows, cols, scan.scan_direction)):
            if should_stop():
                self.publisher.scan_end(uid, "aborted")
                return sent
            delay = start + i * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            for direction in directions:
                values = [(c.forward if direction == "forward" else c.backward)[row, mask[row]] for c in scan.channels]
                self.publisher.line(uid, int(row), direction, channels, values)
                sent += 1
        self.publisher.scan_end(uid, "complete")
        log.info("replayed %s: %d lines", scan.path.name, sent)
        return sent


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_ .()/+-" else "_" for c in name)
    return cleaned[:64] or "channel"


def _finite(value: float) -> float:
    return float(value) if np.isfinite(value) else 0.0
