"""The daemon over real ZeroMQ sockets on loopback, with real recordings on disk."""

import threading
import time

import h5py
import msgpack
import numpy as np
import zmq

from stm_live.engines import ENGINES, Reconstruction, Reconstructor
from stm_live.protocol import Decoder, Frame, Line, Truth
from stm_live.recorder import read_journal
from stm_live.sim.instrument import SimInstrument

from conftest import CHANNELS, Harness, make_frame, run_scan, scan_start, wait_for


def test_sim_to_daemon_to_subscriber(settings):
    settings.daemon.reconstruct_every_lines = 4
    settings.daemon.engine = "model"
    context = zmq.Context()
    harness = Harness(settings, context, with_publisher=False)
    sim = SimInstrument(settings.daemon.input, size=64, plan="lines:4", line_rate_hz=400, seed=5, context=context)
    truth_sock = context.socket(zmq.SUB)
    truth_sock.setsockopt(zmq.SUBSCRIBE, b"truth")
    truth_sock.connect(settings.daemon.input)
    try:
        harness.start()
        runner = threading.Thread(target=sim.run, args=(2, 10.0))
        runner.start()
        finals = lambda ms: [m for m in ms if isinstance(m, Frame) and m.final]
        harness.listener.until(lambda ms: len(finals(ms)) == 2 * 2 * 2 * 2, timeout=60, what="final frames")
        runner.join(30)
        truths = {}
        while truth_sock.poll(100):
            t = Decoder().decode(truth_sock.recv_multipart())
            assert isinstance(t, Truth)
            truths[t.uid] = dict(zip(t.channels, t.arrays))
        assert sorted(truths) == ["sim-5-0000", "sim-5-0001"]
        measured_rows = np.arange(0, 64, 4)
        for frame in finals(harness.listener.messages):
            assert frame.image.shape == (64, 64) and frame.rows_seen == 16
            assert frame.mask[measured_rows].all() and not frame.mask[1::4].any()
            if frame.direction == "forward":
                sent = truths[frame.uid][frame.channel]
                assert np.array_equal(frame.image[measured_rows], sent[measured_rows])
            if frame.kind == "reconstructed":
                # the network takes the height channel; the current keeps the classical engine
                assert frame.method == ("masked-unet" if frame.unit == "m" else "classical")
                assert np.isfinite(frame.image).all()
                if frame.unit == "m":
                    assert frame.uncertainty is not None and (frame.uncertainty[frame.mask] == 0).all()
            else:
                assert frame.method == "measured" and np.isnan(frame.image[1::4]).all()
        progressive = [f for f in harness.listener.frames(kind="reconstructed") if not f.final]
        assert progressive and min(f.rows_seen for f in progressive) < 16
        status = harness.status_after(lambda s: s.counters["scans_completed"] == 2)
        assert status.counters["lines"] == 2 * 16 * 2 and status.counters["dropped"] == 0
        assert status.latency_s["p50"] > 0
        assert 0 <= status.instruments["stm-live-sim"] < 60
    finally:
        truth_sock.close(0)
        sim.close()
        harness.stop()
        context.destroy(linger=0)


