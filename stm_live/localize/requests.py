"""Crop requests: a user asks the daemon to localize molecules on their own super-resolved crops.

The daemon binds a REP socket on `localize.requests`; `stm-live crops` (or any REQ client) sends
a msgpack map {"v": 1, "channel": "Z", "direction": "forward", "boxes_nm": [[x0, y0, x1, y1], ...]}
("boxes_nm" optional: without it, the molecules the detector found in that slot's newest map).
The reply {"v": 1, "outcome": "queued" | "refused", "detail": ..., "uid": ..., "boxes": n} comes at
once; the result is published later as that frame's `locmap` again, with `molecule_atoms` filled.
Malformed requests are refused, never raised; the thread answering them does no localization.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import msgpack
import numpy as np
import zmq

from stm_live.protocol import LINE_DIRECTIONS
from stm_live.security import LOOPBACK_ONLY, Security

log = logging.getLogger(__name__)

REQUEST_VERSION = 1
MAX_REQUEST_BYTES = 4096
MAX_BOXES = 64
OUTCOMES = ("queued", "refused")


class CropRequestError(ValueError):
    """A request the daemon cannot serve; the message is the reason given to the user."""


def parse_request(raw: bytes) -> tuple[str, str, np.ndarray | None]:
    """(channel, direction, boxes (K, 4) nm or None) of a request, or CropRequestError."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise CropRequestError(f"request of {len(raw)} bytes, at most {MAX_REQUEST_BYTES}")
    try:
        message = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0,
                                  max_array_len=MAX_BOXES, max_map_len=8)
    except Exception as exc:
        raise CropRequestError(f"not msgpack: {exc}") from None
    if not isinstance(message, dict) or message.get("v") != REQUEST_VERSION:
        raise CropRequestError(f"not a version-{REQUEST_VERSION} crop request")
    if set(message) - {"v", "channel", "direction", "boxes_nm"}:
        raise CropRequestError(f"unknown fields {sorted(set(message) - {'v', 'channel', 'direction', 'boxes_nm'})}")
    channel, direction = message.get("channel"), message.get("direction", "forward")
    if not isinstance(channel, str) or not 0 < len(channel) <= 64:
        raise CropRequestError("'channel' must be a channel name")
    if direction not in LINE_DIRECTIONS:
        raise CropRequestError(f"'direction' must be one of {LINE_DIRECTIONS}")
    boxes = message.get("boxes_nm")
    if boxes is None:
        return channel, direction, None
    try:
        array = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise CropRequestError("'boxes_nm' must be a list of [x0, y0, x1, y1]") from None
    if array.ndim != 2 or array.shape[1] != 4 or len(array) == 0 or not np.isfinite(array).all():
        raise CropRequestError("'boxes_nm' must be a non-empty list of finite [x0, y0, x1, y1]")
    if np.any(array[:, 2] <= array[:, 0]) or np.any(array[:, 3] <= array[:, 1]):
        raise CropRequestError("every box needs x1 > x0 and y1 > y0")
    return channel, direction, array


class CropRequestServer:
    """Answers crop requests on its own thread; `submit(channel, direction, boxes)` queues the work
    and returns (uid, boxes queued), or raises CropRequestError with the reason."""

    def __init__(self, endpoint: str, submit: Callable[[str, str, np.ndarray | None], tuple[str, int]],
                 context: zmq.Context, security: Security = LOOPBACK_ONLY) -> None:
        self.submit = submit
        self.socket = context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        security.bind(self.socket, endpoint)
        self.counters = {"crop_requests": 0, "crop_requests_refused": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stm-live-crop-requests", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.socket.poll(100, zmq.POLLIN):
                self.socket.send(msgpack.packb({"v": REQUEST_VERSION, **self.answer(self.socket.recv())}))
        self.socket.close()

    def answer(self, raw: bytes) -> dict:
        self.counters["crop_requests"] += 1
        try:
            uid, count = self.submit(*parse_request(raw))
        except CropRequestError as exc:
            self.counters["crop_requests_refused"] += 1
            log.warning("crop request refused: %s", exc)
            return {"outcome": "refused", "detail": str(exc)[:200], "uid": "", "boxes": 0}
        except Exception as exc:  # a bug must not leave the REP socket without its reply
            self.counters["crop_requests_refused"] += 1
            log.exception("crop request failed")
            return {"outcome": "refused", "detail": f"internal error: {exc}"[:200], "uid": "", "boxes": 0}
        return {"outcome": "queued", "detail": f"{count} molecules of {uid}", "uid": uid, "boxes": count}

    def close(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(5.0)
        else:
            self.socket.close()


def request_crops(endpoint: str, channel: str, direction: str = "forward", boxes_nm: list | None = None,
                  timeout_s: float = 5.0, security: Security = LOOPBACK_ONLY) -> dict:
    """Send one crop request and return the daemon's reply; TimeoutError when none comes."""
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        security.connect(socket, endpoint)
        request = {"v": REQUEST_VERSION, "channel": channel, "direction": direction}
        if boxes_nm is not None:
            request["boxes_nm"] = [[float(v) for v in box] for box in boxes_nm]
        socket.send(msgpack.packb(request))
        if not socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise TimeoutError(f"no reply from {endpoint} within {timeout_s} s")
        reply = msgpack.unpackb(socket.recv(), raw=False, max_bin_len=0)
    finally:
        socket.close()
    if not isinstance(reply, dict) or reply.get("outcome") not in OUTCOMES:
        raise ValueError(f"not a crop reply: {reply!r}"[:200])
    return reply
