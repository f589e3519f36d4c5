"""A Nanonis controller emulator: the documented TCP framing and commands, backed by the simulator.

It lets the Nanonis driver be tested over real sockets and lets users try the whole chain without
hardware. Scanning runs in real time: `Scan.Action start` draws a simulated frame for the current
buffer (pixels x lines over the current frame size) and lines complete one per line time, in the
scan direction; `Scan.FrameDataGrab` returns the frame buffer in image orientation (row 0 at the
top) with unscanned rows as NaN (or 0). The 2021 edition lacks `Scan.WaitEndOfLine`. Unknown
commands get the controller's error section, not a dropped socket. `restart()` drops every
connection and forgets the scan, as a restarted controller does; `reply_delay_s` makes it slow.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from stm_live.drivers.nanonis_client import MOVEMENTS, SCAN_ACTIONS, TIP_SHAPER_FIELDS
from stm_live.drivers.nanonis_wire import NanonisProtocolError, Reader, Writer, pack_header, recv_message
from stm_live.sim.frames import random_spec, simulate_frame

log = logging.getLogger(__name__)

CHANNELS = {30: "Z (m)", 0: "Current (A)"}
BIAS_SIGNAL, CURRENT_SIGNAL, Z_SIGNAL = 24, 0, 30


@dataclass
class ScanState:
    running: bool = False
    up: bool = False
    started: float = 0.0
    paused_at: float | None = None
    paused_total: float = 0.0
    pass_number: int = 0
    data: dict[tuple[int, bool], np.ndarray] = field(default_factory=dict)
    lines: int = 0
    line_time_s: float = 0.1


class NanonisEmulator:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, edition: str = "2024", surface: str = "si111_7x7",
                 tip: str = "good", seed: int = 0, line_time_s: float = 0.05, reply_delay_s: float = 0.0,
                 unscanned: float = float("nan")) -> None:
        self.host = host
        self.port = port
        self.edition = edition
        self.surface, self.tip, self.seed = surface, tip, seed
        self.reply_delay_s = reply_delay_s
        self.unscanned = unscanned
        self.frame = [0.0, 0.0, 20e-9, 20e-9, 0.0]
        self.buffer = ([30, 0], 256, 256)
        self.line_time_s = line_time_s
        self.bias_v = -2.0
        self.setpoint_a = 50e-12
        self.z_on = True
        self.actions: list[tuple[str, dict]] = []
        self.corrupt_next: set[str] = set()
        self.scan = ScanState()
        self.frames_started = 0
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._server: socketserver.ThreadingTCPServer | None = None
        self._connections: set[socket.socket] = set()

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        emulator = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                emulator._serve_connection(self.request)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self._server = Server((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="nanonis-emulator", daemon=True).start()
        return self.host, self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for conn in list(self._connections):
                _close(conn)
            self._connections.clear()
            self._changed.notify_all()

    def restart(self, down_s: float = 0.2) -> None:
        """Drop every connection, forget the scan, come back on the same port."""
        self.stop()
        with self._lock:
            self.scan = ScanState()
        time.sleep(down_s)
        self.start()

    # -- connection loop ---------------------------------------------------------------------
    def _serve_connection(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
        try:
            while True:
                try:
                    command, body = recv_message(conn)
                except (NanonisProtocolError, OSError):
                    return
                reply = self._dispatch(command, body)
                if self.reply_delay_s:
                    time.sleep(self.reply_delay_s)
                if command in self.corrupt_next:
                    self.corrupt_next.discard(command)
                    reply = reply[: max(0, len(reply) // 2)]
                try:
                    conn.sendall(pack_header(command, len(reply), respond=False) + reply)
                except OSError:
                    return
        finally:
            with self._lock:
                self._connections.discard(conn)
            _close(conn)

    def _dispatch(self, command: str, body: bytes) -> bytes:
        handler = getattr(self, "_cmd_" + command.replace(".", "_"), None)
        if handler is None or (command == "Scan.WaitEndOfLine" and self.edition < "2024"):
            return Writer().error_section(f"Unknown command {command}").bytes()
        try:
            out = Writer()
            handler(Reader(command, body), out)
            return out.error_section().bytes()
        except NanonisProtocolError as exc:
            return Writer().error_section(f"Malformed request: {exc}").bytes()
        except CommandError as exc:
            return Writer().error_section(str(exc)).bytes()

    # -- scan progress -----------------------------------------------------------------------
    def _rows_done(self) -> int:
        s = self.scan
        if not s.data:
            return 0
        now = s.paused_at if s.paused_at is not None else time.monotonic()
        done = int((now - s.started - s.paused_total) / s.line_time_s)
        if done >= s.lines and s.running:
            s.running = False
            self._changed.notify_all()
        return min(done, s.lines)

    def _acquired_rows(self, done: int) -> np.ndarray:
        rows = np.arange(self.scan.lines)
        return rows[::-1][:done] if self.scan.up else rows[:done]

    def _start_scan(self, up: bool) -> None:
        channels, pixels, lines = self.buffer
        rng = np.random.default_rng([self.seed, self.frames_started])
        self.frames_started += 1
        width_nm = self.frame[2] * 1e9
        spec = random_spec(rng, pixels, surface=self.surface, scenario=self.tip, frame_nm=width_nm, bias_v=self.bias_v)
        frame = simulate_frame(spec, rng)
        pick = np.round(np.arange(lines) * pixels / lines).astype(int)
        z = (frame.measurement.z[:, pick] * 1e-9).astype(np.float32)
        current = frame.measurement.current[:, pick].astype(np.float32)
        self.scan = ScanState(True, up, time.monotonic(), lines=lines, line_time_s=self.line_time_s, data={
            (30, True): z[0], (30, False): z[1], (0, True): current[0], (0, False): current[1]})
        self._changed.notify_all()

    # -- commands ----------------------------------------------------------------------------
    def _cmd_Scan_Action(self, r: Reader, w: Writer) -> None:
        action, up = r.u16(), bool(r.u32())
        with self._lock:
            if action == SCAN_ACTIONS["start"]:
                self._start_scan(up)
            elif action == SCAN_ACTIONS["stop"]:
                self._rows_done()
                self.scan.running = False
                self._changed.notify_all()
            elif action == SCAN_ACTIONS["pause"] and self.scan.running and self.scan.paused_at is None:
                self.scan.paused_at = time.monotonic()
            elif action == SCAN_ACTIONS["resume"] and self.scan.paused_at is not None:
                self.scan.paused_total += time.monotonic() - self.scan.paused_at
                self.scan.paused_at = None

    def _cmd_Scan_StatusGet(self, r: Reader, w: Writer) -> None:
        with self._lock:
            self._rows_done()
            w.u32(1 if self.scan.running else 0)

    def _cmd_Scan_WaitEndOfLine(self, r: Reader, w: Writer) -> None:
        timeout_ms = r.i32()
        deadline = time.monotonic() + (timeout_ms / 1000 if timeout_ms >= 0 else 1e9)
        with self._lock:
            start = self._rows_done()
            while self._rows_done() == start and self.scan.running and time.monotonic() < deadline:
                self._changed.wait(min(self.scan.line_time_s / 4, max(0.0, deadline - time.monotonic())) or 0.001)
            done = self._rows_done()
            timed_out = done == start
            line = int(self._acquired_rows(done)[-1]) if done else -1
            w.u32(1 if timed_out else 0).i32(line).u16(MOVEMENTS.index("forward")).i32(self.scan.pass_number)

    def _cmd_Scan_WaitEndOfScan(self, r: Reader, w: Writer) -> None:
        timeout_ms = r.i32()
        deadline = time.monotonic() + (timeout_ms / 1000 if timeout_ms >= 0 else 1e9)
        with self._lock:
            while self.scan.running and time.monotonic() < deadline:
                self._rows_done()
                self._changed.wait(0.01)
            w.u32(1 if self.scan.running else 0).string("")

    def _cmd_Scan_FrameGet(self, r: Reader, w: Writer) -> None:
        for value in self.frame:
            w.f32(value)

    def _cmd_Scan_FrameSet(self, r: Reader, w: Writer) -> None:
        values = [r.f32() for _ in range(5)]
        if values[2] <= 0 or values[3] <= 0:
            raise CommandError("frame width and height must be positive")
        self.frame = values

    def _cmd_Scan_BufferGet(self, r: Reader, w: Writer) -> None:
        channels, pixels, lines = self.buffer
        w.i32(len(channels)).i32_array(channels).i32(pixels).i32(lines)

    def _cmd_Scan_BufferSet(self, r: Reader, w: Writer) -> None:
        n = r.i32()
        if not 0 < n <= 128:
            raise CommandError(f"invalid channel count {n}")
        channels = [int(c) for c in r.i32_array(n)]
        pixels, lines = r.i32(), r.i32()
        if any(c not in CHANNELS for c in channels):
            raise CommandError(f"channel indices {channels} not available")
        if not 16 <= pixels <= 4096 or not 1 <= lines <= 4096:
            raise CommandError(f"invalid buffer size {pixels}x{lines}")
        self.buffer = (channels, pixels // 16 * 16, lines)

    def _cmd_Scan_PropsGet(self, r: Reader, w: Writer) -> None:
        w.u32(0).u32(0).u32(2).string("emulated_").string("stm-live Nanonis emulator")

    def _cmd_Scan_FrameDataGrab(self, r: Reader, w: Writer) -> None:
        channel, forward = r.u32(), bool(r.u32())
        with self._lock:
            channels, pixels, lines = self.buffer
            if channel not in channels:
                raise CommandError(f"channel {channel} is not in the scan buffer")
            done = self._rows_done()
            source = self.scan.data.get((channel, forward))
            frame = np.full((lines, pixels), self.unscanned, dtype=np.float32)
            if source is not None and source.shape == frame.shape:
                rows = self._acquired_rows(done)
                frame[rows] = source[rows]
            w.string(CHANNELS[channel]).i32(lines).i32(pixels).f32_array(frame.ravel()).u32(1 if self.scan.up else 0)

    def _cmd_Scan_SpeedGet(self, r: Reader, w: Writer) -> None:
        half = self.line_time_s / 2
        w.f32(self.frame[2] / half).f32(self.frame[2] / half).f32(half).f32(half).u16(1).f32(1.0)

    def _cmd_Bias_Get(self, r: Reader, w: Writer) -> None:
        w.f32(self.bias_v)

    def _cmd_Bias_Pulse(self, r: Reader, w: Writer) -> None:
        wait, width, bias, z_hold, mode = r.u32(), r.f32(), r.f32(), r.u16(), r.u16()
        self.actions.append(("Bias.Pulse", {"width_s": width, "bias_v": bias, "z_hold": z_hold, "mode": mode}))
        if wait:
            time.sleep(min(width, 1.0))

    def _cmd_TipShaper_PropsSet(self, r: Reader, w: Writer) -> None:
        values = {k: (r.u32() if kind == "u32" else r.f32()) for k, kind in TIP_SHAPER_FIELDS.items()}
        self.actions.append(("TipShaper.PropsSet", values))

    def _cmd_TipShaper_Start(self, r: Reader, w: Writer) -> None:
        self.actions.append(("TipShaper.Start", {"wait": r.u32(), "timeout_ms": r.i32()}))

    def _cmd_ZCtrl_OnOffSet(self, r: Reader, w: Writer) -> None:
        self.z_on = bool(r.u32())

    def _cmd_ZCtrl_Home(self, r: Reader, w: Writer) -> None:
        self.actions.append(("ZCtrl.Home", {}))

    def _cmd_ZCtrl_SetpntGet(self, r: Reader, w: Writer) -> None:
        w.f32(self.setpoint_a)

    def _cmd_Signals_ValsGet(self, r: Reader, w: Writer) -> None:
        n = r.i32()
        indices = [int(i) for i in r.i32_array(n)]
        r.u32()
        values = {BIAS_SIGNAL: self.bias_v, CURRENT_SIGNAL: self.setpoint_a, Z_SIGNAL: 0.0}
        w.i32(n).f32_array([values.get(i, 0.0) for i in indices])


class CommandError(Exception):
    """A request the emulated controller refuses; sent back in the error section."""


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()
