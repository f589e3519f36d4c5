"""`stm-live view`: the live viewer (pyqtgraph on PySide6).

A ZeroMQ SUB socket's file descriptor drives a QSocketNotifier: on every wake-up the viewer
drains everything waiting into the ViewerModel (one latest frame per slot) and draws once the
last render is a display period old; a timer renders the newest state at up to 30 Hz. The
socket takes the frames of the shown channel and direction only, from the daemon's stream for
viewers, which is paced to the rate the viewer draws at (`view:` topics, stm_live/preview.py).
The viewer never talks back to the daemon, so a slow or frozen viewer only fills its own queue
on the daemon's PUB socket, bounded by `zmq.output_hwm`, past which the daemon drops that
subscriber's messages alone.

Panels: the measured frame as scanned (unmeasured pixels blank), the reconstruction (its
inferred pixels are labelled as such in the title, and measured ones are the measured values),
and the per-pixel uncertainty; a scale bar in nm; a tip-state indicator and an alert banner
with the recommended action; a status bar with line rate, reconstruction latency, drops and
the engine in use.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyqtgraph as pg
import zmq
from PySide6 import QtCore, QtGui, QtWidgets

from stm_live.protocol import Decoder, Frame, LocMap, Message, ProtocolError, Status
from stm_live.security import LOOPBACK_ONLY, Security
from stm_live.viewer.model import BLANK_RGB, TOPICS, ViewerModel, colourize, robust_levels, slot_topics

log = logging.getLogger(__name__)

RENDER_HZ = 30
RENDER_SLACK_S = 1.0 / RENDER_HZ - 0.002  # the timer's period is whole milliseconds
SIBLING_WAIT_S = 0.002  # an update's raw and reconstructed frames arrive together
TITLE_WIDTH_PX = 440  # a panel title wraps at this width, so that every panel is as wide as the others
TITLE_HEIGHT_PX = 54  # three lines of a title
RECEIVE_HWM = 100  # frames waiting in the viewer, at most: it shows only the newest per slot anyway
TIP_COLOURS = {"good": "#2e7d32", "blunt": "#ef6c00", "multi": "#c62828", "unstable": "#6a1b9a",
               "changed": "#1565c0"}
PANELS = (("measured", "raw", "Measured (as scanned)"),
          ("reconstructed", "reconstructed", "Reconstructed: INFERRED where not measured"),
          ("uncertainty", "reconstructed", "Uncertainty (1 sigma) of inferred pixels"))
LOCALIZATION = "localization"


def colour_table(colormap: str) -> np.ndarray:
    """(257,) table for `colourize`: 256 opaque colours of the named map, then the blank one, as
    Qt's 32-bit RGB pixels (0xffRRGGBB)."""
    rgb = np.empty((257, 3), np.uint32)
    rgb[:256] = pg.colormap.get(colormap).getLookupTable(nPts=256, alpha=False)
    rgb[256] = BLANK_RGB
    return np.uint32(0xFF000000) | rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]


class ColourImageItem(pg.ImageItem):
    """An image item for pixels coloured already (`colourize`), handed to Qt as its native RGB32:
    pyqtgraph would label 8-bit RGBA colours RGBX8888, which Qt converts at every paint (0.25-0.30
    against 0.08 ms to draw a 256 x 256 panel in a 460 px square)."""

    def render(self) -> None:
        self._unrenderable = self.image is None or self.image.size == 0
        if not self._unrenderable:
            pixels = np.ascontiguousarray(self.image, np.uint32)
            self.qimage = QtGui.QImage(pixels, pixels.shape[1], pixels.shape[0], pixels.strides[0],
                                       QtGui.QImage.Format.Format_RGB32)
            self.qimage.pixels = pixels  # the image reads the array's memory: keep it alive
        self._renderRequired = False


