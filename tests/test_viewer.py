"""The viewer, rendered offscreen from a recorded stream (simulator -> daemon) over a real socket."""

import os
import sys
import threading
import time
from dataclasses import replace

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pyqtgraph as pg  # noqa: E402
import pytest  # noqa: E402
import zmq  # noqa: E402
from PySide6 import QtGui, QtWidgets  # noqa: E402

from stm_live.demo import free_tcp_endpoint  # noqa: E402
from stm_live.protocol import Frame, LocMap, TipAlert, encode, topic  # noqa: E402
from stm_live.sim.instrument import SimInstrument  # noqa: E402
from stm_live.viewer.model import (  # noqa: E402
    BLANK_RGB, TOPICS, ViewerModel, colourize, robust_levels, slot_topics, viewer_topic)
from stm_live.viewer.window import ViewerWindow, colour_table  # noqa: E402

from conftest import CHANNELS, Harness, make_frame, scan_start  # noqa: E402


@pytest.fixture(scope="module")
def qapp():
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["test"])
    yield app
    app.processEvents()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Every message the daemon published for one simulated 128x128 lines:2 scan with an unstable tip."""
    from stm_live.config import Settings

    settings = Settings()
    settings.daemon.input, settings.daemon.output = free_tcp_endpoint(), free_tcp_endpoint()
    settings.daemon.record_dir = str(tmp_path_factory.mktemp("rec"))
    settings.daemon.status_interval_s = 0.1
    settings.daemon.reconstruct_every_lines = 16
    settings.tip.hop = 2
    settings.daemon.engine = "model"
    settings.localize.spacing_nm = 0.67
    context = zmq.Context()
    h = Harness(settings, context, with_publisher=False).start()
    sim = SimInstrument(settings.daemon.input, size=128, plan="lines:2", line_rate_hz=1500, seed=3, tip="unstable",
                        surface="si111_7x7", frame_nm=12.0, context=context)
    try:
        thread = threading.Thread(target=sim.run, args=(1, 10.0), daemon=True)
        thread.start()
        h.listener.until(lambda ms: any(isinstance(m, Frame) and m.final and m.kind == "reconstructed" for m in ms),
                         what="the final frame")
        h.listener.until(lambda ms: any(isinstance(m, LocMap) for m in ms), what="the localization map")
        thread.join(30)
        h.listener.pump(0.5)
    finally:
        sim.close()
        h.stop()
        context.destroy(linger=0)
    return [m for m in h.listener.messages if m.type != "heartbeat"]


@pytest.fixture
def window_and_publisher(qapp):
    """A viewer window subscribed to a PUB socket of the test's own."""
    context = zmq.Context()
    endpoint = free_tcp_endpoint()
    pub = context.socket(zmq.PUB)
    pub.bind(endpoint)
    window = ViewerWindow(endpoint, context)
    window.show()
    yield window, pub
    window.close_socket()
    window.close()
    window.deleteLater()
    qapp.processEvents()
    pub.close()
    context.destroy(linger=0)


def for_viewer(msg) -> list:
    """A message as the daemon sends it to viewers: frames on their paced `view:` topic."""
    return [viewer_topic(msg).encode(), *encode(msg)[1:]]


