import math
import time

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from stm_live.protocol import (
    SCHEMA_VERSION, TIP_STATES, ActionReport, Decoder, Frame, Heartbeat, Limits, Line, ProtocolError, ScanEnd,
    ScanStart, Status, TipAlert, TipReport, Truth, encode,
)

from conftest import CHANNELS, scan_start


def wire(msg):
    """What a subscriber receives: plain bytes per frame."""
    return [bytes(memoryview(f).cast("B")) for f in encode(msg)]


def header_of(frames):
    return msgpack.unpackb(frames[1])


def with_header(frames, **changes):
    header = header_of(frames)
    for key, value in changes.items():
        if value is ...:
            header.pop(key)
        else:
            header[key] = value
    return [frames[0], msgpack.packb(header), *frames[2:]]


def a_line(**kw):
    values = kw.pop("values", (np.arange(8, dtype=np.float32), np.ones(8, np.float32)))
    args = dict(uid="scan-1", seq=3, row=2, direction="forward", t=time.time(), channels=("Z", "Current"),
                arrays=tuple(values))
    args.update(kw)
    return Line(**args)


def test_every_type_round_trips():
    d = Decoder()
    img = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    msgs = [
        scan_start("scan-1"),
        a_line(),
        ScanEnd("scan-1", "aborted", 1.0),
        Heartbeat("sim", 7, 2.0),
        Frame("scan-1", "Z", "m", "forward", "reconstructed", 3, (5.0, 5.0), "classical", 0.01, True, 3.0,
              img, img > 0, img.astype(np.float32)),
        Status("stm-live", "idle", "classical", {"lines": 3}, {"bad_header": 1}, {"p50": 0.01}, ("a",),
               ("Z", "Current"), {"sim": 0.5}, 4.0),
        Truth("scan-1", ("Z",), (img,), 5.0),
        TipReport("scan-1", 40, 24, "blunt", PROBABILITIES, PROBABILITIES, {"step": 0.5}, 6.0),
        TipAlert("scan-1", 40, "good", "blunt", PROBABILITIES, "pulse it", 7.0),
        ActionReport({"action": "bias_pulse", "bias_v": 2.0, "width_s": 0.01}, "monitor", "executed", "ok", 8.0),
    ]
    for msg in msgs:
        out = d.decode(wire(msg))
        assert type(out) is type(msg)
        for name in msg.__dataclass_fields__:
            a, b = getattr(msg, name), getattr(out, name)
            if isinstance(a, np.ndarray):
                assert np.array_equal(a, b) and a.dtype == b.dtype
            elif name == "arrays":
                assert all(np.array_equal(x, y) for x, y in zip(a, b))
            else:
                assert a == b, name


PROBABILITIES = {"good": 0.1, "blunt": 0.7, "multi": 0.1, "unstable": 0.05, "changed": 0.05}


@pytest.mark.parametrize("msg, changes", [
    (TipReport("s", 1, 1, "good", PROBABILITIES, PROBABILITIES, {}, 0.0), {"state": "dirty"}),
    (TipReport("s", 1, 1, "good", PROBABILITIES, PROBABILITIES, {}, 0.0), {"probabilities": {"good": 1.0}}),
    (TipReport("s", 1, 1, "good", PROBABILITIES, PROBABILITIES, {}, 0.0), {"features": {"step": float("inf")}}),
    (TipAlert("s", 1, "good", "multi", PROBABILITIES, "", 0.0), {"previous": 3}),
    (ActionReport({}, "monitor", "executed", "", 0.0), {"outcome": "exploded"}),
    (ActionReport({}, "monitor", "executed", "", 0.0), {"request": {str(i): i for i in range(20)}}),
])
def test_tip_messages_are_validated(msg, changes):
    with pytest.raises(ProtocolError):
        Decoder().decode(with_header(wire(msg), **changes))
    assert set(PROBABILITIES) == set(TIP_STATES)


