"""Recording: every valid instrument message, verbatim, before anything else is done with it.

Each scan has a journal `<uid>.journal`: a msgpack stream of `[topic, header, [arrays], t_received]`
entries holding the exact wire bytes. Each entry goes to the operating system in one unbuffered
write, so a daemon killed at any moment (SIGKILL included) leaves every line it had received on
disk; at worst the entry being written is cut short, and readers stop cleanly before it. A write
the disk refuses (full, quota) is cut back off the journal, so entries appended after the disk
recovers stay readable.
When a scan ends the daemon also has `<uid>.h5` written from the journal (stm_live.export): the
assembled frames in HDF5 for analysis, written to a temporary name and then renamed, so no
half-written HDF5 file ever exists.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import msgpack
import numpy as np

from stm_live.assembly import ScanState
from stm_live.protocol import SCHEMA_VERSION, Decoder, Message, ProtocolError, _buffer

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal"


class Recorder:
    """Appends messages to per-scan journals; keeps at most `max_open` files open."""

    def __init__(self, directory: str | Path, max_open: int = 64) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_open = max_open
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def journal_path(self, uid: str) -> Path:
        return self.directory / f"{uid}{JOURNAL_SUFFIX}"

    def record(self, messages: Sequence[tuple[str, Sequence[Any]]], received_unix: float) -> None:
        """Append (uid, wire frames) pairs, in order, one write per scan; raises OSError if the disk refuses."""
        entries: dict[str, list[bytes]] = {}
        for uid, frames in messages:
            topic = bytes(_buffer(frames[0])).decode("ascii")
            entries.setdefault(uid, []).append(
                self._pack([topic, _buffer(frames[1]), [_buffer(f) for f in frames[2:]], received_unix]))
        for uid, packed in entries.items():
            data = b"".join(packed)
            fd = self._fd(uid)
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                written = os.write(fd, data)
            except OSError:
                os.ftruncate(fd, end)
                raise
            if written != len(data):
                os.ftruncate(fd, end)
                raise OSError(f"short write to journal of scan {uid}: {written} of {len(data)} bytes")

    def _fd(self, uid: str) -> int:
        fd = self._fds.get(uid)
        if fd is None:
            if len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(self.journal_path(uid), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._fds[uid] = fd
        else:
            self._fds.move_to_end(uid)
        return fd

    def close_scan(self, uid: str) -> None:
        fd = self._fds.pop(uid, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


LINE_RECORD = np.dtype([("seq", "<i8"), ("row", "<i4"), ("direction", "S8"), ("t_instrument", "<f8"),
                        ("t_received", "<f8")])


def write_scan_h5(state: ScanState, path: str | Path, lines: list[tuple[int, int, str, float, float]]) -> None:
    """The assembled scan and one record per placed line (seq, row, direction, times)."""
    start = state.start
    with h5py.File(path, "w") as h5:
        attrs = h5.attrs
        attrs["schema_version"] = SCHEMA_VERSION
        for key in ("uid", "instrument", "rows", "cols", "scan_direction", "plan",
                    "line_time_s", "bias_v", "setpoint_a"):
            attrs[key] = getattr(start, key)
        attrs["size_nm"] = np.asarray(start.size_nm)
        attrs["start_time_unix"] = start.t
        attrs["end_reason"] = state.end_reason or "open"
        attrs["lines_received"] = state.lines
        attrs["lines_out_of_order"] = state.out_of_order
        attrs["lines_missing"] = state.missing
        attrs["planned_mask_note"] = "planned: pixels the sampling plan measures; measured: pixels received"
        h5.create_dataset("planned", data=state.planned.view(np.uint8), compression="gzip")
        for direction, frames in state.directions.items():
            group = h5.create_group(direction)
            group.create_dataset("measured", data=frames.measured.view(np.uint8), compression="gzip")
            for channel, image in zip(start.channels, frames.images):
                ds = group.create_dataset(channel.name, data=image)
                ds.attrs["unit"] = channel.unit
                ds.attrs["unmeasured"] = "NaN"
        h5.create_dataset("lines", data=np.array(lines, dtype=LINE_RECORD))


@dataclass(frozen=True)
class JournalEntry:
    message: Message
    received_unix: float


def read_journal(path: str | Path, decoder: Decoder | None = None) -> Iterator[JournalEntry]:
    """Decode a journal's entries in order; a truncated final entry (killed writer) is skipped."""
    decoder = decoder or Decoder()
    with open(path, "rb") as fh:
        unpacker = msgpack.Unpacker(fh, raw=False, use_list=True, max_buffer_size=256 * 1024 * 1024)
        complete = 0
        while True:
            try:
                entry = unpacker.unpack()
            except msgpack.OutOfData:
                if complete < os.fstat(fh.fileno()).st_size:
                    log.warning("journal %s ends in a truncated entry after byte %d", path, complete)
                return
            except ValueError as exc:
                raise ProtocolError("bad_journal", f"{path}: corrupt entry: {exc}") from None
            if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[2], list)):
                raise ProtocolError("bad_journal", f"{path}: entry is not [topic, header, arrays, t]")
            complete = unpacker.tell()
            topic, header, arrays, received = entry
            message = decoder.decode([topic.encode("ascii"), header, *arrays])
            yield JournalEntry(message, float(received))
