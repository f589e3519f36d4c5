"""A Nanonis TCP client: one method per command a scan-streaming driver needs.

Our own implementation of the documented framing (drivers.nanonis_wire). Socket errors and
timeouts close the connection and raise ConnectionError, so a caller can reconnect; the
controller's own errors raise NanonisError with its description; malformed replies raise
NanonisProtocolError. A lock keeps one request in flight per connection, as the controller
answers commands on one connection in order.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from stm_live.drivers.nanonis_wire import (
    NanonisError,
    NanonisProtocolError,
    Reader,
    Writer,
    error_only,
    pack_header,
    recv_message,
)

T = TypeVar("T")

SCAN_ACTIONS = {"start": 0, "stop": 1, "pause": 2, "resume": 3, "freeze": 4, "unfreeze": 5, "centre": 6}
MOVEMENTS = ("forward", "backward", "to_centre", "to_start")
MAX_GRAB_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class Frame:
    centre_x_m: float
    centre_y_m: float
    width_m: float
    height_m: float
    angle_deg: float


@dataclass(frozen=True)
class Buffer:
    channels: tuple[int, ...]
    pixels: int
    lines: int


@dataclass(frozen=True)
class Speed:
    forward_m_s: float
    backward_m_s: float
    forward_line_time_s: float
    backward_line_time_s: float
    keep_constant: int
    ratio: float


@dataclass(frozen=True)
class Grab:
    channel_name: str
    data: np.ndarray
    scan_up: bool


@dataclass(frozen=True)
class EndOfLine:
    timed_out: bool
    line: int
    movement: str
    pass_number: int


class NanonisClient:
    def __init__(self, host: str, port: int, timeout_s: float = 5.0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    # -- transport ---------------------------------------------------------------------------
    def connect(self) -> None:
        with self._lock:
            self._connect()

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        return self._sock

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def call(self, command: str, body: bytes = b"", parse: Callable[[Reader], T] = lambda r: None,
             timeout_s: float | None = None) -> T:
        """Send one command and parse its reply; see the module docstring for the errors."""
        with self._lock:
            try:
                sock = self._connect()
                sock.settimeout(timeout_s or self.timeout_s)
                sock.sendall(pack_header(command, len(body)) + body)
                name, data = recv_message(sock)
            except (OSError, NanonisProtocolError) as exc:
                self._drop()
                if isinstance(exc, NanonisProtocolError):
                    raise
                raise ConnectionError(f"{command}: {exc or type(exc).__name__}") from exc
        if name != command:
            raise NanonisProtocolError(f"sent {command}, reply is for {name!r}")
        reader = Reader(command, data)
        try:
            result = parse(reader)
            reader.error_section()
        except NanonisProtocolError:
            error = error_only(command, data)
            if error is not None:
                raise error from None
            raise
        return result

    # -- scan ------------------------------------------------------------------------------
    def scan_action(self, action: str, up: bool = False) -> None:
        self.call("Scan.Action", Writer().u16(SCAN_ACTIONS[action]).u32(1 if up else 0).bytes())

    def scan_status(self) -> bool:
        return bool(self.call("Scan.StatusGet", parse=lambda r: r.u32()))

    def wait_end_of_line(self, timeout_ms: int) -> EndOfLine:
        def parse(r: Reader) -> EndOfLine:
            timed_out, line, movement, pass_number = r.u32(), r.i32(), r.u16(), r.i32()
            return EndOfLine(bool(timed_out), line, MOVEMENTS[movement] if movement < 4 else "unknown", pass_number)

        return self.call("Scan.WaitEndOfLine", Writer().i32(timeout_ms).bytes(), parse,
                         timeout_s=timeout_ms / 1000 + self.timeout_s)

    def wait_end_of_scan(self, timeout_ms: int) -> tuple[bool, str]:
        def parse(r: Reader) -> tuple[bool, str]:
            timed_out = bool(r.u32())
            path = r.string()
            return timed_out, path

        return self.call("Scan.WaitEndOfScan", Writer().i32(timeout_ms).bytes(), parse,
                         timeout_s=timeout_ms / 1000 + self.timeout_s)

    def frame_get(self) -> Frame:
        return self.call("Scan.FrameGet", parse=lambda r: Frame(*(r.f32() for _ in range(5))))

    def frame_set(self, frame: Frame) -> None:
        w = Writer()
        for value in (frame.centre_x_m, frame.centre_y_m, frame.width_m, frame.height_m, frame.angle_deg):
            w.f32(value)
        self.call("Scan.FrameSet", w.bytes())

    def buffer_get(self) -> Buffer:
        def parse(r: Reader) -> Buffer:
            n = r.i32()
            if not 0 <= n <= 128:
                raise NanonisProtocolError(f"Scan.BufferGet: {n} channels")
            channels = tuple(int(c) for c in r.i32_array(n))
            return Buffer(channels, r.i32(), r.i32())

        return self.call("Scan.BufferGet", parse=parse)

    def buffer_set(self, buffer: Buffer) -> None:
        self.call("Scan.BufferSet", Writer().i32(len(buffer.channels)).i32_array(buffer.channels)
                  .i32(buffer.pixels).i32(buffer.lines).bytes())

    def props_get(self) -> dict[str, Any]:
        def parse(r: Reader) -> dict[str, Any]:
            return {"continuous": bool(r.u32()), "bouncy": bool(r.u32()), "autosave": r.u32(),
                    "series_name": r.string(), "comment": r.string()}

        return self.call("Scan.PropsGet", parse=parse)

    def frame_data_grab(self, channel: int, forward: bool) -> Grab:
        def parse(r: Reader) -> Grab:
            name = r.string()
            rows, cols = r.i32(), r.i32()
            if rows < 0 or cols < 0 or rows * cols > MAX_GRAB_PIXELS:
                raise NanonisProtocolError(f"Scan.FrameDataGrab: absurd frame {rows}x{cols}")
            data = r.f32_array(rows * cols).reshape(rows, cols)
            return Grab(name, data, bool(r.u32()))

        return self.call("Scan.FrameDataGrab", Writer().u32(channel).u32(1 if forward else 0).bytes(), parse)

    def speed_get(self) -> Speed:
        return self.call("Scan.SpeedGet", parse=lambda r: Speed(r.f32(), r.f32(), r.f32(), r.f32(), r.u16(), r.f32()))

    # -- bias, tip, feedback, signals --------------------------------------------------------
    def bias_get(self) -> float:
        return self.call("Bias.Get", parse=lambda r: r.f32())

    def bias_pulse(self, width_s: float, bias_v: float, wait: bool = True, z_hold: int = 1, mode: int = 1) -> None:
        self.call("Bias.Pulse", Writer().u32(1 if wait else 0).f32(width_s).f32(bias_v).u16(z_hold).u16(mode).bytes(),
                  timeout_s=width_s + self.timeout_s)

    def tip_shaper_props_set(self, values: dict[str, float]) -> None:
        w = Writer()
        for key in TIP_SHAPER_FIELDS:
            kind, value = TIP_SHAPER_FIELDS[key], values[key]
            w.u32(int(value)) if kind == "u32" else w.f32(float(value))
        self.call("TipShaper.PropsSet", w.bytes())

    def tip_shaper_start(self, wait: bool = True, timeout_ms: int = 30_000) -> None:
        self.call("TipShaper.Start", Writer().u32(1 if wait else 0).i32(timeout_ms).bytes(),
                  timeout_s=timeout_ms / 1000 + self.timeout_s)

    def z_controller(self, on: bool) -> None:
        self.call("ZCtrl.OnOffSet", Writer().u32(1 if on else 0).bytes())

    def z_home(self) -> None:
        self.call("ZCtrl.Home")

    def setpoint_get(self) -> float:
        return self.call("ZCtrl.SetpntGet", parse=lambda r: r.f32())

    def signals_get(self, indices: list[int], wait_newest: bool = True) -> np.ndarray:
        def parse(r: Reader) -> np.ndarray:
            n = r.i32()
            if n != len(indices):
                raise NanonisProtocolError(f"Signals.ValsGet: {n} values for {len(indices)} signals")
            return r.f32_array(n)

        return self.call("Signals.ValsGet", Writer().i32(len(indices)).i32_array(indices)
                         .u32(1 if wait_newest else 0).bytes(), parse)


TIP_SHAPER_FIELDS = {
    "switch_off_delay_s": "f32", "change_bias": "u32", "bias_v": "f32", "tip_lift_m": "f32",
    "lift_time_1_s": "f32", "bias_lift_v": "f32", "settling_time_s": "f32", "lift_height_m": "f32",
    "lift_time_2_s": "f32", "end_wait_s": "f32", "restore_feedback": "u32",
}

__all__ = ["Buffer", "EndOfLine", "Frame", "Grab", "NanonisClient", "NanonisError", "NanonisProtocolError", "Speed"]