def test_header_carries_version_and_array_layout():
    frames = wire(a_line(values=(np.arange(4, dtype=">f8"),), channels=("Z",)))
    header = header_of(frames)
    assert frames[0] == b"line" and header["v"] == SCHEMA_VERSION and header["type"] == "line"
    assert header["arrays"] == [{"name": "Z", "dtype": ">f8", "shape": [4]}]
    line = Decoder().decode(frames)
    assert line.arrays[0].dtype.str == ">f8" and line.arrays[0].tolist() == [0, 1, 2, 3]


def test_a_frame_travels_under_its_slot_and_the_topic_must_match_it():
    img = np.ones((4, 4), np.float32)
    live = Frame("s", "Z", "m", "backward", "raw", 2, (1.0, 1.0), "measured", 0.0, False, 1.0, img, img > 0)
    final = Frame("s", "Z2", "m", "forward", "reconstructed", 4, (1.0, 1.0), "classical", 0.0, True, 1.0, img, img > 0)
    assert wire(live)[0] == b"frame:live:backward:Z:" and wire(final)[0] == b"frame:final:forward:Z2:"
    assert not b"frame:final:forward:Z:".startswith(b"frame:live:forward:Z:")
    decoded = Decoder().decode(wire(live))
    assert (decoded.channel, decoded.direction, decoded.final) == ("Z", "backward", False)
    viewed = Decoder().decode([b"view:backward:Z:", *wire(live)[1:]])  # the viewers' paced copy
    assert (viewed.channel, viewed.direction, viewed.final) == ("Z", "backward", False)
    for lie in (b"frame", b"frame:final:backward:Z:", b"frame:live:backward:Z2:", b"status", b"view:forward:Z:",
                b"view:backward:Z2:", b"view"):
        with pytest.raises(ProtocolError) as err:
            Decoder().decode([lie, *wire(live)[1:]])
        assert err.value.reason in ("bad_topic", "bad_header")
    with pytest.raises(ProtocolError):
        Decoder().decode([b"view:forward:Z:", *wire(Status("d", "idle", "none", {}, {}, {}, (), (), {}, 1.0))[1:]])


def test_status_channels_must_be_names():
    status = Status("stm-live", "idle", "classical", {}, {}, {}, (), ("Z",), {}, 1.0)
    with pytest.raises(ProtocolError):
        Decoder().decode(with_header(wire(status), channels=["Z", 3]))
    with pytest.raises(ProtocolError):
        Decoder().decode(with_header(wire(status), channels=["Z:live"]))


@pytest.mark.parametrize("frames, reason", [
    ([b"line"], "bad_envelope"),
    ([b"\xff\xfe", b"x"], "bad_topic"),
    ([b"nonsense", b"x"], "bad_topic"),
    ([b"line", b"\xc1garbage"], "bad_header"),
    ([b"line", msgpack.packb([1, 2, 3])], "bad_header"),
    ([b"line", b"\x81"], "bad_header"),
])
def test_garbage_is_refused(frames, reason):
    with pytest.raises(ProtocolError) as err:
        Decoder().decode(frames)
    assert err.value.reason == reason


