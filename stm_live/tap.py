"""`stm-live tap`: what is on the wire, one JSON object per message, without array payloads."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import zmq

from stm_live.protocol import Decoder, Message, ProtocolError
from stm_live.security import LOOPBACK_ONLY, Security

_SKIP = {"arrays", "image", "mask", "uncertainty"}


def summarize(msg: Message) -> dict[str, Any]:
    """Header fields of a decoded message, arrays reduced to name, dtype and shape."""
    out: dict[str, Any] = {"type": msg.type}
    for name in msg.__dataclass_fields__:
        if name in _SKIP:
            continue
        value = getattr(msg, name)
        if name == "channels" and value and not isinstance(value[0], str):
            value = [{"name": c.name, "unit": c.unit, "dtype": c.dtype} for c in value]
        out[name] = list(value) if isinstance(value, tuple) else value
    arrays = getattr(msg, "arrays", None)
    if arrays is not None:
        out["shapes"] = [list(a.shape) for a in arrays]
    if hasattr(msg, "image"):
        out["shape"] = list(msg.image.shape)
        out["dtype"] = msg.image.dtype.str
    return out


def tap(endpoint: str, count: int | None = None, timeout_s: float | None = None, topics: tuple[str, ...] = ("",),
        context: zmq.Context | None = None, security: Security = LOOPBACK_ONLY) -> Iterator[dict[str, Any]]:
    """Yield summaries of messages published at `endpoint` until `count` or `timeout_s`."""
    context = context or zmq.Context.instance()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    for topic in topics:
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    security.connect(sock, endpoint)
    decoder = Decoder()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen = 0
    try:
        while count is None or seen < count:
            wait = 1000 if deadline is None else int(max(0.0, deadline - time.monotonic()) * 1000)
            if not sock.poll(wait):
                if deadline is not None and time.monotonic() >= deadline:
                    return
                continue
            frames = sock.recv_multipart(copy=False)
            try:
                summary = summarize(decoder.decode(frames))
                summary["topic"] = bytes(frames[0].buffer).decode("ascii")  # a frame's on `frame:...` or `view:...`
                yield summary
            except ProtocolError as exc:
                yield {"type": "invalid", "reason": exc.reason, "detail": exc.detail}
            seen += 1
    finally:
        sock.close()


def to_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, default=str, separators=(",", ":"))