class ViewerWindow(QtWidgets.QMainWindow):
    def __init__(self, endpoint: str | None = None, context: zmq.Context | None = None,
                 security: Security = LOOPBACK_ONLY) -> None:
        super().__init__()
        pg.setConfigOptions(imageAxisOrder="row-major", antialias=False)
        self.model = ViewerModel()
        self.decoder = Decoder()
        self._rendered = -1
        self._last_render = 0.0
        self._render_scheduled = False
        self.renders = 0
        self.render_ms: deque[float] = deque(maxlen=10_000)
        self.render_times: deque[float] = deque(maxlen=100_000)
        self.frame_age_ms: deque[float] = deque(maxlen=10_000)
        self.first_frame_at: float | None = None
        self.last_frame_at: float | None = None
        self._levels_locked: dict[str, tuple[float, float]] = {}
        self._levels: dict[str, tuple[float, float]] = {}  # what each panel was last drawn with
        self.tables: dict[str, np.ndarray] = {}
        self._titles: dict[str, str] = {}
        self._rects: dict[str, tuple] = {}
        self._shown: dict[str, Frame | LocMap] = {}  # what each panel draws: unchanged panels are not redrawn
        self.setWindowTitle("stm-live viewer")
        self.resize(1900, 620)
        self._build()
        self.socket: zmq.Socket | None = None
        self.notifier: QtCore.QSocketNotifier | None = None
        self._slot_topics: tuple[str, ...] = ()
        self.channel_box.currentTextChanged.connect(self._follow_selection)
        self.direction_box.currentTextChanged.connect(self._follow_selection)
        if endpoint:
            self.connect(endpoint, context or zmq.Context.instance(), security)
        self.timer = QtCore.QTimer(self)
        self.timer.timeout.connect(self._tick)
        self.timer.start(int(1000 / RENDER_HZ))

    # -- layout -------------------------------------------------------------------------------
    def _build(self) -> None:
        central = QtWidgets.QWidget()
        layout = QtWidgets.QVBoxLayout(central)
        bar = QtWidgets.QHBoxLayout()
        self.channel_box = QtWidgets.QComboBox()
        self.direction_box = QtWidgets.QComboBox()
        self.direction_box.addItems(["forward", "backward"])
        self.lock_box = QtWidgets.QCheckBox("Lock colour levels")
        self.lock_box.toggled.connect(self._lock_levels)
        save_png = QtWidgets.QPushButton("Save view (PNG)")
        save_png.clicked.connect(lambda: self._ask_and_save("PNG image (*.png)", self.save_png))
        save_frames = QtWidgets.QPushButton("Save frames (HDF5 / .npy)")
        save_frames.clicked.connect(lambda: self._ask_and_save("HDF5 (*.h5);;NumPy (*.npy)", self.save_frames))
        self.tip_label = QtWidgets.QLabel("tip: (no reading yet)")
        self.tip_label.setMinimumWidth(260)
        self.tip_label.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        for widget in (QtWidgets.QLabel("Channel"), self.channel_box, QtWidgets.QLabel("Direction"),
                       self.direction_box, self.lock_box, save_png, save_frames):
            bar.addWidget(widget)
        bar.addStretch(1)
        bar.addWidget(self.tip_label)
        layout.addLayout(bar)
        self.banner = QtWidgets.QLabel()
        self.banner.setStyleSheet("background:#b71c1c; color:white; font-size:16px; font-weight:bold; padding:6px;")
        self.banner.setWordWrap(True)
        self.banner.hide()
        layout.addWidget(self.banner)
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground("#202020")
        # A plain background is cheaper filled than blitted from a cached copy at every paint.
        self.graphics.setCacheMode(QtWidgets.QGraphicsView.CacheModeFlag.CacheNone)
        layout.addWidget(self.graphics, 1)
        self.views: dict[str, pg.PlotItem] = {}
        self.images: dict[str, ColourImageItem] = {}
        self.progress: dict[str, QtWidgets.QGraphicsSimpleTextItem] = {}
        self.scale_bars: dict[str, pg.ScaleBar] = {}
        for column, (name, _, title) in enumerate(PANELS):
            view = self.graphics.addPlot(row=0, col=column, title=title)
            view.setAspectLocked(True)
            view.invertY(True)
            view.hideAxis("left")
            view.hideAxis("bottom")
            image = ColourImageItem()
            self.tables[name] = colour_table("viridis" if name == "uncertainty" else "inferno")
            view.addItem(image)
            self.views[name], self.images[name] = view, image
            # A plain text item: it changes at every render, and a rich-text one (pg.TextItem)
            # lays out a whole text document each time.
            progress = QtWidgets.QGraphicsSimpleTextItem(view.getViewBox())
            progress.setBrush(pg.mkBrush("w"))
            progress.setPos(4, 4)
            self.progress[name] = progress
        view = self.graphics.addPlot(row=0, col=len(PANELS), title="Localization map: INFERRED (none yet)")
        view.setAspectLocked(True)
        view.invertY(True)
        view.hideAxis("left")
        view.hideAxis("bottom")
        image = ColourImageItem()
        self.tables[LOCALIZATION] = colour_table("magma")
        view.addItem(image)
        self.atoms = pg.ScatterPlotItem(size=5, pen=pg.mkPen("c", width=0.8), brush=None, pxMode=True)
        view.addItem(self.atoms)
        self.molecule_boxes = pg.PlotDataItem(pen=pg.mkPen("#76ff03", width=1.5), connect="finite")
        view.addItem(self.molecule_boxes)
        self.molecule_atoms = pg.ScatterPlotItem(size=7, symbol="x", pen=pg.mkPen("#76ff03", width=1.2), pxMode=True)
        view.addItem(self.molecule_atoms)
        self.views[LOCALIZATION], self.images[LOCALIZATION] = view, image
        self._equal_columns()
        self.setCentralWidget(central)
        self.status_label = QtWidgets.QLabel("waiting for the daemon")
        self.statusBar().addWidget(self.status_label, 1)

    def _equal_columns(self) -> None:
        """Every panel as wide and as tall as the others: left to their titles, the measured panel
        drew its frame smaller than the reconstruction beside it. Titles wrap within a
        fixed width, in a title row of the same height on every panel."""
        layout = self.graphics.ci.layout
        for column, view in enumerate(self.views.values()):
            title = view.titleLabel.item
            title.setTextWidth(TITLE_WIDTH_PX)
            title.document().setDefaultTextOption(QtGui.QTextOption(QtCore.Qt.AlignmentFlag.AlignCenter))
            self._fix_title_row(view)
            layout.setColumnStretchFactor(column, 1)

    @staticmethod
    def _fix_title_row(view: pg.PlotItem) -> None:
        """pyqtgraph sets a one-line title row at every new title; ours holds three."""
        view.titleLabel.setMaximumHeight(TITLE_HEIGHT_PX)
        view.layout.setRowFixedHeight(0, TITLE_HEIGHT_PX)

    # -- input --------------------------------------------------------------------------------
    def connect(self, endpoint: str, context: zmq.Context, security: Security = LOOPBACK_ONLY) -> None:
        self.socket = context.socket(zmq.SUB)
        for topic in TOPICS:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.socket.setsockopt(zmq.LINGER, 0)
        security.connect(self.socket, endpoint)
        self.notifier = QtCore.QSocketNotifier(self.socket.getsockopt(zmq.FD), QtCore.QSocketNotifier.Type.Read, self)
        self.notifier.activated.connect(self._on_readable)
        self._follow_selection()

    def _follow_selection(self) -> None:
        """Take the frames of the shown channel and direction only, paced to the rate the viewer
        draws at: a viewer costs the daemon the bytes of what it shows, not of every frame of every
        channel it could show. On a switch the daemon sends the new slot's newest final frame
        again at once (its last-value cache). The channel list comes from the daemon's status."""
        if self.socket is None:
            return
        wanted = slot_topics(self.channel_box.currentText(), self.direction_box.currentText())
        if wanted != self._slot_topics:
            for gone in set(self._slot_topics) - set(wanted):
                self.socket.setsockopt(zmq.UNSUBSCRIBE, gone.encode())
            for new in wanted:
                if new not in self._slot_topics:
                    self.socket.setsockopt(zmq.SUBSCRIBE, new.encode())
            self._slot_topics = wanted
        self.model.subscribe(TOPICS + wanted)

    def drain(self) -> int:
        """Take every waiting message into the model; ZeroMQ's descriptor is edge-triggered, so
        drain until the socket says nothing is left."""
        taken = 0
        while self.socket is not None and self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                self.apply(self.decoder.decode(frames))
            except ProtocolError as exc:
                self.model.invalid += 1
                log.warning("viewer ignored an invalid message: %s", exc)
            taken += 1
        return taken

    def apply(self, msg: Message) -> None:
        self.model.apply(msg)
        if isinstance(msg, Frame):
            self.last_frame_at = time.monotonic()
            self.first_frame_at = self.first_frame_at or self.last_frame_at
        channels = (msg.channel,) if isinstance(msg, Frame) else msg.channels if isinstance(msg, Status) else ()
        for channel in channels:
            if self.channel_box.findText(channel) < 0:
                self.channel_box.addItem(channel)

    # -- output -------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        """Messages wait: take them all and, if that changed anything, draw as soon as a display
        period has passed since the last render, not at the timer's next tick (up to a period
        later). The short wait lets the other kind of the same update (raw, reconstructed) land."""
        self.drain()
        if self.model.version != self._rendered and not self._render_scheduled:
            wait_s = max(self._last_render + 1.0 / RENDER_HZ - time.monotonic(), SIBLING_WAIT_S)
            self._render_scheduled = True
            QtCore.QTimer.singleShot(int(np.ceil(wait_s * 1000)), self, self._scheduled_render)

    def _scheduled_render(self) -> None:
        self._render_scheduled = False
        self._tick()

    def _tick(self) -> None:
        """Draw the newest state if it changed, at most RENDER_HZ times a second (the timer restarts
        at every render, so its next tick is a period after it)."""
        self.drain()
        if self.model.version != self._rendered and time.monotonic() >= self._last_render + RENDER_SLACK_S:
            self.timer.start()
            self.render()

    def render(self) -> None:
        """Draw the newest state; called at most RENDER_HZ times a second."""
        started = time.perf_counter()
        self._last_render = time.monotonic()
        self._rendered = self.model.version
        channel = self.channel_box.currentText()
        direction = self.direction_box.currentText()
        for name, kind, _ in PANELS:
            frame = self.model.frame(channel, direction, kind)
            if frame is None or self._shown.get(name) is frame:
                continue
            self._shown[name] = frame
            image = frame.image if name != "uncertainty" else frame.uncertainty
            if name == "reconstructed":
                self.frame_age_ms.append((time.time() - frame.t) * 1e3)
            if image is None:
                self.images[name].clear()
                self._set_title(name, f"Uncertainty: not reported by the {frame.method} engine")
                continue
            self._show(name, np.asarray(image, np.float32), frame)
        maps = [m for m in (self.model.locmaps.get((channel, d)) for d in ("both", direction)) if m is not None]
        if maps:
            locmap = max(maps, key=lambda m: m.t)
            if self._shown.get(LOCALIZATION) is not locmap:
                self._shown[LOCALIZATION] = locmap
                self._show_locmap(locmap)
        self._show_tip()
        self._show_status()
        self.renders += 1
        self.render_times.append(time.monotonic())
        self.render_ms.append((time.perf_counter() - started) * 1e3)

    def streaming_stats(self) -> dict[str, float | None]:
        """Render rate while frames were arriving (first to last frame received) and how old the
        shown reconstruction was when drawn: together they say whether the viewer kept up."""
        first, last = self.first_frame_at, self.last_frame_at
        if first is None or last is None or last <= first:
            return {"render_hz_while_streaming": None, "shown_frame_age_ms_p50": None, "shown_frame_age_ms_p99": None}
        renders = sum(first <= t <= last for t in self.render_times)
        ages = np.asarray(self.frame_age_ms) if self.frame_age_ms else np.array([np.nan])
        return {"render_hz_while_streaming": round(renders / (last - first), 1),
                "shown_frame_age_ms_p50": round(float(np.percentile(ages, 50)), 1),
                "shown_frame_age_ms_p99": round(float(np.percentile(ages, 99)), 1)}

    def _show(self, name: str, image: np.ndarray, frame: Frame) -> None:
        levels = self._levels_locked.get(name) or robust_levels(image)
        self._paint(name, image, levels)
        width_nm, height_nm = frame.size_nm
        self._set_rect(name, width_nm, height_nm)
        if name not in self.scale_bars:
            self.scale_bars[name] = self._scale_bar(name, width_nm)
        title = dict((n, t) for n, _, t in PANELS)[name]
        self._set_title(name, f"{title} [{frame.method}]")
        self.progress[name].setText("final" if frame.final else f"{frame.rows_seen} rows")

    def _show_locmap(self, locmap: LocMap) -> None:
        """Density of localizations with the pooled atoms on top; the title says what it rests on."""
        rows, cols = locmap.density.shape
        self._paint(LOCALIZATION, locmap.density, robust_levels(locmap.density, 0.0, 99.9))
        self._set_rect(LOCALIZATION, cols * locmap.density_pixel_nm, rows * locmap.density_pixel_nm)
        self.atoms.setData(locmap.atoms[0], locmap.atoms[1])
        x0, y0, x1, y1 = locmap.molecules[:4]
        nan = np.full_like(x0, np.nan)
        self.molecule_boxes.setData(np.stack([x0, x1, x1, x0, x0, nan], axis=1).ravel(),
                                    np.stack([y0, y0, y1, y1, y0, nan], axis=1).ravel())
        self.molecule_atoms.setData(locmap.molecule_atoms[0], locmap.molecule_atoms[1])
        if LOCALIZATION not in self.scale_bars:
            self.scale_bars[LOCALIZATION] = self._scale_bar(LOCALIZATION, cols * locmap.density_pixel_nm)
        precision = f"{1000 * np.median(locmap.atoms[3]):.1f} pm" if locmap.atoms.shape[1] else "-"
        lattice = (f"{locmap.bravais} a={locmap.lattice['a_nm']:.3f} b={locmap.lattice['b_nm']:.3f} nm"
                   if locmap.lattice else "no lattice")
        motion = locmap.motion
        drift = (f", drift {60 * motion['drift_x_nm_s']:+.2f}, {60 * motion['drift_y_nm_s']:+.2f} nm/min"
                 if "drift_x_nm_s" in motion else "")
        self._set_title(LOCALIZATION,
            f"Localization map: INFERRED [{locmap.uid} {locmap.direction}]<br>{locmap.atoms.shape[1]} atoms, "
            f"{locmap.molecules.shape[1]} molecules"
            f"{f' ({locmap.molecule_atoms.shape[1]} atoms on their crops)' if locmap.molecule_atoms.size else ''}, "
            f"{locmap.samples} "
            f"{locmap.method} samples, median precision {precision}, {lattice}{drift}")

    def _paint(self, name: str, image: np.ndarray, levels: tuple[float, float]) -> None:
        """Hand the panel its picture in colour already (the item keeps no levels or colour map of
        its own, so Qt draws the colours as they are)."""
        self._levels[name] = levels
        self.images[name].setImage(colourize(image, levels, self.tables[name]), autoLevels=False)

    def _set_title(self, name: str, text: str) -> None:
        """Retitle only on change: a new title re-lays out the whole plot."""
        if self._titles.get(name) != text:
            self._titles[name] = text
            self.views[name].setTitle(text)
            self._fix_title_row(self.views[name])

    def _set_rect(self, name: str, width_nm: float, height_nm: float) -> None:
        """Place the image in nm only when its size or pixel count changed: a new rectangle
        re-ranges the view and its axes."""
        key = (width_nm, height_nm, self.images[name].width(), self.images[name].height())
        if self._rects.get(name) != key:
            self._rects[name] = key
            self.images[name].setRect(QtCore.QRectF(0, 0, width_nm, height_nm))

    def _scale_bar(self, name: str, width_nm: float) -> pg.ScaleBar:
        length = float(10 ** np.floor(np.log10(width_nm / 4)))
        length *= 5 if width_nm / 4 >= 5 * length else 2 if width_nm / 4 >= 2 * length else 1
        bar = pg.ScaleBar(size=length, suffix="nm", brush="w", pen="w")
        bar.text.setText(f"{length:g} nm")
        bar.setParentItem(self.views[name].getViewBox())
        bar.anchor((1, 1), (1, 1), offset=(-15, -15))
        return bar

    def _show_tip(self) -> None:
        tip = self.model.tip
        if tip is not None:
            colour = TIP_COLOURS.get(tip.state, "#555555")
            self.tip_label.setText(f"tip: {tip.state.upper()}  (P good {tip.probabilities.get('good', 0):.2f})")
            style = f"background:{colour}; color:white; font-weight:bold; padding:4px;"
            if self.tip_label.styleSheet() != style:  # setting a style sheet re-polishes the widget, every time
                self.tip_label.setStyleSheet(style)
        alert = self.model.alert
        if alert is None:
            self.banner.hide()
            return
        last_action = self.model.actions[-1] if self.model.actions else None
        action = f"  |  last action: {last_action.outcome}" if last_action else ""
        self.banner.setText(f"TIP ALERT: {alert.previous} -> {alert.state.upper()} (scan {alert.uid}, row {alert.row}). "
                            f"Recommended: {alert.recommendation}{action}")
        self.banner.show()

    def _show_status(self) -> None:
        status = self.model.status
        parts = [f"line rate {self.model.rows_per_s():.0f} rows/s"]
        if status is not None:
            p50 = status.latency_s.get("p50")
            parts += [f"reconstruction latency p50 {p50 * 1e3:.1f} ms" if p50 is not None else "latency -",
                      f"dropped {status.counters.get('dropped', 0)}", f"engine {status.engine}",
                      f"daemon {status.state}"]
        parts.append(f"messages {self.model.received} (invalid {self.model.invalid}, "
                     f"missed while the viewer lagged {self.model.missed})")
        self.status_label.setText("  |  ".join(parts))

    def _lock_levels(self, locked: bool) -> None:
        self._levels_locked = dict(self._levels) if locked else {}

    # -- saving -------------------------------------------------------------------------------
    def _ask_and_save(self, filters: str, save) -> None:
        path, _ = QtWidgets.QFileDialog.getSaveFileName(self, "Save", str(Path.cwd()), filters)
        if path:
            save(path)

    def save_png(self, path: str | Path) -> None:
        self.grab().save(str(path), "PNG")

    def save_frames(self, path: str | Path) -> None:
        """The current scan's newest frames: HDF5 with every slot, or .npy of the shown reconstruction."""
        path = Path(path)
        frames = {k: f for k, f in self.model.frames.items() if k[0] == self.model.current_uid}
        if path.suffix == ".npy":
            shown = self.model.frame(self.channel_box.currentText(), self.direction_box.currentText(), "reconstructed")
            if shown is None:
                raise ValueError("no reconstructed frame to save yet")
            np.save(path, np.asarray(shown.image))
            return
        import h5py

        with h5py.File(path, "w") as h5:
            for (uid, channel, direction, kind), frame in frames.items():
                group = h5.require_group(f"{channel}/{direction}/{kind}")
                group["image"] = np.asarray(frame.image)
                group["measured"] = np.asarray(frame.mask)
                if frame.uncertainty is not None:
                    group["uncertainty"] = np.asarray(frame.uncertainty)
                group.attrs.update({"uid": uid, "unit": frame.unit, "method": frame.method,
                                    "inferred": kind == "reconstructed", "size_nm": frame.size_nm,
                                    "rows_seen": frame.rows_seen, "final": frame.final, "saved": time.time()})

    def close_socket(self) -> None:
        if self.notifier is not None:
            self.notifier.setEnabled(False)
        if self.socket is not None:
            self.socket.close()
            self.socket = None


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def run_viewer(endpoint: str, snapshot_dir: str | None = None, snapshot_every_s: float = 3.0,
               seconds: float | None = None, stats_path: str | None = None, security: Security = LOOPBACK_ONLY,
               should_stop: Callable[[], bool] = lambda: False) -> int:
    """The viewer's event loop until the window closes, `seconds` pass or `should_stop()`; with
    `snapshot_dir`, a PNG of the view at once (view-0000.png, the sign it is up) and every few
    seconds; with `stats_path`, its render rate and memory (sampled every second) as JSON at exit."""
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["stm-live view"])
    window = ViewerWindow(endpoint, security=security)
    window.show()
    wake = QtCore.QTimer()
    wake.timeout.connect(lambda: app.quit() if should_stop() else None)
    wake.start(100)
    timers = [wake]
    if snapshot_dir:
        Path(snapshot_dir).mkdir(parents=True, exist_ok=True)
        count = [0]
        window.save_png(Path(snapshot_dir) / "view-0000.png")

        def snapshot() -> None:
            count[0] += 1
            window.render()
            window.save_png(Path(snapshot_dir) / f"view-{count[0]:04d}.png")

        timer = QtCore.QTimer()
        timer.timeout.connect(snapshot)
        timer.start(int(snapshot_every_s * 1000))
        timers.append(timer)
    memory: list[float] = []
    if stats_path:
        sampler = QtCore.QTimer()
        sampler.timeout.connect(lambda: memory.append(_rss_mb()))
        sampler.start(1000)
        timers.append(sampler)
    if seconds:
        QtCore.QTimer.singleShot(int(seconds * 1000), app.quit)
    started, cpu_started = time.monotonic(), time.process_time()
    code = app.exec()
    if stats_path:
        elapsed = time.monotonic() - started
        cpu_s = time.process_time() - cpu_started
        settled = memory[len(memory) // 4:] or memory
        Path(stats_path).write_text(json.dumps({
            "seconds": round(elapsed, 2), "cpu_s": round(cpu_s, 2), "renders": window.renders, "render_hz": round(window.renders / elapsed, 1),
            "messages": window.model.received, "invalid": window.model.invalid, "missed": window.model.missed,
            "rss_mb_first_quarter_end": round(settled[0], 1) if settled else None,
            "rss_mb_end": round(memory[-1], 1) if memory else None,
            "render_ms_p99": round(float(np.percentile(window.render_ms, 99)), 2) if window.render_ms else None,
            **window.streaming_stats(),
        }, indent=2))
    if snapshot_dir:
        window.render()
        window.save_png(Path(snapshot_dir) / "view-last.png")
    window.close_socket()
    window.close()
    window.deleteLater()
    app.processEvents()
    return code
