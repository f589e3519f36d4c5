"""Nanonis TCP framing and body encoding (facts in ../shared/reference/nanonis-tcp.md).

Every message is a 40-byte header (command name, 32 bytes zero-padded ASCII; int32 body size;
uint16 send-response flag; 2 zero bytes) and a big-endian body. A reply body holds the return
values followed by the error section (uint32 status, int32 description length, description).
Shared by the client (drivers.nanonis_client) and the emulator (sim.nanonis_emulator).
"""

from __future__ import annotations

import socket
import struct

import numpy as np

HEADER = struct.Struct(">32siHH")
HEADER_SIZE = HEADER.size
MAX_BODY_BYTES = 256 * 1024 * 1024


class NanonisProtocolError(ConnectionError):
    """A reply that does not follow the framing: truncated, oversized, or for another command."""


class NanonisError(RuntimeError):
    """The controller answered with its error section set."""

    def __init__(self, command: str, description: str) -> None:
        super().__init__(f"{command}: {description}")
        self.command = command
        self.description = description


def pack_header(command: str, body_size: int, respond: bool = True) -> bytes:
    name = command.encode("ascii")
    if len(name) > 32:
        raise ValueError(f"command name longer than 32 bytes: {command}")
    return HEADER.pack(name.ljust(32, b"\0"), body_size, 1 if respond else 0, 0)


def unpack_header(data: bytes) -> tuple[str, int]:
    name, size, _, _ = HEADER.unpack(data)
    try:
        command = name.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise NanonisProtocolError("command name in the header is not ASCII") from None
    if not 0 <= size <= MAX_BODY_BYTES:
        raise NanonisProtocolError(f"{command}: body size {size} out of range")
    return command, size


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Read exactly `size` bytes; replies arrive split across reads."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            raise NanonisProtocolError(f"connection closed after {len(chunks)} of {size} bytes")
        chunks += chunk
    return bytes(chunks)


def recv_message(sock: socket.socket) -> tuple[str, bytes]:
    command, size = unpack_header(recv_exact(sock, HEADER_SIZE))
    return command, recv_exact(sock, size)


class Writer:
    """Builds a big-endian body."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u16(self, v: int) -> Writer:
        self.parts.append(struct.pack(">H", v))
        return self

    def u32(self, v: int) -> Writer:
        self.parts.append(struct.pack(">I", v))
        return self

    def i32(self, v: int) -> Writer:
        self.parts.append(struct.pack(">i", v))
        return self

    def f32(self, v: float) -> Writer:
        self.parts.append(struct.pack(">f", v))
        return self

    def string(self, v: str) -> Writer:
        data = v.encode("utf-8")
        return self.i32(len(data)).raw(data)

    def i32_array(self, values) -> Writer:
        self.parts.append(np.asarray(values, dtype=">i4").tobytes())
        return self

    def f32_array(self, values) -> Writer:
        self.parts.append(np.asarray(values, dtype=">f4").tobytes())
        return self

    def raw(self, data: bytes) -> Writer:
        self.parts.append(data)
        return self

    def error_section(self, description: str = "") -> Writer:
        data = description.encode("utf-8")
        return self.u32(1 if description else 0).i32(len(data)).raw(data)

    def bytes(self) -> bytes:
        return b"".join(self.parts)


class Reader:
    """Reads a big-endian body with bounds checks: a short body is a NanonisProtocolError."""

    def __init__(self, command: str, data: bytes) -> None:
        self.command = command
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise NanonisProtocolError(f"{self.command}: reply truncated ({len(self.data)} bytes, "
                                       f"needed {self.pos + n})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return struct.unpack(">H", self._take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self._take(4))[0]

    def i32(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def f32(self) -> float:
        return struct.unpack(">f", self._take(4))[0]

    def string(self) -> str:
        return self._take(self.i32()).decode("utf-8", errors="replace")

    def i32_array(self, count: int) -> np.ndarray:
        return np.frombuffer(self._take(4 * count), dtype=">i4").astype(np.int64)

    def f32_array(self, count: int) -> np.ndarray:
        return np.frombuffer(self._take(4 * count), dtype=">f4").astype(np.float32)

    def error_section(self) -> None:
        """Read the trailing error section; raise NanonisError if it reports one."""
        status = self.u32()
        description = self._take(self.i32()).decode("utf-8", errors="replace")
        if self.pos != len(self.data):
            raise NanonisProtocolError(f"{self.command}: {len(self.data) - self.pos} unexpected trailing bytes")
        if status:
            raise NanonisError(self.command, description or "error without description")


def error_only(command: str, data: bytes) -> NanonisError | None:
    """If a body is nothing but an error section, the error it reports."""
    if len(data) < 8:
        return None
    status, length = struct.unpack(">Ii", data[:8])
    if status and length == len(data) - 8:
        return NanonisError(command, data[8:].decode("utf-8", errors="replace"))
    return None
