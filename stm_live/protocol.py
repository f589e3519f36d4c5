"""Wire protocol v1: ZeroMQ multipart messages = topic + msgpack header + raw array frames.

The topic frame is the message type (ZeroMQ filters on it natively); frames add their slot,
`frame:<live|final>:<direction>:<channel>:`, so that a subscriber can take only what it needs;
`view:<direction>:<channel>:` carries the same frames paced for viewers (`stm_live.preview`). The
header is a msgpack map carrying the schema version `v`, the `type` and the type's fields; it
describes each following array frame by name, dtype (NumPy typestr, so byte order is explicit)
and shape. Arrays travel as raw bytes, encoded by reference (no serialisation). No pickle anywhere.

Decoding is strict and bounded: unknown or missing fields, wrong types, sizes beyond the
configured limits or array frames that disagree with the header raise ProtocolError, whose
`reason` is a short key the daemon counts drops by. See docs/protocol.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack
import numpy as np

SCHEMA_VERSION = 1

ARRAY_DTYPES = frozenset(
    {"<f4", ">f4", "<f8", ">f8", "|u1", "<u2", ">u2", "<i2", ">i2", "<i4", ">i4"}
)
CHANNEL_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
SCAN_DIRECTIONS = ("down", "up")
LINE_DIRECTIONS = ("forward", "backward")
END_REASONS = ("complete", "aborted")
FRAME_KINDS = ("raw", "reconstructed")
DAEMON_STATES = ("starting", "idle", "acquiring", "stopping")

_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_NAME = re.compile(r"[A-Za-z0-9_ .()/+-]{1,64}\Z")
_MAX_EXTRA_KEYS = 64


class ProtocolError(ValueError):
    """A message that is not valid v1; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 65536
    max_rows: int = 8192
    max_cols: int = 8192
    max_channels: int = 16


@dataclass(frozen=True)
class ChannelInfo:
    name: str
    unit: str
    dtype: str = "float32"


@dataclass(frozen=True)
class ScanStart:
    uid: str
    instrument: str
    channels: tuple[ChannelInfo, ...]
    rows: int
    cols: int
    size_nm: tuple[float, float]
    scan_direction: str
    plan: str
    line_directions: tuple[str, ...]
    line_time_s: float
    bias_v: float
    setpoint_a: float
    t: float
    extra: dict[str, Any] = field(default_factory=dict)
    type = "scan_start"


@dataclass(frozen=True)
class Line:
    uid: str
    seq: int
    row: int
    direction: str
    t: float
    channels: tuple[str, ...]
    arrays: tuple[np.ndarray, ...]
    type = "line"


@dataclass(frozen=True)
class ScanEnd:
    uid: str
    reason: str
    t: float
    type = "scan_end"


@dataclass(frozen=True)
class Heartbeat:
    source: str
    seq: int
    t: float
    type = "heartbeat"


@dataclass(frozen=True)
class Frame:
    """A whole frame of one channel and line direction; `mask` marks measured pixels."""

    uid: str
    channel: str
    unit: str
    direction: str
    kind: str
    rows_seen: int
    size_nm: tuple[float, float]
    method: str
    latency_s: float
    final: bool
    t: float
    image: np.ndarray
    mask: np.ndarray
    uncertainty: np.ndarray | None = None
    type = "frame"


@dataclass(frozen=True)
class Status:
    source: str
    state: str
    engine: str
    counters: dict[str, int]
    drops: dict[str, int]
    latency_s: dict[str, float]
    active_scans: tuple[str, ...]
    channels: tuple[str, ...]
    instruments: dict[str, float]
    t: float
    type = "status"


@dataclass(frozen=True)
class Truth:
    """Simulator only: what a `full` scan would have measured, the ideal topography, per-line labels."""

    uid: str
    channels: tuple[str, ...]
    arrays: tuple[np.ndarray, ...]
    t: float
    type = "truth"


@dataclass(frozen=True)
class TipReport:
    """The tip monitor's reading of the window ending at `row`: published state and evidence."""

    uid: str
    row: int
    rows_classified: int
    state: str
    probabilities: dict[str, float]
    window_probabilities: dict[str, float]
    features: dict[str, float]
    t: float
    type = "tip"