def test_bad_input_is_dropped_counted_and_the_rest_recorded(harness, settings):
    pub = harness.publisher
    raw = pub.socket
    frame = make_frame(16, 8)
    pub.scan_start(scan_start("good", rows=16, cols=8))
    valid_rows = []
    junk = [
        [b"line", b"\x00\x01garbage"],
        [b"line", msgpack.packb({"v": 99, "type": "line"})],
        [b"line", msgpack.packb(["not", "a", "map"])],
        [b"line", msgpack.packb({"v": 1, "type": "line", "uid": "good", "seq": 1, "row": 1, "direction": "forward",
                                 "t": 0.0, "arrays": [{"name": "Z", "dtype": "<f4", "shape": [10**6]}]}), b"xx"],
        [b"line", msgpack.packb({"v": 1, "type": "line", "uid": "good", "seq": 1, "row": 1, "direction": "forward",
                                 "t": 0.0, "arrays": [{"name": "Z", "dtype": "<f4", "shape": [8]}]}), b"xx"],
        [b"scan_end", msgpack.packb({"v": 1, "type": "scan_end", "uid": "ghost", "reason": "complete", "t": 0.0})],
    ]
    for row in range(16):
        if row in (3, 4):
            for j in junk:
                raw.send_multipart(j)
            continue
        pub.line("good", row, "forward", CHANNELS, [frame[row], frame[row] * 2])
        valid_rows.append(row)
    pub.line("good", 2, "forward", CHANNELS, [frame[2], frame[2]])
    pub.line("good", 99, "forward", CHANNELS, [frame[0], frame[0]])
    pub.line("good", 5, "forward", CHANNELS, [frame[5][:3], frame[5][:3]])
    pub.line("orphan", 0, "forward", CHANNELS, [frame[0], frame[0]])
    pub.scan_start(scan_start("other", rows=4, cols=8))
    for row in range(4):
        pub.line("other", row, "forward", CHANNELS, [frame[row], frame[row]])
    pub.scan_end("other")
    pub.scan_end("good")
    status = harness.status_after(lambda s: s.counters["scans_completed"] == 2)
    drops = status.drops
    assert drops == {"bad_header": 4, "schema_version": 2, "oversized": 2, "array_mismatch": 2,
                     "unknown_scan": 3, "duplicate_line": 1, "bad_row": 1, "bad_length": 1}
    assert status.counters["lines"] == len(valid_rows) + 4
    final = [f for f in harness.listener.frames(uid="good", kind="raw", channel="Z") if f.final][-1]
    assert final.rows_seen == 14 and not final.mask[[3, 4]].any()
    assert np.array_equal(final.image[valid_rows], frame[valid_rows])
    journal = [e.message for e in read_journal(harness.daemon.recorder.journal_path("good"))]
    recorded = [m for m in journal if isinstance(m, Line)]
    assert [m.row for m in recorded[:len(valid_rows)]] == valid_rows
    for m in recorded[:len(valid_rows)]:
        assert np.array_equal(m.arrays[0], frame[m.row])
    assert [m.type for m in journal][0] == "scan_start" and journal[-1].type == "scan_end"
    assert [e.message.row for e in read_journal(harness.daemon.recorder.journal_path("orphan"))] == [0]


def test_scan_end_writes_hdf5_from_the_journal(harness, settings):
    frame = make_frame(8, 8)
    harness.publisher.scan_start(scan_start("h5scan", rows=8, cols=8, plan="lines:2"))
    for row in range(0, 8, 2):
        harness.publisher.line("h5scan", row, "forward", CHANNELS, [frame[row], frame[row] + 1])
    harness.publisher.scan_end("h5scan")
    path = harness.daemon.recorder.directory / "h5scan.h5"
    wait_for(path.exists, 30, "HDF5 export")
    with h5py.File(path) as h5:
        assert h5.attrs["end_reason"] == "complete" and h5.attrs["plan"] == "lines:2"
        z = h5["forward/Z"][()]
        assert np.array_equal(z[::2], frame[::2]) and np.isnan(z[1::2]).all()
        assert h5["forward/Z"].attrs["unit"] == "m"
        assert h5["forward/measured"][()].sum() == 32
        assert h5["lines"]["row"].tolist() == [0, 2, 4, 6]


class FailingEngine(Reconstructor):
    """Fails on every call, as a crashed GPU runtime would."""

    name = "failing"

    def reconstruct(self, measured, mask):
        raise RuntimeError("simulated engine crash")


class HangingEngine(Reconstructor):
    """Never answers until released, as a wedged GPU runtime would."""

    name = "hanging"

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0

    def reconstruct(self, measured, mask):
        self.calls += 1
        self.release.wait()
        return Reconstruction(np.zeros(measured.shape))


def _engine_harness(settings, monkeypatch, engine, fallback="classical"):
    monkeypatch.setitem(ENGINES, engine.name, lambda threads, backend: engine)
    settings.daemon.engine, settings.daemon.engine_fallback = engine.name, fallback
    settings.daemon.engine_timeout_s = 0.2
    context = zmq.Context()
    return Harness(settings, context).start(), context