@pytest.mark.parametrize("changes, reason", [
    ({"v": 2}, "schema_version"),
    ({"v": ...}, "schema_version"),
    ({"v": True}, "schema_version"),
    ({"type": "scan_end"}, "bad_header"),
    ({"row": "2"}, "bad_field"),
    ({"row": True}, "bad_field"),
    ({"row": -1}, "out_of_range"),
    ({"row": 10**9}, "out_of_range"),
    ({"seq": ...}, "missing_field"),
    ({"direction": "sideways"}, "bad_field"),
    ({"t": float("nan")}, "bad_field"),
    ({"uid": "../../etc/passwd"}, "bad_field"),
    ({"uid": "x" * 500}, "bad_field"),
    ({"surprise": 1}, "unknown_field"),
    ({"arrays": [{"name": "Z", "dtype": "<f4", "shape": [8]}]}, "array_mismatch"),
    ({"arrays": [{"name": "Z", "dtype": "O", "shape": [8]}, {"name": "C", "dtype": "<f4", "shape": [8]}]}, "bad_dtype"),
    ({"arrays": [{"name": "Z", "dtype": "<f4", "shape": [9]}, {"name": "C", "dtype": "<f4", "shape": [8]}]}, "array_mismatch"),
    ({"arrays": [{"name": "Z", "dtype": "<f4", "shape": [10**7]}, {"name": "C", "dtype": "<f4", "shape": [8]}]}, "oversized"),
    ({"arrays": [{"name": "Z", "dtype": "<f4", "shape": [2, 4]}, {"name": "C", "dtype": "<f4", "shape": [8]}]}, "bad_shape"),
    ({"arrays": [{"name": "Z", "dtype": "<f4"}, {"name": "C", "dtype": "<f4", "shape": [8]}]}, "bad_header"),
])
def test_bad_fields_are_refused_with_a_reason(changes, reason):
    with pytest.raises(ProtocolError) as err:
        Decoder().decode(with_header(wire(a_line()), **changes))
    assert err.value.reason == reason


def test_limits_bound_what_is_accepted():
    small = Decoder(Limits(max_cols=4, max_rows=4, max_channels=2, max_header_bytes=1024))
    with pytest.raises(ProtocolError, match="oversized"):
        small.decode(wire(a_line()))
    with pytest.raises(ProtocolError, match="out_of_range"):
        small.decode(wire(scan_start("s", rows=8, cols=4)))
    with pytest.raises(ProtocolError, match="oversized"):
        small.decode(wire(ScanStart("s", "x", CHANNELS[:1], 4, 4, (1.0, 1.0), "down", "full", ("forward",),
                                    0.1, 1.0, 1.0, 0.0, extra={"note": "x" * 2000})))
    one_channel = Decoder(Limits(max_channels=1))
    with pytest.raises(ProtocolError, match="out_of_range"):
        one_channel.decode(wire(scan_start("s")))


def test_extension_types_are_refused():
    frames = wire(ScanEnd("s", "complete", 1.0))
    header = header_of(frames)
    header["t"] = msgpack.ExtType(5, b"boom")
    with pytest.raises(ProtocolError, match="bad_header"):
        Decoder().decode([frames[0], msgpack.packb(header)])


def test_scan_start_validates_channels_and_geometry():
    good = wire(scan_start("s"))
    for changes in ({"channels": []}, {"channels": [{"name": "Z", "unit": "m", "dtype": "int8"}]},
                    {"channels": [{"name": "Z", "unit": "m", "dtype": "float32"}] * 2},
                    {"size_nm": [1.0]}, {"size_nm": [1.0, -2.0]}, {"scan_direction": "left"},
                    {"line_directions": []}, {"line_directions": ["forward", "forward"]}, {"rows": 0}):
        with pytest.raises(ProtocolError):
            Decoder().decode(with_header(good, **changes))


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_random_bytes_only_ever_raise_protocol_error(frames):
    try:
        Decoder().decode(frames)
    except ProtocolError:
        pass


@hsettings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "type", "uid", "seq", "row", "direction", "t", "arrays", "x"]),
                       st.one_of(st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8), st.booleans(), st.none(),
                                 st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)), max_size=9))
def test_random_headers_only_ever_raise_protocol_error(header):
    try:
        msg = Decoder().decode([b"line", msgpack.packb(header), np.zeros(4, np.float32).tobytes()])
    except ProtocolError:
        return
    assert isinstance(msg, Line) and math.isfinite(msg.t)


def test_no_pickle_in_the_package():
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[1]
    for folder in ("stm_live", "drivers", "engines", "sim"):
        for path in (root / folder).rglob("*.py"):
            assert not re.search(r"import pickle|pickle\.loads?\(|import dill|cloudpickle", path.read_text()), path
