import numpy as np
import pytest

from stm_live.assembly import AssemblyError, FrameAssembler
from stm_live.protocol import Line, ScanEnd

from conftest import make_frame, scan_start


def line(uid, seq, row, values, direction="forward"):
    return Line(uid, seq, row, direction, 0.0, ("Z", "Current"), (values, values * 2))


def test_lines_fill_their_rows_in_any_order():
    a = FrameAssembler()
    a.start(scan_start("s", rows=8, cols=6))
    frame = make_frame(8, 6)
    order = [0, 1, 3, 2, 5, 4, 7, 6]
    for seq, row in enumerate(order):
        a.add_line(line("s", row, row, frame[row]), 0.0)
    state = a.end(ScanEnd("s", "complete", 0.0))
    assert np.array_equal(state.directions["forward"].images[0], frame)
    assert np.array_equal(state.directions["forward"].images[1], frame * 2)
    assert state.directions["forward"].measured.all()
    assert state.out_of_order == 3 and state.missing == 0
    assert state.end_reason == "complete"


def test_sparse_rows_only_carry_measured_pixels():
    a = FrameAssembler()
    a.start(scan_start("s", rows=8, cols=8, plan="sr:2"))
    a.add_line(line("s", 0, 2, np.arange(4, dtype=np.float32)), 0.0)
    frames = a.scans["s"].directions["forward"]
    assert frames.images[0][2, ::2].tolist() == [0, 1, 2, 3]
    assert np.isnan(frames.images[0][2, 1::2]).all()
    assert frames.measured.sum() == 4


def test_missing_lines_are_counted_and_left_unmeasured():
    a = FrameAssembler()
    a.start(scan_start("s", rows=8, cols=4))
    frame = make_frame(8, 4)
    for seq in (0, 1, 4, 5):
        a.add_line(line("s", seq, seq, frame[seq]), 0.0)
    state = a.end(ScanEnd("s", "complete", 0.0))
    assert state.missing == 2
    assert state.directions["forward"].rows_seen.tolist() == [1, 1, 0, 0, 1, 1, 0, 0]


@pytest.mark.parametrize("bad, reason", [
    (line("nope", 0, 0, np.zeros(4, np.float32)), "unknown_scan"),
    (line("s", 0, 9, np.zeros(4, np.float32)), "bad_row"),
    (line("s", 0, 1, np.zeros(4, np.float32)), "off_plan"),
    (line("s", 0, 0, np.zeros(5, np.float32)), "bad_length"),
    (line("s", 0, 0, np.zeros(4, np.float32), direction="backward"), "bad_direction"),
    (Line("s", 0, 0, "forward", 0.0, ("Current", "Z"), (np.zeros(4, np.float32),) * 2), "bad_channels"),
])
def test_unplaceable_lines_are_refused_with_a_reason(bad, reason):
    a = FrameAssembler()
    a.start(scan_start("s", rows=8, cols=4, plan="lines:2"))
    with pytest.raises(AssemblyError) as err:
        a.add_line(bad, 0.0)
    assert err.value.reason == reason


def test_duplicates_keep_the_first_measurement():
    a = FrameAssembler()
    a.start(scan_start("s", rows=4, cols=4))
    a.add_line(line("s", 0, 0, np.ones(4, np.float32)), 0.0)
    with pytest.raises(AssemblyError, match="duplicate_line"):
        a.add_line(line("s", 1, 0, np.zeros(4, np.float32)), 0.0)
    assert a.scans["s"].directions["forward"].images[0][0].tolist() == [1, 1, 1, 1]
    with pytest.raises(AssemblyError, match="duplicate_scan_start"):
        a.start(scan_start("s"))


def test_non_finite_values_are_not_measured():
    a = FrameAssembler()
    a.start(scan_start("s", rows=4, cols=4))
    a.add_line(line("s", 0, 0, np.array([1, np.nan, 3, np.inf], np.float32)), 0.0)
    assert a.scans["s"].directions["forward"].measured[0].tolist() == [True, False, True, False]


def test_scan_end_without_start_and_eviction():
    a = FrameAssembler(max_active_scans=2)
    with pytest.raises(AssemblyError, match="unknown_scan"):
        a.end(ScanEnd("ghost", "complete", 0.0))
    a.start(scan_start("a"))
    a.start(scan_start("b"))
    a.add_line(line("a", 0, 0, np.zeros(32, np.float32)), 0.0)
    _, evicted = a.start(scan_start("c"))
    assert evicted.uid == "b" and evicted.end_reason == "aborted"
    assert list(a.scans) == ["a", "c"]