def test_a_failing_engine_hands_every_frame_to_the_fallback(settings, monkeypatch):
    """Every line is recorded and every frame reconstructed by the fallback; the failures are counted."""
    harness, context = _engine_harness(settings, monkeypatch, FailingEngine())
    try:
        frame = make_frame(16, 8)
        run_scan(harness, "crashy", frame)
        status = harness.status_after(lambda s: s.counters["scans_completed"] == 1 and s.counters["engine_errors"] >= 1)
        assert status.counters["lines"] == 16 and status.state in ("idle", "acquiring")
        finals = lambda: [f for f in harness.listener.frames(uid="crashy") if f.final]
        harness.listener.until(lambda ms: len(finals()) == 4, what="final raw and reconstructed frames")
        for f in finals():
            assert f.method == ("classical" if f.kind == "reconstructed" else "measured")
            assert np.array_equal(f.image[f.mask], frame[f.mask]) and np.isfinite(f.image).all()
        journal = [e.message for e in read_journal(harness.daemon.recorder.journal_path("crashy"))]
        assert sum(isinstance(m, Line) for m in journal) == 16
    finally:
        harness.stop()
        context.destroy(linger=0)


def test_a_failing_engine_without_fallback_costs_reconstructions_only(settings, monkeypatch):
    harness, context = _engine_harness(settings, monkeypatch, FailingEngine(), fallback="none")
    try:
        frame = make_frame(16, 8)
        run_scan(harness, "crashy", frame)
        status = harness.status_after(lambda s: s.counters["scans_completed"] == 1
                                      and s.counters["reconstructions_failed"] >= 1)
        assert status.counters["engine_errors"] == status.counters["reconstructions_failed"]
        harness.listener.until(lambda ms: any(f.final for f in harness.listener.frames(uid="crashy", kind="raw")))
        final = [f for f in harness.listener.frames(uid="crashy", kind="raw", channel="Z") if f.final][-1]
        assert np.array_equal(final.image, frame) and not harness.listener.frames(uid="crashy", kind="reconstructed")
    finally:
        harness.stop()
        context.destroy(linger=0)


def test_a_hanging_engine_times_out_and_no_frame_is_lost(settings, monkeypatch):
    """The wedged engine is skipped while it hangs (one timeout, not one per batch), the fallback
    reconstructs every frame, and once the engine answers again it is used again."""
    settings.daemon.reconstruct_every_lines = 4
    hanging = HangingEngine()
    harness, context = _engine_harness(settings, monkeypatch, hanging)
    try:
        frame = make_frame(16, 8)
        for uid in ("wedged-0", "wedged-1"):
            run_scan(harness, uid, frame)
        finals = lambda: [f for f in harness.listener.frames() if f.final and f.kind == "reconstructed"]
        harness.listener.until(lambda ms: len(finals()) == 2 * 2, what="final reconstructions")
        assert {f.method for f in finals()} == {"classical"}
        status = harness.status_after(lambda s: s.counters["frames_published"] >= len(harness.listener.frames()) and
                                      s.counters["scans_completed"] == 2)
        assert status.counters["engine_timeouts"] == 1 and hanging.calls == 1
        assert status.counters["engine_fallbacks"] >= 1 and status.counters["engines_hung"] == 1
        assert status.counters["lines"] == 32 and status.counters["reconstructions_failed"] == 0

        hanging.release.set()
        wait_for(lambda: not harness.daemon.scheduler.engine.hung, 10, "the hung call to return")
        run_scan(harness, "recovered", frame)
        harness.listener.until(lambda ms: any(f.final and f.method == "hanging"
                                              for f in harness.listener.frames(uid="recovered")),
                               what="the recovered engine's frame")
        for uid in ("wedged-0", "wedged-1", "recovered"):
            journal = [e.message for e in read_journal(harness.daemon.recorder.journal_path(uid))]
            assert sum(isinstance(m, Line) for m in journal) == 16
    finally:
        hanging.release.set()
        harness.stop()
        context.destroy(linger=0)


