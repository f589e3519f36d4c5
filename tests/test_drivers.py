"""Drivers over real sockets: the Nanonis client and driver against the emulator, file replay over
the real scans in ../shared/data/real, and every way a reply or a file can be broken."""

import shutil
import socket
import threading
import time
import zlib

import nanonispy2
import numpy as np
import pytest
import zmq

from stm_live.demo import free_tcp_endpoint
from stm_live.drivers.actions import ActionClient, ActionError
from stm_live.drivers.conditioning import ConditioningGate, ConditioningLimits, parse_action
from stm_live.drivers.nanonis import NanonisDriver
from stm_live.drivers.nanonis_client import Buffer, Frame, NanonisClient
from stm_live.drivers.nanonis_wire import NanonisError, NanonisProtocolError, Reader, Writer, pack_header, unpack_header
from stm_live.drivers.publisher import InstrumentPublisher
from stm_live.drivers.replay import ReplayDriver
from stm_live.drivers.scanfiles import ScanFileError, read_scan_file
from stm_live.protocol import Decoder, Line, ScanEnd, ScanStart
from stm_live.sim.nanonis_emulator import NanonisEmulator

from conftest import REAL

needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="real scans not found at ../shared/data/real")


class Wire:
    """An instrument-side publisher and a subscriber that keeps everything published."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.endpoint = free_tcp_endpoint()
        self.publisher = InstrumentPublisher(self.endpoint, "test", context=self.context)
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(self.endpoint)
        assert self.publisher.wait_for_subscriber(10)
        self.messages = []

    def drain(self, quiet_s: float = 0.3) -> list:
        decoder = Decoder()
        while self.sub.poll(int(quiet_s * 1000)):
            self.messages.append(decoder.decode(self.sub.recv_multipart()))
        return self.messages

    def close(self) -> None:
        self.sub.close()
        self.publisher.close(linger_s=0)
        self.context.destroy(linger=0)


@pytest.fixture
def wire():
    w = Wire()
    yield w
    w.close()


@pytest.fixture
def emulator():
    emu = NanonisEmulator(line_time_s=0.01, seed=3)
    emu.buffer = ([30, 0], 32, 32)
    emu.start()
    yield emu
    emu.stop()


def run_driver(driver, scans=1, timeout=30.0):
    thread = threading.Thread(target=driver.run, kwargs={"max_scans": scans}, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "driver did not finish"


def lines_of(messages, uid=None):
    return [m for m in messages if isinstance(m, Line) and (uid is None or m.uid == uid)]


# -- framing --------------------------------------------------------------------------------

def test_header_is_40_big_endian_bytes():
    header = pack_header("Scan.Action", 6)
    assert len(header) == 40 and header[:11] == b"Scan.Action" and header[32:36] == b"\x00\x00\x00\x06"
    assert header[36:38] == b"\x00\x01"
    assert unpack_header(header) == ("Scan.Action", 6)
    with pytest.raises(NanonisProtocolError):
        unpack_header(b"\xff" * 32 + b"\x00\x00\x00\x01" + b"\x00" * 4)
    with pytest.raises(NanonisProtocolError):
        unpack_header(b"X".ljust(32, b"\0") + b"\xff\xff\xff\xff" + b"\x00" * 4)


def test_reader_bounds_and_error_section():
    body = Writer().i32(2).f32(1.5).string("Z (m)").error_section().bytes()
    r = Reader("X", body)
    assert (r.i32(), r.f32(), r.string()) == (2, 1.5, "Z (m)")
    r.error_section()
    with pytest.raises(NanonisProtocolError, match="truncated"):
        Reader("X", body[:5]).string()
    with pytest.raises(NanonisError, match="boom"):
        Reader("X", Writer().error_section("boom").bytes()).error_section()


# -- client against the emulator ------------------------------------------------------------

def test_client_round_trips_settings(emulator):
    client = NanonisClient(emulator.host, emulator.port)
    client.frame_set(Frame(1e-9, 2e-9, 30e-9, 30e-9, 15.0))
    frame = client.frame_get()
    assert frame.width_m == pytest.approx(30e-9) and frame.angle_deg == pytest.approx(15.0)
    client.buffer_set(Buffer((30, 0), 70, 40))
    assert client.buffer_get() == Buffer((30, 0), 64, 40)
    assert client.bias_get() == pytest.approx(-2.0) and client.setpoint_get() == pytest.approx(50e-12)
    assert client.signals_get([24, 0]).tolist() == pytest.approx([-2.0, 50e-12])
    assert client.props_get()["autosave"] == 2
    client.close()


def test_unknown_command_and_refused_request_keep_the_connection(emulator):
    client = NanonisClient(emulator.host, emulator.port)
    with pytest.raises(NanonisError, match="Unknown command"):
        client.call("Scan.Teleport")
    with pytest.raises(NanonisError, match="not in the scan buffer"):
        client.frame_data_grab(7, True)
    with pytest.raises(NanonisError, match="invalid buffer size"):
        client.buffer_set(Buffer((30,), 0, 10))
    assert client.connected and client.frame_get().width_m > 0


def test_malformed_reply_is_a_protocol_error_then_the_client_recovers(emulator):
    client = NanonisClient(emulator.host, emulator.port)
    emulator.corrupt_next.add("Scan.BufferGet")
    with pytest.raises(NanonisProtocolError):
        client.buffer_get()
    assert client.buffer_get().pixels == 32


def test_silent_controller_times_out_instead_of_hanging():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = NanonisClient("127.0.0.1", server.getsockname()[1], timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        client.frame_get()
    assert time.monotonic() - started < 2 and not client.connected
    server.close()


# -- the driver -----------------------------------------------------------------------------

@pytest.mark.parametrize("edition, unscanned", [("2024", float("nan")), ("2021", 0.0)])
def test_full_scan_publishes_every_line_as_measured(emulator, wire, edition, unscanned):
    emulator.edition, emulator.unscanned = edition, unscanned
    driver = NanonisDriver(NanonisClient(emulator.host, emulator.port), wire.publisher, start_scans=True, poll_s=0.005)
    run_driver(driver)
    messages = wire.drain()
    start, end = messages[0], messages[-1]
    assert isinstance(start, ScanStart) and (start.rows, start.cols) == (32, 32)
    assert [c.name for c in start.channels] == ["Z", "Current"] and start.channels[0].unit == "m"
    assert start.size_nm == pytest.approx((20.0, 20.0)) and start.bias_v == pytest.approx(-2.0)
    assert isinstance(end, ScanEnd) and end.reason == "complete"
    lines = lines_of(messages)
    for direction, forward in (("forward", True), ("backward", False)):
        got = sorted((m for m in lines if m.direction == direction), key=lambda m: m.row)
        assert [m.row for m in got] == list(range(32))
        for m in got:
            assert np.array_equal(m.arrays[0], emulator.scan.data[(30, forward)][m.row])
            assert np.array_equal(m.arrays[1], emulator.scan.data[(0, forward)][m.row])
    assert driver.wait_end_of_line is (edition == "2024")


def test_upward_scan_arrives_bottom_row_first(emulator, wire):
    driver = NanonisDriver(NanonisClient(emulator.host, emulator.port), wire.publisher, start_scans=True,
                           scan_up=True, poll_s=0.005)
    run_driver(driver)
    messages = wire.drain()
    assert messages[0].scan_direction == "up"
    forward_rows = [m.row for m in lines_of(messages) if m.direction == "forward"]
    assert forward_rows == list(range(31, -1, -1))


@pytest.mark.parametrize("plan, rows, cols, expected_rows, values", [
    ("lines:4", 32, 32, list(range(0, 32, 4)), 32),
    ("sr:2", 32, 32, list(range(0, 32, 2)), 16),
    ("partial:5", 32, 32, list(range(5)), 32),
])
def test_sparse_plans_set_the_buffer_and_map_rows(emulator, wire, plan, rows, cols, expected_rows, values):
    driver = NanonisDriver(NanonisClient(emulator.host, emulator.port), wire.publisher, plan=plan, start_scans=True,
                           poll_s=0.005)
    run_driver(driver)
    messages = wire.drain()
    start = messages[0]
    assert (start.rows, start.cols, start.plan) == (rows, cols, plan)
    forward = [m for m in lines_of(messages) if m.direction == "forward"]
    assert [m.row for m in forward] == expected_rows
    assert all(m.arrays[0].shape == (values,) for m in forward)
    assert messages[-1].reason == "complete"


def test_pixel_plans_are_refused_for_nanonis(emulator, wire):
    with pytest.raises(ValueError, match="random pixels"):
        NanonisDriver(NanonisClient(emulator.host, emulator.port), wire.publisher, plan="pixels:0.5")


def test_controller_restart_aborts_the_scan_and_the_driver_follows_the_next(emulator, wire):
    emulator.line_time_s = 0.02
    driver = NanonisDriver(NanonisClient(emulator.host, emulator.port), wire.publisher, start_scans=True,
                           poll_s=0.005, reconnect_s=0.1)
    thread = threading.Thread(target=driver.run, kwargs={"max_scans": 2}, daemon=True)
    thread.start()
    time.sleep(0.3)
    emulator.restart(down_s=0.3)
    thread.join(30)
    assert not thread.is_alive()
    messages = wire.drain()
    ends = [m for m in messages if isinstance(m, ScanEnd)]
    assert [e.reason for e in ends] == ["aborted", "complete"]
    first, second = [m.uid for m in messages if isinstance(m, ScanStart)]
    assert 0 < len(lines_of(messages, first)) < 64 and len(lines_of(messages, second)) == 64
    assert driver.reconnects >= 1


def test_slow_controller_still_yields_the_whole_scan(emulator, wire):
    emulator.reply_delay_s = 0.01
    emulator.buffer = ([30, 0], 16, 16)
    driver = NanonisDriver(NanonisClient(emulator.host, emulator.port), wire.publisher, start_scans=True, poll_s=0.005)
    run_driver(driver, timeout=60)
    messages = wire.drain()
    assert len(lines_of(messages)) == 32 and messages[-1].reason == "complete"


def test_driver_follows_a_scan_the_user_started(emulator, wire):
    NanonisClient(emulator.host, emulator.port).scan_action("start")
    driver = NanonisDriver(NanonisClient(emulator.host, emulator.port), wire.publisher, poll_s=0.005)
    run_driver(driver)
    messages = wire.drain()
    assert messages[0].plan == "full" and messages[-1].reason in ("complete", "aborted")
    assert len(lines_of(messages)) >= 2 * 28


# -- conditioning ---------------------------------------------------------------------------

def ask(driver: NanonisDriver, request, origin: str = "test") -> dict:
    """Send one request over the driver's action channel (real REQ/REP sockets) and let it answer."""
    client = ActionClient(driver.actions.socket.getsockopt_string(zmq.LAST_ENDPOINT), timeout_s=5)
    replies = []
    thread = threading.Thread(target=lambda: replies.append(client.request(request, origin)))
    thread.start()
    while thread.is_alive():
        driver.actions.poll(50)
    client.close()
    return replies[0]


