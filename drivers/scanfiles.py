"""Reading recorded scans into one form: frames in image orientation plus acquisition metadata.

Image orientation throughout: row 0 is the top of the frame, column 0 the left, and backward
traces are turned around to read left to right. `scan_direction` says in which order the rows
were acquired (`up`: bottom row first), so a replay can publish them in that order.

Formats: Nanonis .sxm (nanonispy2), Createc .dat (our reader of the documented layout: a
`[Paramco32]` text header, a `DATA` marker, zlib-compressed little-endian float32), RHK .sm4
(spym, optional extra `rhk`) and NumPy .npy (2-D, or 3-D with channels first). Anything truncated
or inconsistent raises ScanFileError naming the file and what is wrong.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class ScanFileError(ValueError):
    """A scan file that cannot be read as a complete, consistent scan."""


@dataclass
class ChannelData:
    name: str
    unit: str
    forward: np.ndarray
    backward: np.ndarray | None = None


@dataclass
class ScanFile:
    path: Path
    channels: list[ChannelData]
    size_nm: tuple[float, float]
    scan_direction: str = "down"
    bias_v: float = float("nan")
    setpoint_a: float = float("nan")
    line_time_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.channels[0].forward.shape


def read_scan_file(path: str | Path, size_nm: float | None = None) -> ScanFile:
    """Read any supported scan file; `size_nm` gives the frame size of a .npy file."""
    path = Path(path)
    if not path.is_file():
        raise ScanFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    readers = {".sxm": _read_sxm, ".dat": _read_createc, ".sm4": _read_sm4, ".npy": _read_npy}
    if suffix not in readers:
        raise ScanFileError(f"{path}: unknown format {suffix!r}; expected .sxm, .dat, .sm4 or .npy")
    try:
        scan = readers[suffix](path) if suffix != ".npy" else _read_npy(path, size_nm)
    except ScanFileError:
        raise
    except Exception as exc:  # third-party readers raise their own types for damaged files
        raise ScanFileError(f"{path}: cannot read as {suffix}: {type(exc).__name__}: {exc}") from None
    _check(scan)
    return scan


def _check(scan: ScanFile) -> None:
    shape = scan.shape
    if len(shape) != 2 or min(shape) < 1:
        raise ScanFileError(f"{scan.path}: frame shape {shape}")
    for ch in scan.channels:
        for trace in (ch.forward, ch.backward):
            if trace is not None and trace.shape != shape:
                raise ScanFileError(f"{scan.path}: channel {ch.name} has shape {trace.shape}, expected {shape}")
    if not all(np.isfinite(s) and s > 0 for s in scan.size_nm):
        raise ScanFileError(f"{scan.path}: frame size {scan.size_nm} nm")


def _unit_of(name: str) -> tuple[str, str]:
    """'Z (m)' -> ('Z', 'm'); names without a unit get ''."""
    match = re.match(r"^(.*?)\s*\(([^)]*)\)\s*$", name)
    return (match.group(1), match.group(2)) if match else (name, "")


def _read_sxm(path: Path) -> ScanFile:
    import nanonispy2

    scan = nanonispy2.read.Scan(str(path))
    header = scan.header
    info = header["data_info"]
    up = header["scan_dir"] == "up"
    channels = []
    for name, unit in zip(info["Name"], info["Unit"]):
        traces = scan.signals[name]
        forward = np.asarray(traces["forward"], dtype=np.float32)
        backward = np.asarray(traces["backward"], dtype=np.float32)[:, ::-1]
        if up:
            forward, backward = forward[::-1], backward[::-1]
        channels.append(ChannelData(name, unit, np.ascontiguousarray(forward), np.ascontiguousarray(backward)))
    width, height = (float(v) * 1e9 for v in header["scan_range"])
    line_time = float(np.sum(header.get("scan_time", [0.0, 0.0])))
    setpoint = float("nan")
    controller = header.get("z-controller", {})
    if isinstance(controller, dict) and "Setpoint" in controller:
        setpoint = float(str(controller["Setpoint"][0]).split()[0])
    return ScanFile(path, channels, (width, height), "up" if up else "down", float(header.get("bias", "nan")),
                    setpoint, line_time, {"format": "sxm", "nanonis_version": str(header.get("nanonis_version", ""))})


_CREATEC_MARKER = b"DATA"


def _read_createc(path: Path) -> ScanFile:
    raw = path.read_bytes()
    if not raw.startswith((b"[Paramco32]", b"[Parameter]")):
        raise ScanFileError(f"{path}: no [Paramco32] or [Parameter] header: not a Createc .dat file")
    at = raw.find(_CREATEC_MARKER)
    if at < 0:
        raise ScanFileError(f"{path}: no DATA marker: truncated or not a Createc .dat file")
    params = {}
    for line in raw[:at].decode("latin-1").splitlines()[1:]:
        key, sep, value = line.partition("=")
        if sep:  # "Num.X / Num.X=256", "BiasVoltage / BiasVolt.[mV]=-200": the name after the slash
            params[key.rpartition(" / ")[2].strip()] = value.strip()
    try:
        cols, rows = int(params["Num.X"]), int(params["Num.Y"])
        channels = int(params.get("Channels", "1"))
        width_nm, height_nm = float(params["Length x[A]"]) / 10, float(params["Length y[A]"]) / 10
    except (KeyError, ValueError) as exc:
        raise ScanFileError(f"{path}: header lacks or garbles {exc}") from None
    try:
        values = np.frombuffer(zlib.decompress(raw[at + len(_CREATEC_MARKER):]), dtype="<f4")
    except zlib.error as exc:
        raise ScanFileError(f"{path}: compressed data is damaged or cut short ({exc})") from None
    # The frames come channel by channel at the end of the stream; values before them are skipped.
    need = channels * rows * cols
    if values.size < need:
        raise ScanFileError(f"{path}: {values.size} values for {channels} channel(s) of {rows}x{cols}")
    frames = values[values.size - need:].reshape(channels, rows, cols)
    # Topography in DAC units becomes metres through the header's "Dacto[A]z" (unverified on real files).
    z_unit, z_scale = ("m", float(params["Dacto[A]z"]) * 1e-10) if "Dacto[A]z" in params else ("DAC", 1.0)
    names = ["Topography", "Current", "ADC1", "ADC2"]
    data = [ChannelData(names[i] if i < len(names) else f"channel{i}", z_unit if i == 0 else "",
                        (frames[i] * (z_scale if i == 0 else 1.0)).astype(np.float32)) for i in range(channels)]
    up = params.get("ScanYDirec", "1") == "0"
    if up:
        for ch in data:
            ch.forward = np.ascontiguousarray(ch.forward[::-1])
    bias = float(params["BiasVolt.[mV]"]) / 1000 if "BiasVolt.[mV]" in params else float("nan")
    return ScanFile(path, data, (width_nm, height_nm), "up" if up else "down", bias, extra={"format": "createc"})


def _read_sm4(path: Path) -> ScanFile:
    try:
        from spym.io import rhksm4
    except ImportError as exc:
        raise ScanFileError(f"{path}: reading RHK .sm4 needs spym (pip install 'stm-live[rhk]'): {exc}") from None
    pages = rhksm4.load(str(path))
    traces: dict[str, dict[str, np.ndarray]] = {}
    meta = {}
    for page in pages:
        attrs = page.attrs
        if int(attrs.get("RHK_PageDataType", -1)) != 0 or int(attrs.get("RHK_LineType", -1)) != 0:
            continue
        data = np.asarray(page.data, dtype=np.float64) * float(attrs["RHK_Zscale"]) + float(attrs["RHK_Zoffset"])
        label = str(attrs["RHK_Label"])
        direction = "backward" if int(attrs["RHK_ScanType"]) == 1 else "forward"
        traces.setdefault(label, {})[direction] = data.astype(np.float32)
        meta[label] = attrs
    if not traces:
        raise ScanFileError(f"{path}: no image pages")
    channels = [ChannelData(label, str(meta[label].get("RHK_Zunits", "")), t.get("forward", t.get("backward")),
                            t.get("backward") if "forward" in t else None) for label, t in traces.items()]
    first = next(iter(meta.values()))
    width = abs(float(first["RHK_Xscale"])) * int(first["RHK_Xsize"]) * 1e9
    height = abs(float(first["RHK_Yscale"])) * int(first["RHK_Ysize"]) * 1e9
    line_time = float(first["RHK_Period"]) * int(first["RHK_Xsize"]) * 2
    return ScanFile(path, channels, (width, height), "down", float(first["RHK_Bias"]), float(first["RHK_Current"]),
                    line_time, {"format": "sm4"})


def _read_npy(path: Path, size_nm: float | None) -> ScanFile:
    data = np.load(path, allow_pickle=False)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or not np.issubdtype(data.dtype, np.number):
        raise ScanFileError(f"{path}: expected a numeric 2-D frame or channels x rows x cols, got {data.shape} {data.dtype}")
    if size_nm is None:
        raise ScanFileError(f"{path}: a .npy file carries no frame size; give it (--size-nm)")
    channels = [ChannelData("Z" if i == 0 else f"channel{i}", "m" if i == 0 else "", data[i].astype(np.float32))
                for i in range(data.shape[0])]
    return ScanFile(path, channels, (size_nm, size_nm), extra={"format": "npy"})