def test_a_stalled_subscriber_does_not_hold_up_the_daemon_or_other_subscribers(settings):
    """A subscriber that never reads: its own queue fills and ZeroMQ drops its messages alone.
    (The bound of 100 is a fifth of the ~530 messages sent, and gives the healthy subscriber
    room for a scheduling hiccup on a loaded machine.)"""
    settings.zmq.output_hwm = 100
    settings.daemon.reconstruct_every_lines = 1
    settings.daemon.progressive_max_hz = 0
    context = zmq.Context()
    stalled = context.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.setsockopt(zmq.LINGER, 0)
    h = Harness(settings, context).start()
    try:
        stalled.connect(settings.daemon.output)
        frame = make_frame(128, 128)
        run_scan(h, "busy", frame)
        h.listener.until(lambda ms: any(f.final for f in h.listener.frames(uid="busy", kind="reconstructed")),
                         what="the final frame at the healthy subscriber")
        status = h.status_after(lambda s: s.counters["scans_completed"] == 1)
        assert status.counters["lines"] == 128 and status.counters["record_errors"] == 0
        final = [f for f in h.listener.frames(uid="busy", kind="raw", channel="Z") if f.final][-1]
        assert np.array_equal(final.image, frame)
    finally:
        stalled.close()
        h.stop()
        context.destroy(linger=0)


def test_a_scan_whose_instrument_falls_silent_is_closed_as_aborted(settings):
    settings.daemon.scan_timeout_s = 0.5
    context = zmq.Context()
    h = Harness(settings, context).start()
    try:
        run_scan(h, "orphaned", make_frame(8, 8), rows=3, end=False)
        status = h.status_after(lambda s: s.counters["scans_aborted"] == 1 and not s.active_scans)
        assert status.counters["lines"] == 3
        h5 = h.daemon.recorder.directory / "orphaned.h5"
        wait_for(h5.exists, 30, "HDF5 of the abandoned scan")
        with h5py.File(h5) as f:
            assert f.attrs["end_reason"] == "aborted" and f["forward/measured"][()].sum() == 24
    finally:
        h.stop()
        context.destroy(linger=0)


def test_a_simulator_killed_mid_scan_and_restarted(settings):
    """A real simulator process is SIGKILLed mid-scan and started again: the interrupted scan is
    closed as aborted with every line the daemon received recorded, and the new one completes."""
    import signal
    import subprocess
    import sys

    settings.daemon.scan_timeout_s = 1.0
    settings.localize.enabled = False
    context = zmq.Context()
    h = Harness(settings, context, with_publisher=False).start()
    cli = [sys.executable, "-m", "stm_live", "--log-level", "WARNING", "sim", "--bind", settings.daemon.input,
           "--size", "64", "--plan", "full", "--frames", "1"]
    first = subprocess.Popen([*cli, "--line-rate", "40", "--seed", "1"])
    try:
        h.status_after(lambda s: s.counters["lines"] >= 20, timeout=60)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        status = h.status_after(lambda s: s.counters["scans_aborted"] == 1, timeout=30)
        received = status.counters["lines"]
        assert 20 <= received < 128
        second = subprocess.Popen([*cli, "--line-rate", "2000", "--seed", "2"])
        assert second.wait(60) == 0
        status = h.status_after(lambda s: s.counters["scans_completed"] == 1, timeout=30)
        assert status.counters["lines"] == received + 128 and status.counters["dropped"] == 0
        journal = [e.message for e in read_journal(h.daemon.recorder.journal_path("sim-1-0000"))]
        assert sum(isinstance(m, Line) for m in journal) == received
        wait_for((h.daemon.recorder.directory / "sim-2-0000.h5").exists, 30, "the new scan's HDF5")
    finally:
        if first.poll() is None:
            first.kill()
        h.stop()
        context.destroy(linger=0)


def test_progressive_frames_are_rate_limited_and_held_lines_follow(settings):
    """Lines far faster than the limit: a few progressive frames, not one per line, and the
    newest line still shows once the scan pauses (before it ends)."""
    settings.daemon.reconstruct_every_lines = 1
    settings.daemon.progressive_max_hz = 5.0
    context = zmq.Context()
    h = Harness(settings, context).start()
    try:
        frame = make_frame(64, 16)
        started = time.monotonic()
        run_scan(h, "fast", frame, end=False)
        newest = lambda: [f for f in h.listener.frames(uid="fast", kind="reconstructed", channel="Z")
                          if f.rows_seen == 64]
        h.listener.until(lambda ms: bool(newest()), what="a progressive frame with every line")
        elapsed = time.monotonic() - started
        progressive = h.listener.frames(uid="fast", kind="reconstructed", channel="Z")
        assert not any(f.final for f in progressive)
        assert len(progressive) <= 5.0 * elapsed + 2, (len(progressive), elapsed)
        np.testing.assert_array_equal(newest()[0].image, frame)
        h.publisher.scan_end("fast")
        h.listener.until(lambda ms: any(f.final for f in h.listener.frames(uid="fast", kind="reconstructed")),
                         what="the final frame")
    finally:
        h.stop()
        context.destroy(linger=0)


