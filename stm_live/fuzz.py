"""`stm-live bench fuzz`: mutate valid inputs and feed every decoder; only its own errors may come out.

Targets, each with the one exception type it is allowed to raise on bad input:
- `protocol`: wire messages (multipart frames) -> Decoder.decode, ProtocolError;
- `action`: action-channel requests -> ActionServer's answer, never an exception (a refusal);
- `crops`: crop requests to the daemon -> parse_request, CropRequestError;
- `nanonis`: Nanonis TCP replies to every client command, through a real socket pair ->
  NanonisClient, NanonisProtocolError / NanonisError / ConnectionError;
- `scanfile`: .sxm, .sm4, .dat and .npy files (real scans when ../shared/data/real is present,
  and files written here) -> read_scan_file, ScanFileError;
- `config`: TOML text -> load_settings, ConfigError.
Seeds are valid inputs; mutations flip bits, overwrite, insert, delete and duplicate byte runs,
truncate, and splice frames. Any other exception is a crash: its input is saved under `out_dir`
and it counts against the run. Deterministic for a seed.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from stm_live.machine import machine

log = logging.getLogger(__name__)

TARGETS = ("protocol", "action", "crops", "nanonis", "scanfile", "config")


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to four random byte-level edits."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        kind = int(rng.integers(7))
        n = len(out)
        at = int(rng.integers(n + 1)) if n else 0
        if kind == 0 and n:
            out[min(at, n - 1)] ^= 1 << int(rng.integers(8))
        elif kind == 1 and n:
            out[min(at, n - 1)] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF, int(rng.integers(256))]))
        elif kind == 2:
            out[at:at] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        elif kind == 3 and n:
            del out[at:at + int(rng.integers(1, 17))]
        elif kind == 4 and n:
            out = out[:at]
        elif kind == 5 and n:
            out[at:at] = out[max(0, at - 8):at] * int(rng.integers(1, 4))
        elif kind == 6 and n >= 4:
            out[min(at, n - 4):min(at, n - 4) + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
                                                                 b"\x00\x00\x00\x00", b"\x80\x00\x00\x00"])
    return bytes(out)


class Target:
    """A decoder under fuzz: seeds, how to run one input, and what it may raise."""

    def __init__(self, name: str, seeds: list[Any], run: Callable[[Any], None], allowed: tuple[type, ...],
                 mutate_input: Callable[[Any, np.random.Generator], Any], dump: Callable[[Any], bytes]) -> None:
        self.name, self.seeds, self.run, self.allowed = name, seeds, run, allowed
        self.mutate_input, self.dump = mutate_input, dump
        self.runs = self.rejected = 0
        self.crashes: list[str] = []


def _header(raw: bytes) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:
        return None


def _frames_target() -> Target:
    from stm_live.protocol import (
        ChannelInfo, Decoder, Frame, Line, ProtocolError, ScanStart, TipReport, encode, preview_topic,
    )

    channels = (ChannelInfo("Z", "m"), ChannelInfo("Current", "A"))
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    p = {"good": 0.9, "blunt": 0.05, "multi": 0.03, "unstable": 0.01, "changed": 0.01}
    messages = [
        ScanStart("s", "sim", channels, 8, 8, (5.0, 5.0), "down", "lines:2", ("forward", "backward"), 0.1, 1.0,
                  1e-10, 1.0, {"k": 1}),
        Line("s", 1, 2, "forward", 1.0, ("Z", "Current"), (np.arange(8, dtype=np.float32), np.ones(8, ">f8"))),
        Frame("s", "Z", "m", "forward", "reconstructed", 4, (5.0, 5.0), "classical", 0.01, False, 1.0, image,
              image > 3, image),
        TipReport("s", 4, 4, "good", p, p, {"step": 0.1}, 1.0),
    ]
    seeds = [[bytes(memoryview(f).cast("B")) for f in encode(m)] for m in messages]
    seeds.append([preview_topic("forward", "Z").encode(), *seeds[2][1:]])  # the frame on the viewers' stream
    decoder = Decoder()

    def mutate_frames(frames: list[bytes], rng: np.random.Generator) -> list[bytes]:
        frames = list(frames)
        choice = rng.random()
        if choice < 0.15 and len(frames) > 1:
            del frames[int(rng.integers(len(frames)))]
        elif choice < 0.25:
            frames.insert(int(rng.integers(len(frames) + 1)), frames[int(rng.integers(len(frames)))])
        elif choice < 0.5 and len(frames) > 1 and isinstance(header := _header(frames[1]), dict) and header:
            keys = sorted(header, key=str)
            values = [None, True, -1, 2**63, 1e308, float("nan"), "x" * 70, [], {}, [1] * 5000, {"a": [1, 2]}]
            header[keys[int(rng.integers(len(keys)))]] = values[int(rng.integers(len(values)))]
            frames[1] = msgpack.packb(header, use_bin_type=True)
        else:
            i = int(rng.integers(len(frames)))
            frames[i] = mutate(frames[i], rng)
        return frames

    return Target("protocol", seeds, decoder.decode, (ProtocolError,), mutate_frames, lambda f: msgpack.packb(f))


def _action_target() -> Target:
    from stm_live.drivers.actions import ActionServer
    from stm_live.drivers.conditioning import ConditioningGate, ConditioningLimits

    server = ActionServer.__new__(ActionServer)
    server.gate = ConditioningGate(ConditioningLimits(dry_run=True, min_interval_s=0.0))
    server.execute = lambda request: None
    server.counters = dict.fromkeys(("action_requests", "actions_refused", "actions_executed", "actions_failed"), 0)
    seeds = [msgpack.packb({"v": 1, "request": {"action": "bias_pulse", "bias_v": 2.0, "width_s": 0.01},
                            "origin": "fuzz"}),
             msgpack.packb({"v": 1, "request": {"action": "dip", "depth_nm": 0.3, "bias_v": 0.1}, "origin": "x"})]

    def run(raw: bytes) -> None:
        reply = server._answer(raw)
        server.gate.log.clear()
        if reply.get("outcome") not in ("refused", "dry_run", "executed", "failed"):
            raise AssertionError(f"bad reply {reply!r}")

    return Target("action", seeds, run, (), lambda raw, rng: mutate(raw, rng), lambda raw: raw)


def _crops_target() -> Target:
    from stm_live.localize.requests import CropRequestError, parse_request

    seeds = [msgpack.packb({"v": 1, "channel": "Z", "direction": "forward"}),
             msgpack.packb({"v": 1, "channel": "Z", "direction": "backward", "boxes_nm": [[1.0, 2.0, 3.5, 4.0],
                                                                                         [0, 0, 1, 1]]})]
    return Target("crops", seeds, parse_request, (CropRequestError,), lambda raw, rng: mutate(raw, rng),
                  lambda raw: raw)


def _nanonis_target() -> Target:
    """Replies recorded from the emulator for every read command, replayed mutated over a socketpair."""
    import stm_live.drivers.nanonis_client as client_module
    from stm_live.drivers.nanonis_client import NanonisClient
    from stm_live.drivers.nanonis_wire import NanonisError, NanonisProtocolError, pack_header
    from stm_live.sim.nanonis_emulator import NanonisEmulator

    calls: dict[str, Callable[[NanonisClient], Any]] = {
        "Scan.StatusGet": lambda c: c.scan_status(),
        "Scan.WaitEndOfLine": lambda c: c.wait_end_of_line(10),
        "Scan.WaitEndOfScan": lambda c: c.wait_end_of_scan(10),
        "Scan.FrameGet": lambda c: c.frame_get(),
        "Scan.BufferGet": lambda c: c.buffer_get(),
        "Scan.PropsGet": lambda c: c.props_get(),
        "Scan.FrameDataGrab": lambda c: c.frame_data_grab(0, True),
        "Scan.SpeedGet": lambda c: c.speed_get(),
        "Bias.Get": lambda c: c.bias_get(),
        "ZCtrl.SetpntGet": lambda c: c.setpoint_get(),
        "Signals.ValsGet": lambda c: c.signals_get([0, 1]),
    }
    recorded: dict[str, bytes] = {}
    original = client_module.recv_message

    def recording(sock: socket.socket) -> tuple[str, bytes]:
        name, data = original(sock)
        recorded[name] = data
        return name, data

    emulator = NanonisEmulator(line_time_s=0.005, seed=1)
    emulator.buffer = ([30, 0], 16, 16)
    emulator.start()
    client_module.recv_message = recording
    try:
        client = NanonisClient(emulator.host, emulator.port, timeout_s=5)
        client.scan_action("start")
        for call in calls.values():
            try:
                call(client)
            except NanonisError:
                pass
        client.close()
    finally:
        client_module.recv_message = original
        emulator.stop()
    seeds = [(name, data) for name, data in recorded.items() if name in calls]
    if not seeds:
        raise RuntimeError("the emulator answered none of the read commands")

    def run(item: tuple[str, bytes]) -> None:
        name, body = item
        ours, theirs = socket.socketpair()
        try:
            theirs.sendall(pack_header(name, len(body)) + body)
            theirs.shutdown(socket.SHUT_WR)
            client = NanonisClient("unused", 0, timeout_s=0.5)
            client._sock = ours
            calls[name](client)
        finally:
            ours.close()
            theirs.close()

    def mutate_reply(item: tuple[str, bytes], rng: np.random.Generator) -> tuple[str, bytes]:
        return item[0], mutate(item[1], rng)

    return Target("nanonis", seeds, run, (NanonisProtocolError, NanonisError, ConnectionError), mutate_reply,
                  lambda item: item[0].encode() + b"\n" + item[1])


HEADER_ENDS = {  # where each binary format's header ends: most mutations go there, where parsing happens
    ".sxm": lambda data: data.find(b":SCANIT_END:") + 12,
    ".sm4": lambda data: min(len(data), 8192),  # file header, page index and page headers
}


def _scanfile_target(work: Path) -> Target:
    from stm_live.drivers.scanfiles import ScanFileError, read_scan_file

    seeds: list[tuple[str, bytes]] = []
    real = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
    for name in ("Si_7x7_051.sxm", "graphite_ABC_9K_065.sm4"):
        if (real / name).exists():
            seeds.append(((real / name).suffix, (real / name).read_bytes()))
    npy = work / "seed.npy"
    np.save(npy, np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32))
    seeds.append((".npy", npy.read_bytes()))
    createc = work / "seed.dat"
    _write_createc(createc)
    seeds.append((".dat", createc.read_bytes()))
    def run(item: tuple[str, bytes]) -> None:
        suffix, data = item
        path = work / f"input{suffix}"
        path.write_bytes(data)
        read_scan_file(path, size_nm=10.0)

    def mutate_file(item: tuple[str, bytes], rng: np.random.Generator) -> tuple[str, bytes]:
        suffix, data = item
        if suffix in HEADER_ENDS and rng.random() < 0.7:
            end = HEADER_ENDS[suffix](data)
            return suffix, mutate(data[:end], rng) + data[end:]
        return suffix, mutate(data, rng)

    return Target("scanfile", seeds, run, (ScanFileError,), mutate_file, lambda item: item[1])


def _write_createc(path: Path) -> None:
    """A small Createc .dat in the documented layout (ASCII header, zlib-compressed float32)."""
    import zlib

    values = np.random.default_rng(1).normal(size=(2, 8, 8)).astype("<f4")
    header = ("[Parameter]\r\nNum.X / Num.X=8\r\nNum.Y / Num.Y=8\r\nChannels=2\r\n"
              "Length x[A]=100\r\nLength y[A]=100\r\nBiasVolt.[mV]=500\r\nDAC-Type=20bit\r\n")
    body = zlib.compress(np.concatenate([np.zeros(1, "<f4"), values.ravel()]).tobytes())
    path.write_bytes(header.encode().ljust(16384, b"\x00") + b"DATA" + body)


def _config_target(work: Path) -> Target:
    from stm_live.config import ConfigError, load_settings, settings_as_toml
    from stm_live.config import Settings

    seeds = [settings_as_toml(Settings()).encode(), b"[daemon]\nengine = \"model\"\n[tip]\nhop = 4\n"]

    def run(data: bytes) -> None:
        path = work / "config.toml"
        path.write_bytes(data)
        load_settings(path, environ={})

    return Target("config", seeds, run, (ConfigError,), lambda data, rng: mutate(data, rng), lambda data: data)


def fuzz(seconds: float = 60.0, seed: int = 0, out_dir: str | Path = "fuzz-crashes",
         targets: tuple[str, ...] = TARGETS, inputs: int | None = None) -> dict[str, Any]:
    """Mutated inputs for `seconds`, each target getting an equal share of the time (a slow
    target, a scan file, does not starve a fast one, a message); crashes saved to `out_dir`.
    With `inputs`, a target stops once it has had that many, and the run once all have (or
    `seconds` are up): the same inputs on a fast or a busy machine."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    quiet = logging.getLogger("stm_live")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="stm-live-fuzz-") as tmp:
        warnings.simplefilter("ignore")
        work = Path(tmp)
        makers = {"protocol": _frames_target, "action": _action_target, "crops": _crops_target,
                  "nanonis": _nanonis_target,
                  "scanfile": lambda: _scanfile_target(work), "config": lambda: _config_target(work)}
        chosen = [makers[name]() for name in targets]
        for target in chosen:  # each seed once, unmutated: one-time imports do not count against a share
            for item in target.seeds:
                target.run(item)
        started = time.monotonic()
        slowest: dict[str, float] = {t.name: 0.0 for t in chosen}
        spent: dict[str, float] = {t.name: 0.0 for t in chosen}
        while time.monotonic() - started < seconds:
            waiting = [t for t in chosen if inputs is None or t.runs < inputs]
            if not waiting:
                break
            target = min(waiting, key=lambda t: spent[t.name])
            t0 = time.perf_counter()
            item = target.seeds[int(rng.integers(len(target.seeds)))]
            for _ in range(int(rng.integers(1, 4))):
                item = target.mutate_input(item, rng)
            t1 = time.perf_counter()
            try:
                target.run(item)
            except target.allowed:
                target.rejected += 1
            except Exception:
                out.mkdir(parents=True, exist_ok=True)
                path = out / f"{target.name}-{len(target.crashes):04d}.bin"
                path.write_bytes(target.dump(item))
                target.crashes.append(f"{path}: {traceback.format_exc(limit=3).splitlines()[-1]}"[:300])
            target.runs += 1
            slowest[target.name] = max(slowest[target.name], time.perf_counter() - t1)
            spent[target.name] += time.perf_counter() - t0
    quiet.setLevel(level)
    elapsed = time.monotonic() - started
    return {"benchmark": "fuzz", "seconds": round(elapsed, 1), "seed": seed, "machine": machine(),
            "targets": {t.name: {"inputs": t.runs, "rejected_cleanly": t.rejected, "accepted": t.runs - t.rejected -
                                 len(t.crashes), "crashes": len(t.crashes), "first_crashes": t.crashes[:10],
                                 "slowest_input_s": round(slowest[t.name], 3)}
                        for t in chosen},
            "crashes": sum(len(t.crashes) for t in chosen)}
