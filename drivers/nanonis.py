"""The Nanonis driver: follows the controller's scans and publishes them line by line.

The controller pushes no lines, so the driver follows a scan with `Scan.WaitEndOfLine` where the
controller has it (2024 edition and later) and otherwise polls `Scan.FrameDataGrab` about twice
per line time; either way each grab returns the whole frame buffer, from which newly completed
rows are taken. A row is complete once a later row (in acquisition order) has data, the
controller reported it as ended, or the scan stopped; rows not yet scanned may read NaN or 0.
Both traces are taken as the grab returns them, in image orientation (left to right; unverified
on a real controller for the backward trace).

Sparse plans are set with `Scan.BufferSet`: `lines:K` scans the same frame with 1/K of the lines,
`sr:K` with 1/K of the lines and pixels, `partial:N` stops the scan after N lines. A lost
connection ends the open scan as aborted; the driver reconnects and follows the next scan.
Conditioning requests arrive on the driver's own action channel (drivers/actions.py), polled
between steps, and are checked against the configured limits here, in the driver, whatever
asked for them.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from stm_live.drivers.actions import ActionServer
from stm_live.drivers.conditioning import ConditioningGate, tip_shaper_values
from stm_live.drivers.nanonis_client import Buffer, NanonisClient, NanonisError
from stm_live.drivers.publisher import InstrumentPublisher
from stm_live.security import LOOPBACK_ONLY, Security
from stm_live.plans import PlanError, parse_plan
from stm_live.protocol import ChannelInfo, ScanStart

log = logging.getLogger(__name__)


@dataclass
class FollowedScan:
    uid: str
    channels: tuple[int, ...]
    infos: tuple[ChannelInfo, ...]
    buffer: Buffer
    up: bool
    row_step: int
    line_time_s: float
    sent: dict[str, set[int]] = field(default_factory=lambda: {"forward": set(), "backward": set()})
    planned_rows: int = 0


def _split_unit(name: str) -> tuple[str, str]:
    match = re.match(r"^(.*?)\s*\(([^)]*)\)\s*$", name)
    return (match.group(1).strip(), match.group(2)) if match else (name, "")


def _has_data(frame: np.ndarray) -> np.ndarray:
    """Rows holding measured values: finite and not all exactly zero (unscanned rows read NaN or 0)."""
    finite = np.isfinite(frame)
    return finite.all(axis=1) & np.any(frame != 0, axis=1)


class NanonisDriver:
    def __init__(self, client: NanonisClient, publisher: InstrumentPublisher, *, plan: str = "full",
                 start_scans: bool = False, scan_up: bool = False, poll_s: float = 0.05, reconnect_s: float = 1.0,
                 gate: ConditioningGate | None = None, actions_endpoint: str = "", instrument: str = "nanonis",
                 security: Security = LOOPBACK_ONLY) -> None:
        self.client = client
        self.publisher = publisher
        self.plan = parse_plan(plan)
        if self.plan.kind == "pixels":
            raise PlanError("a Nanonis buffer cannot sample random pixels; use full, lines:K, sr:K or partial:N")
        self.start_scans = start_scans
        self.scan_up = scan_up
        self.poll_s = poll_s
        self.reconnect_s = reconnect_s
        self.actions = (ActionServer(actions_endpoint, gate, self.execute, security=security)
                        if gate and actions_endpoint else None)
        self.instrument = instrument
        self.scan: FollowedScan | None = None
        self.wait_end_of_line: bool | None = None
        self.scans_published = 0
        self.reconnects = 0
        self._full_buffer: Buffer | None = None

    # -- main loop ---------------------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool] = lambda: False, max_scans: int | None = None) -> None:
        while not should_stop() and (max_scans is None or self.scans_published < max_scans):
            if self.actions is not None:
                self.actions.poll()
            try:
                self.step()
            except ConnectionError as exc:
                self._lost(exc)
            except NanonisError as exc:
                log.warning("controller error: %s", exc)
                time.sleep(self.poll_s)
        if self.scan is not None:
            self._end("aborted")
        if self.actions is not None:
            self.actions.close()

    def step(self) -> None:
        """One round: open a scan if one is running (or start one), else follow the open scan."""
        if not self.client.connected:
            self.client.connect()
        if self.scan is None:
            if self.start_scans:
                self._configure_plan()
                self.client.scan_action("start", up=self.scan_up)
            if self.client.scan_status():
                self._open()
            else:
                time.sleep(self.poll_s)
            return
        self._follow()

    def _lost(self, exc: Exception) -> None:
        log.warning("lost the controller (%s); reconnecting in %.1f s", exc, self.reconnect_s)
        if self.scan is not None:
            self._end("aborted")
        self.client.close()
        self.reconnects += 1
        time.sleep(self.reconnect_s)

    # -- plans -------------------------------------------------------------------------------
    def _configure_plan(self) -> None:
        """Set the buffer for the plan, relative to the full-resolution buffer seen first."""
        if self._full_buffer is None:
            self._full_buffer = self.client.buffer_get()
        full = self._full_buffer
        step = self.plan.step if self.plan.kind in ("lines", "sr") else 1
        pixels = full.pixels // step if self.plan.kind == "sr" else full.pixels
        self.client.buffer_set(Buffer(full.channels, pixels, max(1, full.lines // step)))

    # -- following a scan --------------------------------------------------------------------
    def _open(self) -> None:
        buffer = self.client.buffer_get()
        frame = self.client.frame_get()
        speed = self.client.speed_get()
        bias = self._optional(self.client.bias_get)
        setpoint = self._optional(self.client.setpoint_get)
        grabs = [self.client.frame_data_grab(ch, True) for ch in buffer.channels]
        infos = tuple(ChannelInfo(*_split_unit(g.channel_name), "float32") for g in grabs)
        up = grabs[0].scan_up
        step = 1
        plan = self.plan if self.start_scans else parse_plan("full")
        if self.start_scans and plan.kind in ("lines", "sr") and self._full_buffer is not None:
            step = max(1, self._full_buffer.lines // buffer.lines)
        rows_total = buffer.lines * step
        cols_total = buffer.pixels * (step if plan.kind == "sr" else 1)
        line_time = speed.forward_line_time_s + speed.backward_line_time_s
        uid = f"nanonis-{time.strftime('%Y%m%d-%H%M%S')}-{self.scans_published:04d}"
        planned = (plan.row_order(rows_total, cols_total, "up" if up else "down")).size
        self.scan = FollowedScan(uid, buffer.channels, infos, buffer, up, step, line_time, planned_rows=planned)
        self.publisher.scan_start(ScanStart(
            uid=uid, instrument=self.instrument, channels=infos, rows=rows_total, cols=cols_total,
            size_nm=(frame.width_m * 1e9, frame.height_m * 1e9), scan_direction="up" if up else "down",
            plan=str(plan), line_directions=("forward", "backward"), line_time_s=line_time,
            bias_v=bias, setpoint_a=setpoint, t=time.time(),
            extra={"centre_m": [frame.centre_x_m, frame.centre_y_m], "angle_deg": frame.angle_deg,
                   "buffer_channels": list(buffer.channels), "buffer_pixels": buffer.pixels,
                   "buffer_lines": buffer.lines},
        ))
        log.info("following scan %s: %d lines of %d px, plan %s", uid, buffer.lines, buffer.pixels, plan)

    def _optional(self, getter: Callable[[], float]) -> float:
        try:
            value = float(getter())
        except NanonisError as exc:
            log.info("controller does not report %s: %s", getter.__name__, exc)
            return 0.0
        return value if np.isfinite(value) else 0.0

    def _follow(self) -> None:
        scan = self.scan
        ended_line = None
        if self.wait_end_of_line is not False:
            try:
                eol = self.client.wait_end_of_line(int(max(2 * scan.line_time_s, 0.05) * 1000))
                self.wait_end_of_line = True
                ended_line = None if eol.timed_out else eol.line
            except NanonisError:
                log.info("controller has no Scan.WaitEndOfLine; polling Scan.FrameDataGrab instead")
                self.wait_end_of_line = False
        if self.wait_end_of_line is False:
            time.sleep(min(self.poll_s, scan.line_time_s / 2))
        running = self.client.scan_status()
        self._publish_new_rows(ended_line, finished=not running)
        done = len(scan.sent["forward"]) >= scan.planned_rows and len(scan.sent["backward"]) >= scan.planned_rows
        if self.plan.kind == "partial" and self.start_scans and done and running:
            self.client.scan_action("stop")
            running = False
        if not running:
            self._end("complete" if done else "aborted")

    def _publish_new_rows(self, ended_line: int | None, finished: bool) -> None:
        scan = self.scan
        for direction, forward in (("forward", True), ("backward", False)):
            grabs = [self.client.frame_data_grab(ch, forward).data for ch in scan.channels]
            if any(g.shape != (scan.buffer.lines, scan.buffer.pixels) for g in grabs):
                raise NanonisError("Scan.FrameDataGrab", f"frame shape {grabs[0].shape} changed during the scan")
            has_data = _has_data(grabs[0])
            order = np.arange(scan.buffer.lines)[::-1] if scan.up else np.arange(scan.buffer.lines)
            acquired = has_data[order]
            last = int(np.flatnonzero(acquired)[-1]) if acquired.any() else -1
            for k in range(last + 1):
                row = int(order[k])
                complete = finished or k < last or row == ended_line
                if not acquired[k] or not complete or row in scan.sent[direction]:
                    continue
                image_row = row * scan.row_step
                values = [g[row] for g in grabs]
                self.publisher.line(scan.uid, image_row, direction, scan.infos, values)
                scan.sent[direction].add(row)
                if self.plan.kind == "partial" and self.start_scans and len(scan.sent[direction]) >= self.plan.count:
                    break

    def _end(self, reason: str) -> None:
        scan = self.scan
        self.publisher.scan_end(scan.uid, reason)
        log.info("scan %s ended (%s): %d forward, %d backward lines", scan.uid, reason,
                 len(scan.sent["forward"]), len(scan.sent["backward"]))
        self.scan = None
        self.scans_published += 1

    # -- conditioning ------------------------------------------------------------------------
    def execute(self, request: dict) -> None:
        """Run a request the action server's gate has accepted: Bias.Pulse or the tip shaper."""
        if request["action"] == "bias_pulse":
            self.client.bias_pulse(request["width_s"], request["bias_v"], wait=True, z_hold=1, mode=1)
        else:
            self.client.tip_shaper_props_set(tip_shaper_values(request))
            self.client.tip_shaper_start(wait=True)
