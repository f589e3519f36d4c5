"""The action channel: tip-conditioning requests to a driver, one request, one reply.

The driver binds a REP socket on `conditioning.endpoint` (loopback by default) and polls it
between lines; the daemon (or a user's tool) connects a REQ socket. A request is a msgpack map
{"v": 1, "request": {...}, "origin": "..."}; the reply is {"v": 1, "outcome": ..., "detail": ...}
with outcome `refused`, `dry_run`, `executed` or `failed`. Whatever the sender checked, the
driver checks every request again against its own limits (ConditioningGate) before anything
moves; malformed requests are refused, never raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgpack
import zmq

from stm_live.drivers.conditioning import ConditioningGate
from stm_live.security import LOOPBACK_ONLY, Security

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096
ACTION_VERSION = 1


class ActionError(RuntimeError):
    """The driver did not answer, or answered something that is not a reply."""


def _decode(raw: bytes) -> dict:
    if len(raw) > MAX_REQUEST_BYTES:
        raise ValueError(f"{len(raw)} bytes, at most {MAX_REQUEST_BYTES}")
    message = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0, max_array_len=16, max_map_len=16)
    if not isinstance(message, dict) or message.get("v") != ACTION_VERSION:
        raise ValueError(f"not a version-{ACTION_VERSION} action message")
    return message


class ActionServer:
    """Answers conditioning requests; `execute(request)` runs an accepted one on the instrument."""

    def __init__(self, endpoint: str, gate: ConditioningGate, execute: Callable[[dict], None],
                 context: zmq.Context | None = None, security: Security = LOOPBACK_ONLY) -> None:
        self.gate = gate
        self.execute = execute
        self.socket = (context or zmq.Context.instance()).socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        security.bind(self.socket, endpoint)
        self.counters = {"action_requests": 0, "actions_refused": 0, "actions_executed": 0, "actions_failed": 0}

    def poll(self, timeout_ms: int = 0) -> int:
        """Answer every request waiting (up to `timeout_ms` for the first); returns how many."""
        answered = 0
        while self.socket.poll(timeout_ms if answered == 0 else 0, zmq.POLLIN):
            reply = self._answer(self.socket.recv())
            self.socket.send(msgpack.packb({"v": ACTION_VERSION, **reply}))
            answered += 1
        return answered

    def _answer(self, raw: bytes) -> dict:
        self.counters["action_requests"] += 1
        try:
            message = _decode(raw)
            request, origin = message.get("request"), message.get("origin")
            if not isinstance(request, dict) or not isinstance(origin, str) or set(message) != {"v", "request", "origin"}:
                raise ValueError("expected {v, request, origin}")
        except Exception as exc:
            self.counters["actions_refused"] += 1
            log.warning("malformed conditioning request refused: %s", exc)
            return {"outcome": "refused", "detail": f"malformed request: {exc}"[:200]}
        verdict = self.gate.check(request, origin[:64])
        if not verdict["accepted"]:
            self.counters["actions_refused"] += 1
            return {"outcome": "refused", "detail": verdict["reason"]}
        if verdict["dry_run"]:
            return {"outcome": "dry_run", "detail": "within limits; dry run, nothing executed"}
        try:
            self.execute(request)
        except Exception as exc:
            self.counters["actions_failed"] += 1
            log.error("conditioning action %s failed: %s", request, exc)
            return {"outcome": "failed", "detail": str(exc)[:200]}
        self.counters["actions_executed"] += 1
        log.warning("conditioning action executed for %s: %s", origin, request)
        return {"outcome": "executed", "detail": "executed"}

    def close(self) -> None:
        self.socket.close()


class ActionClient:
    """Sends one request at a time and waits for the driver's reply (bounded by a timeout)."""

    def __init__(self, endpoint: str, timeout_s: float = 2.0, context: zmq.Context | None = None,
                 security: Security = LOOPBACK_ONLY) -> None:
        self.endpoint = endpoint
        self.security = security
        self.timeout_ms = int(timeout_s * 1000)
        self.context = context or zmq.Context.instance()
        self.socket: zmq.Socket | None = None

    def request(self, request: dict, origin: str) -> dict:
        if self.socket is None:
            self.socket = self.context.socket(zmq.REQ)
            self.socket.setsockopt(zmq.LINGER, 0)
            self.security.connect(self.socket, self.endpoint)
        self.socket.send(msgpack.packb({"v": ACTION_VERSION, "request": request, "origin": origin}))
        if not self.socket.poll(self.timeout_ms, zmq.POLLIN):
            self.close()
            raise ActionError(f"no reply from {self.endpoint} within {self.timeout_ms} ms")
        try:
            reply = _decode(self.socket.recv())
        except Exception as exc:
            raise ActionError(f"bad reply from {self.endpoint}: {exc}") from None
        if reply.get("outcome") not in ("refused", "dry_run", "executed", "failed"):
            raise ActionError(f"bad reply from {self.endpoint}: {reply!r}"[:200])
        return {"outcome": reply["outcome"], "detail": str(reply.get("detail", ""))[:512]}

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None