def test_viewers_stream_is_paced_and_ends_with_the_newest_frame(settings):
    """A frame after every line: each goes out on its own topic, while the viewers' `view:` copy
    of the slot comes at most `preview_max_hz` times a second per kind and ends with the final frame."""
    settings.daemon.reconstruct_every_lines = 1
    settings.daemon.progressive_max_hz = 0
    settings.daemon.preview_max_hz = 10.0
    context = zmq.Context()
    h = Harness(settings, context)
    h.listener.sock.setsockopt(zmq.SUBSCRIBE, b"view:forward:Z:")
    h.start()
    try:
        frame = make_frame(128, 32)
        started = time.monotonic()
        h.publisher.scan_start(scan_start("paced", rows=128, cols=32))
        for row in range(128):
            h.publisher.line("paced", row, "forward", CHANNELS, [frame[row], frame[row]])
            time.sleep(0.005)
        h.publisher.scan_end("paced")

        def on(topic_name: str) -> list[Frame]:
            return [m for m, t in zip(h.listener.messages, h.listener.topics) if t == topic_name]

        h.listener.until(lambda ms: {m.kind for m in on("view:forward:Z:") if m.final} == {"raw", "reconstructed"},
                         what="the final frames on the viewers' stream")
        elapsed = time.monotonic() - started
        viewed = on("view:forward:Z:")
        live = [m for m in on("frame:live:forward:Z:") if m.kind == "reconstructed"]
        for kind in ("raw", "reconstructed"):
            mine = [m for m in viewed if m.kind == kind]
            assert len(mine) <= 10.0 * elapsed + 2, (len(mine), elapsed)
            assert mine[-1].final and mine[-1].rows_seen == 128
        assert len(live) > 3 * len([m for m in viewed if m.kind == "reconstructed"])
        assert np.array_equal(viewed[-1].image if viewed[-1].kind == "raw" else viewed[-2].image, frame)
        assert not any(m.channel != "Z" or m.direction != "forward" for m in viewed)
        h.status_after(lambda s: s.counters.get("published_view:forward:Z:") == len(on("view:forward:Z:")))
    finally:
        h.stop()
        context.destroy(linger=0)


def test_a_late_subscriber_gets_the_newest_final_frame_of_its_slot(harness, settings):
    """The daemon's last-value cache: subscribing to one slot's final frames after the scan
    brings that slot's newest final frames at once (raw and reconstructed), and no other slot's."""
    first, second = make_frame(32, 32, seed=1), make_frame(32, 32, seed=2)
    run_scan(harness, "older", first)
    run_scan(harness, "newer", second)
    harness.listener.until(lambda ms: len([m for m in harness.listener.frames(final=True) if m.uid == "newer"]) == 4,
                           what="the final frames of both channels")
    late = harness.context.socket(zmq.SUB)
    late.setsockopt(zmq.SUBSCRIBE, b"frame:final:forward:Z:")
    late.connect(settings.daemon.output)
    try:
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            if late.poll(100):
                got.append(Decoder().decode(late.recv_multipart()))
        assert sorted(m.kind for m in got) == ["raw", "reconstructed"]
        assert all(m.uid == "newer" and m.channel == "Z" and m.final for m in got)
        raw = next(m for m in got if m.kind == "raw")
        assert np.array_equal(raw.image, second)
        assert not late.poll(500), "only the newest final frames of the slot subscribed to"
    finally:
        late.close(0)
    # 2 scans x 2 kinds, and the 2 sent again are counted too (a subscriber's missed count stays right)
    harness.status_after(lambda s: s.counters.get("published_frame:final:forward:Z:") == 6)
    viewer = harness.context.socket(zmq.SUB)
    viewer.setsockopt(zmq.SUBSCRIBE, b"view:forward:")  # the viewers' stream has the cache too
    viewer.connect(settings.daemon.output)
    try:
        assert viewer.poll(10_000), "the newest final frame on the viewers' stream"
        first = Decoder().decode(viewer.recv_multipart())
        assert first.final and first.uid == "newer" and first.direction == "forward"
    finally:
        viewer.close(0)