@dataclass(frozen=True)
class TipAlert:
    """A confirmed change of the tip state, with what the user should do about it."""

    uid: str
    row: int
    previous: str
    state: str
    probabilities: dict[str, float]
    recommendation: str
    t: float
    type = "alert"


@dataclass(frozen=True)
class ActionReport:
    """A tip-conditioning request and what became of it (`outcome`: requested, refused, executed,
    dry_run, failed, recovered, not_recovered)."""

    request: dict[str, Any]
    origin: str
    outcome: str
    detail: str
    t: float
    type = "action"


ATOM_COLUMNS = ("x_nm", "y_nm", "height", "precision_nm", "support")
MOLECULE_COLUMNS = ("x0_nm", "y0_nm", "x1_nm", "y1_nm", "score")
MOLECULE_ATOM_COLUMNS = (*ATOM_COLUMNS, "molecule")


@dataclass(frozen=True)
class LocMap:
    """A localization map of one final frame; always inferred. `direction` 'both' holds the atoms
    both traces found, their positions averaged (the feedback lag cancels). `atoms` is (5, K): x_nm, y_nm,
    flattened height, localization precision (nm, 1 sigma), support (reconstructions, of
    `samples`). `density` covers the frame at `density_pixel_nm`. `bravais` is 'none' with an
    empty `lattice` (a_nm, b_nm, angle_deg) when the frame shows no 2D lattice. `motion` holds
    what was measured of the scan's own movement, each pair only when measured: the drift from
    the previous frame of this channel and direction (drift_x_nm_s, drift_y_nm_s: how fast the
    image content moves, x right, y down the rows) and, on 'both' maps, the forward trace's
    offset from the backward one (trace_offset_x_nm, trace_offset_y_nm: twice the feedback lag
    plus the piezo hysteresis). `molecule_atoms` is (6, L): the atoms of molecules localized on
    their own super-resolved crops at a user's request (ATOM_COLUMNS, then the molecule's column
    in `molecules`); empty on the map published for every frame."""

    uid: str
    channel: str
    direction: str
    method: str
    samples: int
    spacing_nm: float
    sigma_nm: float
    density_pixel_nm: float
    bravais: str
    lattice: dict[str, float]
    latency_s: float
    t: float
    density: np.ndarray
    atoms: np.ndarray
    molecules: np.ndarray
    motion: dict[str, float] = field(default_factory=dict)
    molecule_atoms: np.ndarray = field(default_factory=lambda: np.zeros((len(MOLECULE_ATOM_COLUMNS), 0)))
    type = "locmap"


LOCMAP_DIRECTIONS = (*LINE_DIRECTIONS, "both")
BRAVAIS_CLASSES = ("oblique", "rectangular", "centered_rectangular", "square", "hexagonal", "none")
LATTICE_FIELDS = ("a_nm", "b_nm", "angle_deg")
MOTION_PAIRS = (("drift_x_nm_s", "drift_y_nm_s"), ("trace_offset_x_nm", "trace_offset_y_nm"))

Message = Union[ScanStart, Line, ScanEnd, Heartbeat, Frame, Status, Truth, TipReport, TipAlert, ActionReport,
                LocMap]
INSTRUMENT_TYPES = ("scan_start", "line", "scan_end", "heartbeat")
TYPES = INSTRUMENT_TYPES + ("frame", "status", "truth", "tip", "alert", "action", "locmap")
TIP_STATES = ("good", "blunt", "multi", "unstable", "changed")
ACTION_OUTCOMES = ("requested", "refused", "executed", "dry_run", "failed", "recovered", "not_recovered")
FINAL_FRAMES = "frame:final:"  # the topic prefix of every final frame
PREVIEW = "view"  # the viewers' paced copy of the frames (stm_live.preview); decodes as a frame


def _array_spec(name: str, array: np.ndarray) -> dict[str, Any]:
    return {"name": name, "dtype": array.dtype.str, "shape": list(array.shape)}


def frame_topic(final: bool, direction: str, channel: str) -> str:
    """A frame's topic: subscribing to `frame:final:` takes every final frame, to
    `frame:live:forward:Z:` the progressive frames of one slot (the closing colon keeps channel
    `Z` from matching `Z2`; colons are not allowed in names)."""
    return f"{FINAL_FRAMES if final else 'frame:live:'}{direction}:{channel}:"