def panel_pixels(window: ViewerWindow, name: str) -> np.ndarray:
    """The rendered pixels of one panel's view box, as an (h, w, 4) array."""
    image = window.graphics.grab().toImage().convertToFormat(QtGui.QImage.Format.Format_RGB32)
    pixels = np.frombuffer(image.constBits(), np.uint8).reshape(image.height(), image.bytesPerLine() // 4, 4)
    box = window.views[name].getViewBox()
    rect = window.graphics.mapFromScene(box.sceneBoundingRect()).boundingRect()
    return pixels[rect.top():rect.bottom(), rect.left():rect.right()].copy()  # the QImage dies with this call


def test_viewer_renders_a_recorded_stream_received_over_zeromq(qapp, recorded, window_and_publisher, tmp_path):
    assert any(isinstance(m, TipAlert) for m in recorded), "the recorded stream should hold a tip alert"
    window, pub = window_and_publisher
    time.sleep(0.3)
    for msg in recorded:
        pub.send_multipart(for_viewer(msg))
    # The window takes the shown slot's frames (Z forward, once the first status or frame names
    # the channels; every channel's forward frames before that) and the rest.
    shown = TOPICS + slot_topics("Z", "forward")
    final_z = [m for m in recorded if topic(m) == "frame:final:forward:Z:"]
    assert final_z and sum(viewer_topic(m).startswith(shown) for m in recorded) < len(recorded)
    def everything_in() -> bool:
        frame = window.model.frame("Z", "forward", final_z[-1].kind)
        return (frame is not None and frame.final and frame.uid == final_z[-1].uid and bool(window.model.locmaps)
                and window.model.alert is not None and window.channel_box.count() == 2)

    deadline = time.monotonic() + 20
    while not everything_in() and time.monotonic() < deadline:
        qapp.processEvents()
        time.sleep(0.01)
    assert window.model.subscriptions == shown
    always = sum(topic(m).startswith(TOPICS) for m in recorded)  # every non-frame message arrives
    at_most = sum(viewer_topic(m).startswith(shown + ("view:forward:",)) for m in recorded)  # + before narrowing
    assert always + len(final_z) <= window.model.received <= at_most < len(recorded)
    assert window.model.invalid == 0
    assert [window.channel_box.itemText(i) for i in range(window.channel_box.count())] == ["Z", "Current"]
    window.render()
    qapp.processEvents()

    for name in ("measured", "reconstructed", "uncertainty", "localization"):
        pixels = panel_pixels(window, name)
        assert pixels.size and pixels[..., :3].std() > 10, f"{name} panel is empty"
    assert "INFERRED" in window.views["reconstructed"].titleLabel.text
    title = window.views["localization"].titleLabel.text
    assert "INFERRED" in title and "masked-unet samples" in title and "sim-3-0000" in title
    assert len(window.atoms.data) > 50
    assert window.banner.isVisible() and "TIP ALERT" in window.banner.text()
    assert all(bar.isVisible() and bar.text.toPlainText().endswith("nm") for bar in window.scale_bars.values())
    assert len(window.scale_bars) == 4
    assert "engine masked-unet" in window.status_label.text()
    assert window.tip_label.text().startswith("tip: ")

    locmap, received = window._shown["localization"], window.model.received
    atoms = np.vstack([locmap.atoms[:, :3], np.zeros((1, 3))])
    box = np.array([[atoms[0].min(), atoms[1].min(), atoms[0].max() + 0.1, atoms[1].max() + 0.1, 1.0]]).T
    pub.send_multipart(for_viewer(replace(locmap, molecules=box, molecule_atoms=atoms, t=locmap.t + 1)))
    deadline = time.monotonic() + 10
    while window.model.received == received and time.monotonic() < deadline:
        qapp.processEvents()
        time.sleep(0.01)
    window.render()
    assert "1 molecules (3 atoms on their crops)" in window.views["localization"].titleLabel.text
    assert len(window.molecule_atoms.data) == 3

    window.save_png(tmp_path / "view.png")
    assert QtGui.QImage(str(tmp_path / "view.png")).width() == window.width()
    window.save_frames(tmp_path / "frames.h5")
    with h5py.File(tmp_path / "frames.h5") as h5:
        assert h5["Z/forward/reconstructed"].attrs["inferred"]
        assert not h5["Z/forward/raw"].attrs["inferred"]
        measured = h5["Z/forward/raw/measured"][()]
        raw, rec = h5["Z/forward/raw/image"][()], h5["Z/forward/reconstructed/image"][()]
        assert np.array_equal(raw[measured], rec[measured])
    window.save_frames(tmp_path / "frame.npy")
    assert np.load(tmp_path / "frame.npy").shape == (128, 128)


def test_rendering_keeps_references_to_none(qapp, recorded):
    """A live viewer renders for hours: no render may drop a reference it does not own. (PySide6
    6.12.0 on Python 3.11 dropped several references to None per render, and the viewer died
    with "deallocating None" within a minute at 30 Hz. From Python 3.12 None is immortal and
    its count does not move.)"""
    window = ViewerWindow()
    window.show()
    try:
        for msg in recorded:
            window.apply(msg)
        for _ in range(20):
            window.render()
            qapp.processEvents()
        before = sys.getrefcount(None)
        for _ in range(200):
            window.render()
            qapp.processEvents()
        assert sys.getrefcount(None) - before > -50
    finally:
        window.close()
        window.deleteLater()
        qapp.processEvents()


def test_a_frozen_viewer_costs_the_daemon_nothing_and_counts_what_it_missed(qapp, tmp_path, monkeypatch):
    """The viewer stops processing events for a whole scan (a reconstruction after every line):
    the daemon records every line and a healthy subscriber gets every message, while the frozen
    viewer's queue overflows. Thawed, the viewer counts exactly the messages it never received:
    what it took plus what it missed equals what the healthy subscriber got over the same span.
    The daemon's queue per subscriber holds a few reconstructions' messages (20 messages were
    overflowed for the healthy subscriber too on a busy machine); the viewer's own queue is cut
    to 10 so that the frozen one overflows by far."""
    from stm_live.config import Settings
    from stm_live.viewer import window as viewer_window

    monkeypatch.setattr(viewer_window, "RECEIVE_HWM", 10)

    settings = Settings()
    settings.daemon.input, settings.daemon.output = free_tcp_endpoint(), free_tcp_endpoint()
    settings.daemon.record_dir = str(tmp_path / "rec")
    settings.daemon.status_interval_s = 0.1
    settings.daemon.reconstruct_every_lines = 1
    settings.daemon.progressive_max_hz = settings.daemon.preview_max_hz = 0  # every frame to the viewer too
    settings.tip.enabled = settings.localize.enabled = False
    settings.zmq.output_hwm = 60
    context = zmq.Context()
    h = Harness(settings, context)
    h.listener.sock.setsockopt(zmq.SUBSCRIBE, b"view:")  # the healthy subscriber takes the viewers' stream too
    h.start()
    window = ViewerWindow(settings.daemon.output, context)
    try:
        deadline = time.monotonic() + 20
        while window.model.status is None and time.monotonic() < deadline:
            qapp.processEvents()
            time.sleep(0.01)
        assert window.model.status is not None, "the viewer never heard the daemon"
        window.channel_box.addItem(CHANNELS[0].name)  # as if a status had named the channel: its slot only
        assert window.model.subscriptions == TOPICS + (f"view:forward:{CHANNELS[0].name}:",)
        heard = window.model.status.t
        while window.model.status.t == heard and time.monotonic() < deadline:
            qapp.processEvents()  # the missed count starts afresh at the first status after subscribing
            time.sleep(0.01)
        baseline, taken_before = window.model.status.t, window.model.received + window.model.invalid

        frame = make_frame(128, 128)
        h.publisher.scan_start(scan_start("frozen", rows=128, cols=128))
        for row in range(128):
            h.publisher.line("frozen", row, "forward", CHANNELS, [frame[row], frame[row]])
            time.sleep(0.004)  # every line gets its own reconstruction (none superseded)
        h.publisher.scan_end("frozen")
        status = h.status_after(lambda s: s.counters["scans_completed"] == 1)
        assert status.counters["lines"] == 128 and status.counters["record_errors"] == 0
        def settled(messages) -> bool:
            """Every final frame in, and a status after the last frame: only statuses follow."""
            frames = [i for i, m in enumerate(messages) if m.type == "frame"]
            finals = {(m.channel, m.kind) for m in messages if m.type == "frame" and m.final}
            return len(finals) == 4 and any(m.type == "status" for m in messages[frames[-1]:])
        h.listener.until(settled, what="a status after the last frame")
        after = [m for m in h.listener.messages if m.type == "status"][-1].t
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and window.model.status.t < after:
            qapp.processEvents()  # thawed
            time.sleep(0.01)
        last = window.model.status.t
        h.daemon.stop()
        h.thread.join(60)
        h.listener.pump(0.5)

        counters = h.listener.last_status().counters
        published_frames = sum(n for k, n in counters.items() if k.startswith("published_frame:"))
        # most lines get a reconstruction of their own (a loaded machine supersedes some): far beyond both queues
        assert sum(t.startswith("frame:") for t in h.listener.topics) == published_frames > 2 * 128
        at = {m.t: i for i, m in enumerate(h.listener.messages) if m.type == "status"}
        span = sum(t.startswith(window.model.subscriptions) for t in h.listener.topics[at[baseline] + 1:at[last] + 1])
        taken = window.model.received + window.model.invalid - taken_before
        assert window.model.missed > 0, (taken, span)
        assert taken + window.model.missed == span
        window.render()
        assert f"missed while the viewer lagged {window.model.missed}" in window.status_label.text()
    finally:
        window.close_socket()
        window.close()
        window.deleteLater()
        qapp.processEvents()
        h.listener.close()
        if h.publisher is not None:
            h.publisher.close(linger_s=0)
        context.destroy(linger=0)


def test_the_viewer_takes_frames_of_the_shown_slot_only(qapp, window_and_publisher):
    """Frames of other channels and directions never leave the daemon for this viewer (every
    channel's of the shown direction do while it knows no channel); changing the selection moves
    the subscription."""
    window, pub = window_and_publisher
    image = np.zeros((8, 8), np.float32)

    def frame(channel: str, direction: str, final: bool) -> Frame:
        return Frame("s", channel, "m", direction, "raw", 8, (1.0, 1.0), "measured", 0.0, final, 0.0, image, image == 0)

    def received_after_sending() -> list[tuple[str, str, bool]]:
        time.sleep(0.3)  # the subscription reaches the publisher
        for channel in ("Z", "Current"):
            for direction in ("forward", "backward"):
                for final in (False, True):
                    pub.send_multipart(for_viewer(frame(channel, direction, final)))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            qapp.processEvents()
            time.sleep(0.01)
        return window.model.received

    assert window.model.subscriptions == TOPICS + ("view:forward:",)  # no channel known: every forward frame
    window.channel_box.addItems(["Z", "Current"])
    assert received_after_sending() == 2  # the final and the live frame of Z forward
    assert window.model.frame("Z", "forward", "raw") is not None
    window.channel_box.setCurrentText("Current")
    window.direction_box.setCurrentText("backward")
    assert received_after_sending() == 2 + 2
    assert window.model.frame("Current", "backward", "raw") is not None
    assert window.model.missed == 0


def test_a_frame_is_drawn_as_it_lands_but_not_more_often_than_the_display_rate(qapp, window_and_publisher):
    """With the render timer stopped, a frame that lands a display period after the last render
    is drawn anyway (the socket's notifier draws it); frames landing faster are drawn at most
    RENDER_HZ times a second, the newest one last."""
    from stm_live.viewer.window import RENDER_HZ

    window, pub = window_and_publisher
    window.channel_box.addItem("Z")
    window.timer.stop()
    time.sleep(0.3)  # the subscription reaches the publisher
    image = np.ones((8, 8), np.float32)
    renders = window.renders

    def send(rows: int) -> None:
        pub.send_multipart(for_viewer(Frame("s", "Z", "m", "forward", "raw", rows, (1.0, 1.0), "measured", 0.0,
                                            False, 0.0, image * rows, image > 0)))

    def pump(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            qapp.processEvents()
            time.sleep(0.002)

    send(1)
    pump(0.5)
    assert window.renders == renders + 1 and window._shown["measured"].rows_seen == 1
    started, renders = time.monotonic(), window.renders
    for rows in range(2, 42):
        send(rows)
        pump(0.005)
    pump(0.3)
    elapsed = time.monotonic() - started
    assert window._shown["measured"].rows_seen == 41  # the newest, drawn without the timer
    assert 1 <= window.renders - renders <= RENDER_HZ * elapsed + 1, (window.renders - renders, elapsed)


def test_model_keeps_one_frame_per_slot_and_follows_the_newest_scan(recorded):
    model = ViewerModel()
    frames = [m for m in recorded if isinstance(m, Frame)]
    for msg in recorded:
        model.apply(msg)
    slots = {(m.channel, m.direction, m.kind) for m in frames if m.uid == model.current_uid}
    assert len(model.frames) == len(slots) == 8  # Z and Current, forward and backward, raw and reconstructed
    assert model.frame("Z", "forward", "reconstructed").final
    later = Frame("other-scan", "Z", "m", "forward", "raw", 1, (1.0, 1.0), "measured", 0.0, False, 0.0,
                  frames[0].image, frames[0].mask)
    model.apply(later)
    assert model.current_uid == "other-scan" and list(model.frames) == [("other-scan", "Z", "forward", "raw")]


def test_line_rate_reads_the_current_scans_rows_over_the_last_two_seconds():
    model = ViewerModel()
    image, mask = np.zeros((64, 64), np.float32), np.zeros((64, 64), bool)

    def arrive(uid: str, rows: int, t: float) -> None:
        model.apply(Frame(uid, "Z", "m", "forward", "raw", rows, (1.0, 1.0), "measured", 0.0, False, 0.0, image, mask),
                    now=t)

    for i in range(40):  # 10 rows every 0.25 s: 40 rows/s
        arrive("a", 10 * i, 100.0 + 0.25 * i)
    assert model.rows_per_s(now=109.75) == pytest.approx(40.0)
    assert len(model._arrivals) == 9  # only the last two seconds are kept
    assert model.rows_per_s(now=112.0) == 0.0  # nothing landed in the last two seconds
    arrive("b", 0, 200.0)
    arrive("b", 5, 201.0)
    assert model.rows_per_s(now=201.0) == pytest.approx(5.0)  # the new scan alone


def test_robust_levels_ignore_spikes_and_gaps():
    image = np.linspace(0, 1, 10_000).reshape(100, 100)
    image[0, 0] = 1e6
    image[1, :] = np.nan
    lo, hi = robust_levels(image)
    assert 0 <= lo < 0.01 and 0.99 < hi <= 1.0
    assert robust_levels(np.full((4, 4), np.nan)) == (0.0, 1.0)


def test_colourize_maps_levels_to_the_ends_of_the_table_and_missing_pixels_to_blank():
    table = colour_table("inferno")
    assert table.shape == (257,) and (table >> 24 == 0xFF).all()  # opaque
    inferno = pg.colormap.get("inferno").getLookupTable(nPts=256, alpha=False)
    assert table[200] == 0xFF000000 | int(inferno[200, 0]) << 16 | int(inferno[200, 1]) << 8 | int(inferno[200, 2])
    image = np.array([[-5.0, 0.0, 0.5], [1.0, 7.0, np.nan]], np.float32)
    pixels = colourize(image, (0.0, 1.0), table)
    assert pixels.shape == (2, 3) and pixels.dtype == np.uint32
    assert pixels[0, 0] == table[0] and pixels[0, 1] == table[0]  # below the levels: the low end
    assert pixels[1, 0] == table[255] and pixels[1, 1] == table[255]  # above: the high end
    assert pixels[0, 2] == table[127]
    assert QtGui.QColor(int(pixels[1, 2])).getRgb()[:3] == BLANK_RGB
    assert table[256] not in set(table[:256])  # never confused with a value
    assert (colourize(np.ones((2, 2)), (1.0, 1.0), table) == table[0]).all()  # flat frame, empty range


def test_panels_reach_qt_as_opaque_colours(qapp, recorded):
    """The picture is coloured before it reaches the image item: an item left with levels or a
    colour map of its own would hand Qt an indexed image, which Qt converts on every paint."""
    window = ViewerWindow()
    try:
        for msg in recorded:
            window.apply(msg)
        window.render()
        for name in ("measured", "reconstructed", "uncertainty"):
            item = window.images[name]
            assert item.levels is None and item.lut is None
            item.render()
            assert item.qimage.format() == QtGui.QImage.Format.Format_RGB32  # drawn without a conversion
            rows, cols = item.image.shape
            for y, x in ((0, 0), (rows // 2, cols // 3), (rows - 1, cols - 1)):
                assert item.qimage.pixel(x, y) == int(item.image[y, x])  # the colours as coloured
    finally:
        window.close()


def test_every_panel_is_as_large_as_the_others_whatever_its_title(qapp, recorded):
    """Titles of different lengths wrap instead of widening their panel, so the measured frame is
    drawn as large as its reconstruction."""
    window = ViewerWindow()
    window.resize(1900, 620)
    window.show()
    try:
        for msg in recorded:
            window.apply(msg)
        window.render()
        qapp.processEvents()
        assert len({len(window._titles[name]) for name in window._titles}) > 2  # titles do differ
        boxes = [view.getViewBox().sceneBoundingRect() for view in window.views.values()]
        assert max(b.width() for b in boxes) - min(b.width() for b in boxes) <= 1
        assert max(b.height() for b in boxes) - min(b.height() for b in boxes) <= 1
    finally:
        window.close()