def test_conditioning_limits_rate_and_dry_run(emulator, wire):
    clock = [100.0]
    gate = ConditioningGate(ConditioningLimits(max_bias_v=3.0, max_pulse_width_s=0.05, max_dip_nm=1.0,
                                               min_interval_s=10.0, dry_run=False), clock=lambda: clock[0])
    driver = NanonisDriver(NanonisClient(emulator.host, emulator.port), wire.publisher, gate=gate,
                           actions_endpoint="tcp://127.0.0.1:*")
    driver.client.connect()
    refused = [
        {"action": "bias_pulse", "bias_v": 5.0, "width_s": 0.01},
        {"action": "bias_pulse", "bias_v": 2.0, "width_s": 0.5},
        {"action": "bias_pulse", "bias_v": float("nan"), "width_s": 0.01},
        {"action": "dip", "depth_nm": 3.0, "bias_v": 1.0},
        {"action": "crash", "bias_v": 1.0},
        {"action": "bias_pulse", "bias_v": 2.0, "width_s": 0.01, "extra": 1},
        ["not", "a", "map"],
    ]
    for request in refused:
        assert ask(driver, request)["outcome"] == "refused"
    assert emulator.actions == []
    done = ask(driver, {"action": "bias_pulse", "bias_v": -2.5, "width_s": 0.01}, "monitor")
    assert done["outcome"] == "executed"
    assert emulator.actions[-1] == ("Bias.Pulse", pytest.approx({"width_s": 0.01, "bias_v": -2.5, "z_hold": 1, "mode": 1}))
    too_soon = ask(driver, {"action": "dip", "depth_nm": 0.5, "bias_v": 1.0}, "monitor")
    assert too_soon["outcome"] == "refused" and "rate limit" in too_soon["detail"]
    clock[0] += 11
    assert ask(driver, {"action": "dip", "depth_nm": 0.5, "bias_v": 1.0}, "monitor")["outcome"] == "executed"
    assert emulator.actions[-1][0] == "TipShaper.Start"
    assert emulator.actions[-2][1]["lift_height_m"] == pytest.approx(0.5e-9)
    assert [entry["origin"] for entry in gate.log][-3:] == ["monitor"] * 3
    driver.actions.close()
    dry = NanonisDriver(NanonisClient(emulator.host, emulator.port), wire.publisher,
                        gate=ConditioningGate(ConditioningLimits(dry_run=True)), actions_endpoint="tcp://127.0.0.1:*")
    before = len(emulator.actions)
    assert ask(dry, {"action": "bias_pulse", "bias_v": 1.0, "width_s": 0.01}, "user")["outcome"] == "dry_run"
    assert len(emulator.actions) == before
    dry.actions.close()
    assert NanonisDriver(NanonisClient(emulator.host, emulator.port), wire.publisher,
                         actions_endpoint="tcp://127.0.0.1:*").actions is None