def preview_topic(direction: str, channel: str | None = None) -> str:
    """The topic of a slot's frames on the viewers' stream, `view:forward:Z:`; without a channel,
    the prefix of every channel's in that direction, `view:forward:`."""
    return f"{PREVIEW}:{direction}:" + (f"{channel}:" if channel else "")


def topic(msg: Message) -> str:
    return frame_topic(msg.final, msg.direction, msg.channel) if isinstance(msg, Frame) else msg.type


def encode(msg: Message) -> list[Any]:
    """Message -> multipart frames [topic, header, *arrays]; arrays are passed by reference."""
    header: dict[str, Any] = {"v": SCHEMA_VERSION, "type": msg.type}
    arrays: list[tuple[str, np.ndarray]] = []
    if isinstance(msg, ScanStart):
        header.update(
            uid=msg.uid, instrument=msg.instrument,
            channels=[{"name": c.name, "unit": c.unit, "dtype": c.dtype} for c in msg.channels],
            rows=msg.rows, cols=msg.cols, size_nm=list(msg.size_nm),
            scan_direction=msg.scan_direction, plan=msg.plan,
            line_directions=list(msg.line_directions), line_time_s=msg.line_time_s,
            bias_v=msg.bias_v, setpoint_a=msg.setpoint_a, t=msg.t, extra=msg.extra,
        )
    elif isinstance(msg, Line):
        header.update(uid=msg.uid, seq=msg.seq, row=msg.row, direction=msg.direction, t=msg.t)
        arrays = list(zip(msg.channels, msg.arrays))
    elif isinstance(msg, ScanEnd):
        header.update(uid=msg.uid, reason=msg.reason, t=msg.t)
    elif isinstance(msg, Heartbeat):
        header.update(source=msg.source, seq=msg.seq, t=msg.t)
    elif isinstance(msg, Frame):
        header.update(
            uid=msg.uid, channel=msg.channel, unit=msg.unit, direction=msg.direction, kind=msg.kind,
            rows_seen=msg.rows_seen, size_nm=list(msg.size_nm), method=msg.method,
            latency_s=msg.latency_s, final=msg.final, t=msg.t,
        )
        arrays = [("image", msg.image), ("mask", msg.mask.view(np.uint8))]
        if msg.uncertainty is not None:
            arrays.append(("uncertainty", msg.uncertainty))
    elif isinstance(msg, Status):
        header.update(
            source=msg.source, state=msg.state, engine=msg.engine, counters=msg.counters,
            drops=msg.drops, latency_s=msg.latency_s, active_scans=list(msg.active_scans),
            channels=list(msg.channels), instruments=msg.instruments, t=msg.t,
        )
    elif isinstance(msg, Truth):
        header.update(uid=msg.uid, t=msg.t)
        arrays = list(zip(msg.channels, msg.arrays))
    elif isinstance(msg, TipReport):
        header.update(uid=msg.uid, row=msg.row, rows_classified=msg.rows_classified, state=msg.state,
                      probabilities=msg.probabilities, window_probabilities=msg.window_probabilities,
                      features=msg.features, t=msg.t)
    elif isinstance(msg, TipAlert):
        header.update(uid=msg.uid, row=msg.row, previous=msg.previous, state=msg.state,
                      probabilities=msg.probabilities, recommendation=msg.recommendation, t=msg.t)
    elif isinstance(msg, ActionReport):
        header.update(request=msg.request, origin=msg.origin, outcome=msg.outcome, detail=msg.detail, t=msg.t)
    elif isinstance(msg, LocMap):
        header.update(uid=msg.uid, channel=msg.channel, direction=msg.direction, method=msg.method,
                      samples=msg.samples, spacing_nm=msg.spacing_nm, sigma_nm=msg.sigma_nm,
                      density_pixel_nm=msg.density_pixel_nm, bravais=msg.bravais, lattice=msg.lattice,
                      motion=msg.motion, latency_s=msg.latency_s, t=msg.t)
        arrays = [("density", msg.density), ("atoms", msg.atoms), ("molecules", msg.molecules),
                  ("molecule_atoms", msg.molecule_atoms)]
    else:
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    contiguous = [np.ascontiguousarray(a) for _, a in arrays]
    header["arrays"] = [_array_spec(name, a) for (name, _), a in zip(arrays, contiguous)]
    return [topic(msg).encode(), msgpack.packb(header, use_bin_type=True), *contiguous]


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("bad_header", f"msgpack extension type {code} is not allowed")


