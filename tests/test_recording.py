"""Recording survives a SIGKILLed daemon; journals read back exactly; truncation is tolerated."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import zmq

from stm_live.demo import free_tcp_endpoint
from stm_live.drivers.publisher import InstrumentPublisher
from stm_live.export import export_journal, replay_journal
from stm_live.protocol import Line, ScanStart, encode
from stm_live.recorder import Recorder, read_journal

from conftest import CHANNELS, make_frame, scan_start, wait_for


def journal_lines(path):
    if not path.exists():
        return []
    return [e.message for e in read_journal(path) if isinstance(e.message, Line)]


def test_sigkill_mid_scan_keeps_every_received_line(tmp_path):
    record = tmp_path / "rec"
    instrument, output = free_tcp_endpoint(), free_tcp_endpoint()
    context = zmq.Context()
    pub = InstrumentPublisher(instrument, "test", context=context)
    daemon = subprocess.Popen([sys.executable, "-m", "stm_live", "--log-level", "WARNING", "run",
                               "--input", instrument, "--output", output, "--record", str(record)])
    try:
        assert pub.wait_for_subscriber(30)
        frame = make_frame(64, 32)
        pub.scan_start(scan_start("killed", rows=64, cols=32))
        for row in range(40):
            pub.line("killed", row, "forward", CHANNELS, [frame[row], frame[row] * 3])
        journal = record / "killed.journal"
        wait_for(lambda: len(journal_lines(journal)) == 40, 30, "40 recorded lines")
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        lines = journal_lines(journal)
        assert [m.row for m in lines] == list(range(40))
        for m in lines:
            assert np.array_equal(m.arrays[0], frame[m.row]) and np.array_equal(m.arrays[1], frame[m.row] * 3)
        (scan,) = replay_journal(journal)
        assert scan.state.end_reason == "incomplete" and scan.state.directions["forward"].rows_seen.sum() == 40
        assert [line[1] for line in scan.lines] == list(range(40))
        assert not (record / "killed.h5").exists()
        exported = export_journal(journal, "aborted")
        assert exported.exists()
    finally:
        if daemon.poll() is None:
            daemon.kill()
        pub.close(linger_s=0)
        context.destroy(linger=0)


def test_journal_is_verbatim_and_a_cut_tail_is_skipped(tmp_path):
    rec = Recorder(tmp_path)
    frame = make_frame(4, 8)
    big_endian = frame.astype(">f4")
    msgs = [scan_start("j", rows=4, cols=8)] + [
        Line("j", r, r, "forward", 1.0 + r, ("Z", "Current"), (big_endian[r], frame[r])) for r in range(4)]
    rec.record([("j", encode(m)) for m in msgs], 123.0)
    rec.close()
    path = rec.journal_path("j")
    entries = list(read_journal(path))
    assert isinstance(entries[0].message, ScanStart) and entries[0].received_unix == 123.0
    assert entries[1].message.arrays[0].dtype.str == ">f4"
    assert [e.message.row for e in entries[1:]] == [0, 1, 2, 3]
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 100)
    assert [e.message.row for e in list(read_journal(path))[1:]] == [0, 1, 2]


def test_recorder_keeps_a_bounded_number_of_files_open(tmp_path):
    rec = Recorder(tmp_path, max_open=2)
    for uid in ("a", "b", "c", "a"):
        rec.record([(uid, encode(scan_start(uid)))], time.time())
    assert len(rec._fds) == 2
    rec.close()
    assert len(list(read_journal(rec.journal_path("a")))) == 2
    assert os.path.getsize(rec.journal_path("c")) > 0


def _start_daemon(instrument, output, record, *extra_env):
    import os
    env = dict(os.environ, STM_LIVE_DAEMON__SCAN_TIMEOUT_S="1.5", STM_LIVE_DAEMON__STATUS_INTERVAL_S="0.2")
    return subprocess.Popen([sys.executable, "-m", "stm_live", "--log-level", "WARNING", "run", "--input", instrument,
                             "--output", output, "--record", str(record)], env=env)


def test_restarted_daemon_resumes_the_interrupted_scan(tmp_path):
    import h5py

    record = tmp_path / "rec"
    instrument, output = free_tcp_endpoint(), free_tcp_endpoint()
    context = zmq.Context()
    pub = InstrumentPublisher(instrument, "test", context=context)
    frame = make_frame(32, 16)
    daemon = _start_daemon(instrument, output, record)
    try:
        assert pub.wait_for_subscriber(30)
        pub.scan_start(scan_start("resumed", rows=32, cols=16))
        for row in range(12):
            pub.line("resumed", row, "forward", CHANNELS, [frame[row], frame[row]])
        journal = record / "resumed.journal"
        wait_for(lambda: len(journal_lines(journal)) == 12, 30, "12 recorded lines")
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        pub.subscriptions.clear()
        daemon = _start_daemon(instrument, output, record)
        assert pub.wait_for_subscriber(30)
        time.sleep(0.3)
        for row in range(12, 32):
            pub.line("resumed", row, "forward", CHANNELS, [frame[row], frame[row]])
        pub.scan_end("resumed")
        h5 = record / "resumed.h5"
        wait_for(h5.exists, 60, "HDF5 of the resumed scan")
        with h5py.File(h5) as f:
            assert f.attrs["end_reason"] == "complete"
            assert np.array_equal(f["forward/Z"][()], frame) and f["forward/measured"][()].all()
    finally:
        daemon.kill()
        pub.close(linger_s=0)
        context.destroy(linger=0)


def test_a_resumed_scan_that_stays_silent_is_closed_as_aborted(tmp_path):
    import h5py

    record = tmp_path / "rec"
    rec = Recorder(record)
    frame = make_frame(8, 8)
    rec.record([("silent", encode(scan_start("silent", rows=8, cols=8)))] +
               [("silent", encode(Line("silent", r, r, "forward", 0.0, ("Z", "Current"), (frame[r], frame[r]))))
                for r in range(3)], time.time())
    rec.close()
    daemon = _start_daemon(free_tcp_endpoint(), free_tcp_endpoint(), record)
    try:
        h5 = record / "silent.h5"
        wait_for(h5.exists, 60, "HDF5 of the aborted scan")
        with h5py.File(h5) as f:
            assert f.attrs["end_reason"] == "aborted" and f["forward/measured"][()].sum() == 24
    finally:
        daemon.kill()


def test_a_full_disk_is_reported_and_leaves_the_journal_readable(harness, monkeypatch):
    """While the disk refuses writes (half a write lands, then ENOSPC) the daemon reports it and
    goes on; the refused entries are cut off again, so what is recorded afterwards stays readable."""
    import errno

    import stm_live.recorder as recorder_module

    real_write = os.write
    full = {"on": False}

    def write(fd, data):
        if full["on"]:
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(recorder_module.os, "write", write)
    frame = make_frame(12, 8)
    pub = harness.publisher
    pub.scan_start(scan_start("full-disk", rows=12, cols=8))
    for row in range(12):
        if row == 4:
            harness.status_after(lambda s: s.counters["lines"] == 4)
            full["on"] = True
        if row == 8:
            harness.status_after(lambda s: s.counters["lines"] == 8 and s.counters.get("record_error_active") == 1)
            full["on"] = False
        pub.line("full-disk", row, "forward", CHANNELS, [frame[row], frame[row]])
    pub.scan_end("full-disk")
    status = harness.status_after(lambda s: s.counters["scans_completed"] == 1)
    assert status.counters["record_errors"] >= 1 and "record_error_active" not in status.counters
    assert status.counters["lines"] == 12
    rows = [e.message.row for e in read_journal(harness.daemon.recorder.journal_path("full-disk"))
            if isinstance(e.message, Line)]
    assert rows == [0, 1, 2, 3, 8, 9, 10, 11]