def test_action_client_times_out_without_a_driver():
    client = ActionClient(free_tcp_endpoint(), timeout_s=0.2)
    with pytest.raises(ActionError, match="no reply"):
        client.request({"action": "bias_pulse", "bias_v": 1.0, "width_s": 0.01}, "test")
    client.close()


def test_parse_action_accepts_only_complete_known_actions():
    assert parse_action("bias_pulse bias_v=-3 width_s=0.02") == {"action": "bias_pulse", "bias_v": -3.0, "width_s": 0.02}
    for bad in ("zap bias_v=1", "bias_pulse bias_v=1", "dip depth_nm=1 bias_v=1 width_s=2", "dip depth_nm"):
        with pytest.raises(ValueError):
            parse_action(bad)


# -- files and replay -----------------------------------------------------------------------

@needs_real
@pytest.mark.parametrize("name", ["Si_7x7_051.sxm", "Au111_pySPM_test.sxm"])
def test_sxm_replay_publishes_the_file_in_acquisition_order(wire, name):
    raw = nanonispy2.read.Scan(str(REAL / name))
    up = raw.header["scan_dir"] == "up"
    sent = ReplayDriver(wire.publisher, line_rate_hz=5000).replay([REAL / name])
    messages = wire.drain()
    start = messages[0]
    assert start.scan_direction == ("up" if up else "down") and sent == 2 * start.rows
    forward = [m for m in lines_of(messages) if m.direction == "forward"]
    backward = [m for m in lines_of(messages) if m.direction == "backward"]
    rows = start.rows
    assert [m.row for m in forward] == (list(range(rows - 1, -1, -1)) if up else list(range(rows)))
    stored_z = raw.signals["Z"]
    for k in (0, 1, rows // 2, rows - 1):
        # the file stores rows in acquisition order; backward lines right to left
        assert np.array_equal(forward[k].arrays[0], stored_z["forward"][k].astype(np.float32))
        assert np.array_equal(backward[k].arrays[0], stored_z["backward"][k][::-1].astype(np.float32))
    assert messages[-1].reason == "complete"


@needs_real
def test_replay_under_a_sparse_plan_sends_only_planned_pixels(wire):
    ReplayDriver(wire.publisher, plan="sr:4", line_rate_hz=5000).replay([REAL / "Si_7x7_028.sxm"])
    lines = lines_of(wire.drain())
    scan = read_scan_file(REAL / "Si_7x7_028.sxm")
    assert [m.row for m in lines if m.direction == "forward"] == list(range(0, 256, 4))
    assert np.array_equal(lines[0].arrays[0], scan.channels[0].forward[0, ::4])


@needs_real
def test_sm4_and_other_real_files_read():
    sm4 = read_scan_file(REAL / "graphite_ABC_9K_065.sm4")
    names = [c.name for c in sm4.channels]
    assert "Topography" in names and sm4.shape == (128, 128) and sm4.size_nm[0] == pytest.approx(75.0, rel=0.01)
    topo = sm4.channels[names.index("Topography")]
    assert topo.unit == "m" and np.isfinite(topo.forward).all() and 1e-12 < np.ptp(topo.forward) < 1e-6
    qplus = read_scan_file(REAL / "qplus_A151216_02602.sxm")
    assert qplus.shape == (128, 128) and len(qplus.channels) > 3


def test_createc_dat_round_trip_and_damage(tmp_path):
    rows, cols = 8, 12
    frames = np.arange(2 * rows * cols, dtype="<f4").reshape(2, rows, cols)
    header = ("[Paramco32]\nNum.X=12\nNum.Y=8\nChannels=2\nLength x[A]=100\nLength y[A]=50\n"
              "Dacto[A]z=0.5\nBiasVolt.[mV]=-1500\nScanYDirec=1\n").encode()
    blob = zlib.compress(np.concatenate([[0.0], frames.ravel()]).astype("<f4").tobytes())
    good = tmp_path / "a.dat"
    good.write_bytes(header + b"DATA" + blob)
    scan = read_scan_file(good)
    assert scan.size_nm == (10.0, 5.0) and scan.bias_v == pytest.approx(-1.5) and scan.scan_direction == "down"
    assert np.allclose(scan.channels[0].forward, frames[0] * 0.5e-10) and scan.channels[0].unit == "m"
    assert np.array_equal(scan.channels[1].forward, frames[1])
    cut = tmp_path / "cut.dat"
    cut.write_bytes(header + b"DATA" + blob[: len(blob) // 2])
    with pytest.raises(ScanFileError, match="damaged or cut short"):
        read_scan_file(cut)
    nodata = tmp_path / "nodata.dat"
    nodata.write_bytes(header)
    with pytest.raises(ScanFileError, match="no DATA marker"):
        read_scan_file(nodata)


def test_createc_dat_with_labelled_header_lines(tmp_path):
    """Createc writes "label / name=value" lines under [Parameter] (e.g. "Num.X / Num.X=256")."""
    frames = np.arange(2 * 4 * 6, dtype="<f4").reshape(2, 4, 6)
    header = ("[Parameter]\r\nTitel / Titel=DEFAULT\r\nNum.X / Num.X=6\r\nNum.Y / Num.Y=4\r\nChannels=2\r\n"
              "Length x[A]=60\r\nLength y[A]=40\r\nBiasVoltage / BiasVolt.[mV]=-200\r\n").encode()
    path = tmp_path / "labelled.dat"
    path.write_bytes(header + b"DATA" + zlib.compress(np.concatenate([[0.0], frames.ravel()]).astype("<f4").tobytes()))
    scan = read_scan_file(path)
    assert scan.shape == (4, 6) and scan.size_nm == (6.0, 4.0) and scan.bias_v == pytest.approx(-0.2)
    assert np.array_equal(scan.channels[1].forward, frames[1])


@needs_real
def test_truncated_and_wrong_files_give_clear_errors(tmp_path):
    cut = tmp_path / "cut.sxm"
    data = (REAL / "Si_7x7_051.sxm").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ScanFileError, match="cut.sxm"):
        read_scan_file(cut)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array(["a", "b"]))
    with pytest.raises(ScanFileError, match="numeric"):
        read_scan_file(bad, size_nm=5)
    good = tmp_path / "ok.npy"
    np.save(good, np.ones((4, 5)))
    with pytest.raises(ScanFileError, match="frame size"):
        read_scan_file(good)
    assert read_scan_file(good, size_nm=5).shape == (4, 5)
    other = tmp_path / "x.tif"
    shutil.copy(good, other)
    with pytest.raises(ScanFileError, match="unknown format"):
        read_scan_file(other)
    with pytest.raises(ScanFileError, match="no such file"):
        read_scan_file(tmp_path / "missing.sxm")


@needs_real
def test_replayed_real_scan_reaches_the_daemon_bit_identical(harness):
    ReplayDriver(harness.publisher, line_rate_hz=4000).replay([REAL / "Si_7x7_051.sxm"])
    finals = lambda ms: [m for m in ms if getattr(m, "type", "") == "frame" and m.final and m.kind == "raw"]
    harness.listener.until(lambda ms: len(finals(ms)) == 4, timeout=60, what="final raw frames")
    scan = read_scan_file(REAL / "Si_7x7_051.sxm")
    for frame in finals(harness.listener.messages):
        channel = next(c for c in scan.channels if c.name == frame.channel)
        expected = channel.forward if frame.direction == "forward" else channel.backward
        assert frame.mask.all() and np.array_equal(frame.image, expected)
    h5 = harness.daemon.recorder.directory / "replay-000-Si_7x7_051.h5"
    from conftest import wait_for
    wait_for(h5.exists, 30, "HDF5 of the replayed scan")