class _Fields:
    """Typed access to a header map that records which keys were consumed."""

    __slots__ = ("header", "used")

    def __init__(self, header: dict[str, Any], used: Sequence[str] = ("v", "type", "arrays")) -> None:
        self.header = header
        self.used = set(used)

    def get(self, key: str, kinds: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.header:
            if default is ...:
                raise ProtocolError("missing_field", f"{key!r} is required")
            return default
        value = self.header[key]
        if type(value) is bool and kinds is not bool:
            raise ProtocolError("bad_field", f"{key!r} must not be a boolean")
        if not isinstance(value, kinds):
            raise ProtocolError("bad_field", f"{key!r} has type {type(value).__name__}")
        return value

    def number(self, key: str, default: Any = ...) -> float:
        value = self.get(key, (int, float), default)
        if value is not None and not math.isfinite(value):
            raise ProtocolError("bad_field", f"{key!r} is not finite")
        return float(value) if value is not None else value

    def count(self, key: str, low: int, high: int) -> int:
        value = self.get(key, int)
        if not low <= value <= high:
            raise ProtocolError("out_of_range", f"{key!r}={value} outside [{low}, {high}]")
        return value

    def choice(self, key: str, options: Sequence[str]) -> str:
        value = self.get(key, str)
        if value not in options:
            raise ProtocolError("bad_field", f"{key!r}={value[:32]!r} not one of {list(options)}")
        return value

    def pattern(self, key: str, regex: re.Pattern[str]) -> str:
        value = self.get(key, str)
        if not regex.match(value):
            raise ProtocolError("bad_field", f"{key!r}={value[:32]!r} has characters or a length not allowed")
        return value

    def numbers(self, key: str, names: Sequence[str] | None = None) -> dict[str, float]:
        """A map of names to finite numbers (all of `names`, exactly, when given)."""
        value = self.get(key, dict)
        if len(value) > 64 or not all(type(k) is str and isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and math.isfinite(v) for k, v in value.items()):
            raise ProtocolError("bad_field", f"{key!r} must map names to finite numbers")
        if names is not None and set(value) != set(names):
            raise ProtocolError("bad_field", f"{key!r} must have exactly {list(names)}")
        return {k: float(v) for k, v in value.items()}

    def size_nm(self) -> tuple[float, float]:
        size = self.get("size_nm", list)
        if len(size) != 2 or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                     and math.isfinite(s) and s > 0 for s in size):
            raise ProtocolError("bad_field", "'size_nm' must be two positive numbers")
        return float(size[0]), float(size[1])

    def finish(self) -> None:
        unknown = set(self.header) - self.used
        if unknown:
            raise ProtocolError("unknown_field", f"unknown fields {sorted(map(str, unknown))[:5]}")


class Decoder:
    """Strict, bounded decoding of received multipart frames into messages."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self._dtypes = {s: np.dtype(s) for s in ARRAY_DTYPES}

    def decode(self, frames: Sequence[Any]) -> Message:
        """Decode frames (bytes, memoryviews or zmq.Frame); raise ProtocolError."""
        if len(frames) < 2:
            raise ProtocolError("bad_envelope", f"{len(frames)} frame(s); need topic and header")
        raw_topic = bytes(_buffer(frames[0]))
        try:
            sent_topic = raw_topic.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("bad_topic", "topic is not ASCII") from None
        kind = sent_topic.split(":", 1)[0]
        preview = kind == PREVIEW
        if preview:
            kind = "frame"
        if kind not in TYPES:
            raise ProtocolError("bad_topic", f"unknown topic {raw_topic[:32]!r}")
        raw_header = _buffer(frames[1])
        if len(raw_header) > self.limits.max_header_bytes:
            raise ProtocolError("oversized", f"header of {len(raw_header)} bytes")
        try:
            header = msgpack.unpackb(
                raw_header, raw=False, strict_map_key=True, ext_hook=_no_ext,
                max_str_len=self.limits.max_header_bytes, max_bin_len=0,
                max_array_len=4096, max_map_len=4096,
            )
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError("bad_header", f"not msgpack: {type(exc).__name__}: {exc}"[:200]) from None
        if not isinstance(header, dict):
            raise ProtocolError("bad_header", "header is not a map")
        version = header.get("v")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise ProtocolError("schema_version", f"schema version {version!r}, this daemon speaks {SCHEMA_VERSION}")
        if header.get("type") != kind:
            raise ProtocolError("bad_header", f"header type {header.get('type')!r} != topic {kind!r}")
        names, arrays = self._arrays(header, frames[2:])
        f = _Fields(header)
        msg = getattr(self, f"_{kind}")(f, names, arrays)
        f.finish()
        if sent_topic != (preview_topic(msg.direction, msg.channel) if preview else topic(msg)):
            raise ProtocolError("bad_topic", f"topic {raw_topic[:64]!r} does not match the {kind} it carries")
        return msg

    def _arrays(self, header: dict[str, Any], frames: Sequence[Any]) -> tuple[list[str], list[np.ndarray]]:
        specs = header.get("arrays", [])
        if type(specs) is not list:
            raise ProtocolError("bad_header", "'arrays' is not a list")
        if len(specs) != len(frames):
            raise ProtocolError("array_mismatch", f"header lists {len(specs)} arrays, message has {len(frames)}")
        if len(specs) > self.limits.max_channels + 2:
            raise ProtocolError("oversized", f"{len(specs)} arrays")
        names: list[str] = []
        arrays: list[np.ndarray] = []
        max_rows, max_cols = self.limits.max_rows, self.limits.max_cols
        for spec, frame in zip(specs, frames):
            if type(spec) is not dict or len(spec) != 3:
                raise ProtocolError("bad_header", "array spec must be {name, dtype, shape}")
            try:
                name, typestr, shape = spec["name"], spec["dtype"], spec["shape"]
            except KeyError:
                raise ProtocolError("bad_header", "array spec must be {name, dtype, shape}") from None
            if type(name) is not str or not _NAME.match(name):
                raise ProtocolError("bad_field", "array name missing or not allowed")
            dtype = self._dtypes.get(typestr) if type(typestr) is str else None
            if dtype is None:
                raise ProtocolError("bad_dtype", f"dtype {typestr!r} not allowed")
            if type(shape) is not list or not 1 <= len(shape) <= 2 or any(type(n) is not int for n in shape):
                raise ProtocolError("bad_shape", f"shape {shape!r} is not 1-D or 2-D")
            if not 0 <= shape[-1] <= max_cols or (len(shape) == 2 and not 0 <= shape[0] <= max_rows):
                raise ProtocolError("oversized", f"shape {shape} beyond limits")
            buf = _buffer(frame)
            if len(buf) != math.prod(shape) * dtype.itemsize:
                raise ProtocolError("array_mismatch", f"{name!r}: {len(buf)} bytes for shape {shape} {typestr}")
            names.append(name)
            arrays.append(np.frombuffer(buf, dtype=dtype).reshape(shape))
        return names, arrays

    def _scan_start(self, f: _Fields, names: list[str], arrays: list[np.ndarray]) -> ScanStart:
        _no_arrays(arrays)
        lim = self.limits
        raw_channels = f.get("channels", list)
        if not 1 <= len(raw_channels) <= lim.max_channels:
            raise ProtocolError("out_of_range", f"{len(raw_channels)} channels")
        channels = []
        for c in raw_channels:
            if not isinstance(c, dict):
                raise ProtocolError("bad_field", "channel entry is not a map")
            cf = _Fields(c, used=())
            channels.append(ChannelInfo(cf.pattern("name", _NAME), cf.get("unit", str)[:16],
                                        cf.choice("dtype", tuple(CHANNEL_DTYPES))))
            cf.finish()
        if len({c.name for c in channels}) != len(channels):
            raise ProtocolError("bad_field", "duplicate channel names")
        directions = f.get("line_directions", list)
        if not directions or len(set(directions)) != len(directions) or not set(directions) <= set(LINE_DIRECTIONS):
            raise ProtocolError("bad_field", f"'line_directions' {directions!r}")
        extra = f.get("extra", dict, {})
        if len(extra) > _MAX_EXTRA_KEYS:
            raise ProtocolError("oversized", f"{len(extra)} extra keys")
        return ScanStart(
            uid=f.pattern("uid", _UID), instrument=f.pattern("instrument", _NAME),
            channels=tuple(channels), rows=f.count("rows", 1, lim.max_rows),
            cols=f.count("cols", 1, lim.max_cols), size_nm=f.size_nm(),
            scan_direction=f.choice("scan_direction", SCAN_DIRECTIONS), plan=f.get("plan", str)[:64],
            line_directions=tuple(directions), line_time_s=f.number("line_time_s"),
            bias_v=f.number("bias_v"), setpoint_a=f.number("setpoint_a"), t=f.number("t"), extra=extra,
        )

    def _line(self, f: _Fields, names: list[str], arrays: list[np.ndarray]) -> Line:
        if not arrays:
            raise ProtocolError("array_mismatch", "a line carries at least one channel")
        for a in arrays:
            if a.ndim != 1 or a.size == 0:
                raise ProtocolError("bad_shape", "line arrays must be 1-D and not empty")
        if len(set(names)) != len(names):
            raise ProtocolError("bad_field", "duplicate channel in line")
        return Line(
            uid=f.pattern("uid", _UID), seq=f.count("seq", 0, 2**63 - 1),
            row=f.count("row", 0, self.limits.max_rows - 1),
            direction=f.choice("direction", LINE_DIRECTIONS), t=f.number("t"),
            channels=tuple(names), arrays=tuple(arrays),
        )

    def _scan_end(self, f: _Fields, names: list[str], arrays: list[np.ndarray]) -> ScanEnd:
        _no_arrays(arrays)
        return ScanEnd(uid=f.pattern("uid", _UID), reason=f.choice("reason", END_REASONS), t=f.number("t"))

    def _heartbeat(self, f: _Fields, names: list[str], arrays: list[np.ndarray]) -> Heartbeat:
        _no_arrays(arrays)
        return Heartbeat(source=f.pattern("source", _NAME), seq=f.count("seq", 0, 2**63 - 1), t=f.number("t"))

    def _frame(self, f: _Fields, names: list[str], arrays: list[np.ndarray]) -> Frame:
        if names[:2] != ["image", "mask"] or names[2:] not in ([], ["uncertainty"]):
            raise ProtocolError("array_mismatch", f"frame arrays {names}")
        if (any(a.ndim != 2 or a.shape != arrays[0].shape for a in arrays) or arrays[1].dtype != np.uint8
                or arrays[0].size == 0):
            raise ProtocolError("bad_shape", "frame arrays must share one non-empty 2-D shape; mask is u1")
        return Frame(
            uid=f.pattern("uid", _UID), channel=f.pattern("channel", _NAME), unit=f.get("unit", str),
            direction=f.choice("direction", LINE_DIRECTIONS), kind=f.choice("kind", FRAME_KINDS),
            rows_seen=f.count("rows_seen", 0, self.limits.max_rows),
            size_nm=f.size_nm(),
            method=f.get("method", str), latency_s=f.number("latency_s"), final=f.get("final", bool),
            t=f.number("t"), image=arrays[0], mask=arrays[1].view(bool),
            uncertainty=arrays[2] if len(arrays) == 3 else None,
        )

    def _status(self, f: _Fields, names: list[str], arrays: list[np.ndarray]) -> Status:
        _no_arrays(arrays)
        channels = f.get("channels", list)
        if any(type(c) is not str or not _NAME.match(c) for c in channels):
            raise ProtocolError("bad_field", "status channels must be channel names")
        return Status(
            source=f.pattern("source", _NAME), state=f.choice("state", DAEMON_STATES),
            engine=f.get("engine", str), counters=f.get("counters", dict), drops=f.get("drops", dict),
            latency_s=f.get("latency_s", dict), active_scans=tuple(f.get("active_scans", list)),
            channels=tuple(channels), instruments=f.get("instruments", dict), t=f.number("t"),
        )

    def _truth(self, f: _Fields, names: list[str], arrays: list[np.ndarray]) -> Truth:
        if not arrays:
            raise ProtocolError("array_mismatch", "truth carries at least one array")
        return Truth(uid=f.pattern("uid", _UID), channels=tuple(names), arrays=tuple(arrays), t=f.number("t"))


    def _tip(self, f: _Fields, names: list[str], arrays: list[np.ndarray]) -> TipReport:
        _no_arrays(arrays)
        return TipReport(uid=f.pattern("uid", _UID), row=f.count("row", 0, self.limits.max_rows - 1),
                         rows_classified=f.count("rows_classified", 0, self.limits.max_rows),
                         state=f.choice("state", TIP_STATES), probabilities=f.numbers("probabilities", TIP_STATES),
                         window_probabilities=f.numbers("window_probabilities", TIP_STATES),
                         features=f.numbers("features"), t=f.number("t"))

    def _alert(self, f: _Fields, names: list[str], arrays: list[np.ndarray]) -> TipAlert:
        _no_arrays(arrays)
        return TipAlert(uid=f.pattern("uid", _UID), row=f.count("row", 0, self.limits.max_rows - 1),
                        previous=f.choice("previous", TIP_STATES), state=f.choice("state", TIP_STATES),
                        probabilities=f.numbers("probabilities", TIP_STATES),
                        recommendation=f.get("recommendation", str)[:256], t=f.number("t"))

    def _action(self, f: _Fields, names: list[str], arrays: list[np.ndarray]) -> ActionReport:
        _no_arrays(arrays)
        request = f.get("request", dict)
        if len(request) > 8 or not all(type(k) is str for k in request):
            raise ProtocolError("bad_field", "'request' must be a small map")
        return ActionReport(request=request, origin=f.pattern("origin", _NAME),
                            outcome=f.choice("outcome", ACTION_OUTCOMES), detail=f.get("detail", str)[:512],
                            t=f.number("t"))


    def _locmap(self, f: _Fields, names: list[str], arrays: list[np.ndarray]) -> LocMap:
        if names != ["density", "atoms", "molecules", "molecule_atoms"]:
            raise ProtocolError("array_mismatch", f"locmap arrays {names}")
        density, atoms, molecules, molecule_atoms = arrays
        if (density.ndim != 2 or density.size == 0 or atoms.ndim != 2 or atoms.shape[0] != len(ATOM_COLUMNS)
                or molecules.ndim != 2 or molecules.shape[0] != len(MOLECULE_COLUMNS)
                or molecule_atoms.ndim != 2 or molecule_atoms.shape[0] != len(MOLECULE_ATOM_COLUMNS)):
            raise ProtocolError("bad_shape", f"locmap density {density.shape}, atoms {atoms.shape}, "
                                             f"molecules {molecules.shape}, molecule_atoms {molecule_atoms.shape}")
        bravais = f.choice("bravais", BRAVAIS_CLASSES)
        lattice = f.numbers("lattice", () if bravais == "none" else LATTICE_FIELDS)
        motion = f.numbers("motion")
        if set(motion) - {name for pair in MOTION_PAIRS for name in pair} or any(
                (x in motion) != (y in motion) for x, y in MOTION_PAIRS):
            raise ProtocolError("bad_field", f"'motion' must hold whole pairs of {MOTION_PAIRS}")
        return LocMap(uid=f.pattern("uid", _UID), channel=f.pattern("channel", _NAME),
                      direction=f.choice("direction", LOCMAP_DIRECTIONS), method=f.get("method", str)[:64],
                      samples=f.count("samples", 1, 10_000), spacing_nm=f.number("spacing_nm"),
                      sigma_nm=f.number("sigma_nm"), density_pixel_nm=f.number("density_pixel_nm"),
                      bravais=bravais, lattice=lattice, latency_s=f.number("latency_s"), t=f.number("t"),
                      density=density, atoms=atoms, molecules=molecules, motion=motion,
                      molecule_atoms=molecule_atoms)


def _no_arrays(arrays: list[np.ndarray]) -> None:
    if arrays:
        raise ProtocolError("array_mismatch", "this message type carries no arrays")


def _buffer(frame: Any) -> memoryview | bytes:
    """The payload of a zmq.Frame, bytes or memoryview, without copying."""
    if type(frame) is bytes or type(frame) is memoryview:
        return frame
    buffer = getattr(frame, "buffer", None)
    if buffer is not None:
        return buffer
    view = memoryview(frame)
    return view.cast("B") if view.nbytes else b""
