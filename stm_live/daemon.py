"""The streaming daemon: instrument lines in, frames and status out, everything recorded.

Data flows one way. The ingest thread receives a message, decodes it strictly, appends it to
the scan's journal (before anything else happens to it), then routes it to the frame assembler;
every `reconstruct_every_lines` lines (at most `progressive_max_hz` times a second per scan
direction; lines held back by that limit follow as soon as it allows) and at scan end it hands
a snapshot to the scheduler, at scan end the final height frames to the localization thread,
and every line to the tip monitor.
The reconstruction, localization and tip-monitor threads send their messages (frames; locmaps;
tip readings, alerts, actions) back over an inproc socket, and the ingest thread, the
only owner of the output socket, publishes them with heartbeats and status. Every frame also goes
out on the viewers' `view:` topics, paced to a display's rate (`stm_live.preview`). The output
socket keeps the newest final frame of each slot and kind and publishes it again when a
subscriber joins that slot's topic (a last-value cache): a viewer takes only the slot it shows
and still has a picture the moment it switches.
"""

from __future__ import annotations

import logging
import threading
import time

import msgpack
import zmq
from threadpoolctl import threadpool_limits

from stm_live.assembly import AssemblyError, DirectionFrames, FrameAssembler, ScanState
from stm_live.batcher import BatchPolicy
from stm_live.config import Settings
from stm_live.engines import LEARNED_ENGINES, create_chain
from stm_live.export import ExportProcess, interrupted_scans
from stm_live.localize.requests import CropRequestServer
from stm_live.localize.service import LocalizationService, LocalizeJob
from stm_live.metrics import worth_logging
from stm_live.preview import PreviewPacer
from stm_live.protocol import (
    INSTRUMENT_TYPES,
    Decoder,
    Heartbeat,
    Limits,
    Line,
    Message,
    ProtocolError,
    ScanEnd,
    ScanStart,
    Status,
    encode,
    frame_topic,
    preview_topic,
)
from stm_live.recorder import Recorder
from stm_live.scheduler import ReconstructionScheduler
from stm_live.security import from_settings
from stm_live.tip.service import TipService

log = logging.getLogger(__name__)

SOURCE = "stm-live"


class DropLog:
    """Counts dropped messages by reason; logs the 1st, 10th, 100th, ... of each reason."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def drop(self, reason: str, detail: str) -> None:
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        if worth_logging(n):
            log.warning("dropped message #%d for %s: %s", n, reason, detail)


class Daemon:
    """One instance per process; `run()` serves until `stop()` is called."""

    def __init__(self, settings: Settings, context: zmq.Context | None = None) -> None:
        self.settings = settings
        cfg = settings.daemon
        # The daemon's parallelism is its threads (ingest, engine, tip, localization). BLAS worker
        # threads for its small matrix products only contend with them: with OpenBLAS's two
        # spinning workers, 1 % of classical frames stalled for about 100 ms on 2 cores.
        threadpool_limits(1, user_api="blas")
        self.context = context or zmq.Context.instance()
        self.security = from_settings(settings.security.curve, settings.security.keys_dir)
        self.decoder = Decoder(Limits(**settings.limits.model_dump()))
        self.assembler = FrameAssembler(cfg.max_active_scans)
        self.recorder = Recorder(cfg.record_dir, max_open=cfg.max_active_scans) if cfg.record_dir else None
        self.exporter: ExportProcess | None = None
        engines = create_chain(cfg.engine, cfg.engine_fallback, cfg.engine_timeout_s, cfg.engine_threads,
                               cfg.engine_backend, cfg.runner_options())
        policy = BatchPolicy(cfg.batch_max_frames, cfg.batch_max_delay_us, cfg.batch_bucket_px)
        other_units = (create_chain("classical", "none", cfg.engine_timeout_s)
                       if cfg.engine in LEARNED_ENGINES else None)
        self.scheduler = ReconstructionScheduler(engines, self._send_from_worker, policy, other_units,
                                                 tuple(cfg.model_units))
        self.localize = None
        self.crop_requests: CropRequestServer | None = None
        if settings.localize.enabled:
            localize_engines = create_chain("classical" if cfg.engine == "none" else cfg.engine, cfg.engine_fallback,
                                            cfg.engine_timeout_s, cfg.engine_threads, cfg.engine_backend,
                                            cfg.runner_options())
            self.localize = LocalizationService(settings.localize, localize_engines, self._send_from_worker,
                                                settings.limits.max_cols, min(settings.limits.max_rows,
                                                                              settings.limits.max_cols))
        self.tip = (TipService(settings.tip, settings.conditioning, self._send_from_worker, security=self.security)
                    if settings.tip.enabled else None)
        self.drops = DropLog()
        self.counters = dict.fromkeys(
            ("received", "recorded", "record_errors", "lines", "scans_started", "scans_completed",
             "scans_aborted", "scans_resumed", "out_of_order", "missing_lines", "heartbeats_in"), 0)
        self.published: dict[str, int] = {}
        self.instrument_seen: dict[str, float] = {}
        self.state = "starting"
        self.record_error: str | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._min_submit_interval = 1.0 / cfg.progressive_max_hz if cfg.progressive_max_hz else 0.0
        self._held: dict[tuple[str, str], float] = {}
        self._results_endpoint = f"inproc://stm-live-results-{id(self)}"
        self._worker_sockets = threading.local()
        self._all_worker_sockets: list[zmq.Socket] = []
        self._heartbeat_seq = 0
        self._last_channels: tuple[str, ...] = ()  # of the newest scan: named in status between scans too
        self._last_finals: dict[tuple[str, str, str], list] = {}  # (direction, channel, kind) -> newest final, encoded
        self._previews = PreviewPacer(cfg.preview_max_hz)

    # -- life cycle -------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the sockets are bound and connected."""
        return self._ready.wait(timeout)

    def run(self) -> None:
        cfg, zcfg = self.settings.daemon, self.settings.zmq
        lim = self.settings.limits
        sub = self.context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, zcfg.input_hwm)
        sub.setsockopt(zmq.MAXMSGSIZE, max(lim.max_header_bytes, lim.max_cols * 8))
        for topic in INSTRUMENT_TYPES:
            sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        pub = self.context.socket(zmq.XPUB)
        pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, also to topics others already take
        pub.setsockopt(zmq.SNDHWM, zcfg.output_hwm)
        results = self.context.socket(zmq.PULL)
        for sock in (sub, pub, results):
            sock.setsockopt(zmq.LINGER, zcfg.linger_ms)
        try:
            results.bind(self._results_endpoint)
            self.security.bind(pub, cfg.output)
            self.security.connect(sub, cfg.input)
            self.scheduler.start()
            if self.localize is not None:
                self.localize.start()
                if self.settings.localize.requests:
                    self.crop_requests = CropRequestServer(self.settings.localize.requests,
                                                           self.localize.request_crops, self.context, self.security)
                    self.crop_requests.start()
            if self.tip is not None:
                self.tip.start()
            if self.recorder is not None and cfg.export_hdf5:
                self.exporter = ExportProcess()
            self._resume()
            log.info("daemon: input %s, output %s, engine %s, recording to %s",
                     cfg.input, cfg.output, self.scheduler.method, cfg.record_dir or "(off)")
            self.state = "idle"
            self._ready.set()
            self._serve(sub, pub, results)
        finally:
            self.state = "stopping"
            for scan in self.assembler.close_all("aborted"):
                self._finish_scan(scan)
            self.scheduler.close()
            if self.crop_requests is not None:
                self.crop_requests.close()
            if self.localize is not None:
                self.localize.close()
            if self.tip is not None:
                self.tip.close()
            self._forward(results, pub)
            self._publish_status(pub)
            if self.recorder:
                self.recorder.close()
            if self.exporter is not None:
                self.exporter.close()
            for sock in self._all_worker_sockets:
                sock.close()
            for sock in (sub, results, pub):
                sock.close()
            self.security.close()
            log.info("daemon stopped: %s", self.counters)

    def _resume(self) -> None:
        """Reopen the scans a killed daemon left open, from their journals."""
        if self.recorder is None:
            return
        for state in interrupted_scans(self.recorder.directory):
            for frames in state.directions.values():
                frames.last_line_time = time.perf_counter()
            state.last_activity = time.perf_counter()
            self.assembler.restore(state)
            self.counters["scans_resumed"] += 1
            log.warning("resumed scan %s from its journal: %d lines so far", state.uid, state.lines)

    def _expire_silent(self) -> None:
        """An open scan that stays silent (its instrument stopped or died, or it was resumed and
        nothing came) will never end by itself: close it as aborted so it is exported."""
        timeout = self.settings.daemon.scan_timeout_s
        now = time.perf_counter()
        for uid, state in list(self.assembler.scans.items()):
            if now - state.last_activity >= timeout:
                log.warning("scan %s received nothing for %.0f s; closing it as aborted", uid, timeout)
                self._finish_scan(self.assembler.finish(uid, "aborted"))

    def _serve(self, sub: zmq.Socket, pub: zmq.Socket, results: zmq.Socket) -> None:
        cfg = self.settings.daemon
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        poller.register(pub, zmq.POLLIN)
        next_heartbeat = next_status = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_heartbeat:
                self._publish(pub, Heartbeat(SOURCE, self._heartbeat_seq, time.time()))
                self._heartbeat_seq += 1
                next_heartbeat = now + cfg.heartbeat_interval_s
            if now >= next_status:
                self._expire_silent()
                self._publish_status(pub)
                next_status = now + cfg.status_interval_s
            next_held = self._submit_held()
            for frames in self._previews.due(now):
                self._emit(pub, frames)
            next_preview = self._previews.next_due()
            wait_ms = max(0, int(1000 * (min(next_heartbeat, next_status, next_held, next_preview, now + 0.2) - now)))
            events = dict(poller.poll(wait_ms))
            if sub in events:
                batch = []
                for _ in range(cfg.drain_max_messages):
                    try:
                        batch.append(sub.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                self.handle(batch)
            if results in events:
                self._forward(results, pub)
            if pub in events:
                self._welcome(pub)

    # -- ingest path ------------------------------------------------------------------------
    def handle(self, batch: list[list]) -> None:
        """Decode, record, then assemble a batch of received messages; failures are counted drops.

        Decoding has no side effects, so recording the whole batch before routing any of it keeps
        the rule that nothing acts on a message before it is on disk, at one write per scan.
        """
        received = time.perf_counter()
        self.counters["received"] += len(batch)
        valid: list[tuple[ScanStart | Line | ScanEnd, list]] = []
        for frames in batch:
            try:
                msg = self.decoder.decode(frames)
            except ProtocolError as exc:
                self.drops.drop(exc.reason, exc.detail)
                continue
            if isinstance(msg, (Line, ScanStart, ScanEnd)):
                valid.append((msg, frames))
            elif isinstance(msg, Heartbeat):
                self.counters["heartbeats_in"] += 1
                self.instrument_seen[msg.source] = time.time()
            else:
                self.drops.drop("unexpected_type", f"{msg.type} on the instrument input")
        self._record(valid)
        for msg, _ in valid:
            try:
                if isinstance(msg, Line):
                    self._on_line(msg, received)
                elif isinstance(msg, ScanStart):
                    self._on_scan_start(msg)
                else:
                    self._finish_scan(self.assembler.end(msg))
            except AssemblyError as exc:
                self.drops.drop(exc.reason, str(exc))

    def _record(self, valid: list[tuple[ScanStart | Line | ScanEnd, list]]) -> None:
        if self.recorder is None or not valid:
            return
        try:
            self.recorder.record([(msg.uid, frames) for msg, frames in valid], time.time())
            self.counters["recorded"] += len(valid)
            if self.record_error is not None:
                log.warning("recording works again after %d failed writes", self.counters["record_errors"])
                self.record_error = None
        except OSError as exc:
            self.counters["record_errors"] += 1
            if self.record_error is None or self.counters["record_errors"] % 1000 == 1:
                log.error("recording failed (%d so far): %s", self.counters["record_errors"], exc)
            self.record_error = str(exc)

    def _on_scan_start(self, msg: ScanStart) -> None:
        state, evicted = self.assembler.start(msg)
        self.counters["scans_started"] += 1
        self._last_channels = tuple(c.name for c in msg.channels)
        log.info("scan %s started: %s, %dx%d px, %.3gx%.3g nm, plan %s, %s", msg.uid, msg.instrument,
                 msg.rows, msg.cols, *msg.size_nm, msg.plan, "/".join(c.name for c in msg.channels))
        if evicted is not None:
            log.warning("too many open scans: closing %s as aborted", evicted.uid)
            self._finish_scan(evicted)
        if self.tip is not None:
            self.tip.scan_started(state)

    def _on_line(self, msg: Line, received: float) -> None:
        state, frames = self.assembler.add_line(msg, received)
        self.counters["lines"] += 1
        if self.tip is not None:
            self.tip.line(state, msg)
        every = self.settings.daemon.reconstruct_every_lines
        if every and frames.lines_since_publish >= every:
            due = frames.last_submit + self._min_submit_interval
            if received >= due:
                self._submit_progressive(state, msg.direction, frames, received)
            else:
                self._held[(state.uid, msg.direction)] = due

    def _submit_progressive(self, state: ScanState, direction: str, frames: DirectionFrames, now: float) -> None:
        frames.last_submit = now
        self._held.pop((state.uid, direction), None)
        self.scheduler.submit_scan(state, direction, frames, final=False)

    def _submit_held(self) -> float:
        """Submit the progressive frames the rate limit held back once it allows (a scan that
        pauses still shows its newest lines); returns when the next held one is due (monotonic)."""
        now = time.perf_counter()
        for (uid, direction), due in list(self._held.items()):
            state = self.assembler.scans.get(uid)
            if state is None:
                del self._held[(uid, direction)]
            elif now >= due:
                self._submit_progressive(state, direction, state.directions[direction], now)
        if not self._held:
            return float("inf")
        return time.monotonic() + max(0.0, min(self._held.values()) - now)

    def _finish_scan(self, state: ScanState) -> None:
        for direction, frames in state.directions.items():
            self._held.pop((state.uid, direction), None)
            if frames.rows_seen.any():
                self.scheduler.submit_scan(state, direction, frames, final=True)
                self._submit_localization(state, direction, frames)
        self.counters["scans_completed" if state.end_reason == "complete" else "scans_aborted"] += 1
        self.counters["out_of_order"] += state.out_of_order
        self.counters["missing_lines"] += state.missing
        log.info("scan %s ended (%s): %d lines", state.uid, state.end_reason, state.lines)
        if self.tip is not None:
            self.tip.scan_ended(state.uid)
        if self.recorder is not None:
            self.recorder.close_scan(state.uid)
            if self.exporter is not None:
                self.exporter.submit(self.recorder.journal_path(state.uid), state.end_reason or "aborted")

    def _submit_localization(self, state: ScanState, direction: str, frames: DirectionFrames) -> None:
        if self.localize is None:
            return
        mask = frames.measured.copy()
        for info, image in zip(state.start.channels, frames.images):
            if self.localize.wants(info.name, direction):
                self.localize.submit(LocalizeJob(state.uid, info.name, direction, state.start.size_nm, image.copy(),
                                                 mask, time.perf_counter(), state.start.t))

    # -- output path ------------------------------------------------------------------------
    def _send_from_worker(self, msg: Message) -> None:
        """Called on a worker thread (reconstruction, tip monitor); each has its own socket.

        The arrays are copied into ZeroMQ's own buffers (about 20 microseconds for a 256x256 frame,
        as long as a send without copying takes here): sent without copying, every array would be
        released through pyzmq's garbage-collector thread, which takes the GIL from ingest and
        reconstruction each time (docs/performance.md: in one 5-round comparison the latency tail
        was wider that way; this machine's run-to-run noise is large)."""
        sock = getattr(self._worker_sockets, "socket", None)
        if sock is None:
            sock = self._worker_sockets.socket = self.context.socket(zmq.PUSH)
            sock.connect(self._results_endpoint)
            self._all_worker_sockets.append(sock)
        sock.send_multipart(encode(msg), copy=True)

    def _forward(self, results: zmq.Socket, pub: zmq.Socket) -> None:
        while True:
            try:
                self._send(pub, results.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                return

    def _welcome(self, pub: zmq.Socket) -> None:
        """A subscriber joined: publish again the newest final frames its topic covers."""
        while True:
            try:
                event = pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if event[:1] != b"\x01":
                continue
            prefix = event[1:].decode("ascii", "replace")
            for (direction, channel, _), frames in list(self._last_finals.items()):
                for name in (frame_topic(True, direction, channel), preview_topic(direction, channel)):
                    if name.startswith(prefix):
                        self._emit(pub, [name.encode(), *frames[1:]])

    def _publish(self, pub: zmq.Socket, msg: Heartbeat | Status) -> None:
        self._send(pub, encode(msg))

    def _send(self, pub: zmq.Socket, frames: list) -> None:
        """Publish a message; a frame goes out again on its `view:` topic when the pacer lets it
        and is remembered for the last-value cache if final."""
        topic = self._emit(pub, frames)
        if not topic.startswith("frame:"):
            return
        _, lifetime, direction, channel, _ = topic.split(":")
        header = frames[1].bytes if isinstance(frames[1], zmq.Frame) else frames[1]
        key = (direction, channel, msgpack.unpackb(header)["kind"])
        if lifetime == "final":
            self._last_finals[key] = frames
        preview = self._previews.offer(key, [preview_topic(direction, channel).encode(), *frames[1:]],
                                       time.monotonic())
        if preview is not None:
            self._emit(pub, preview)

    def _emit(self, pub: zmq.Socket, frames: list) -> str:
        """Every output message goes through here, counted per topic: a subscriber compares the
        counts in `status` with what it received to learn how many of its messages ZeroMQ dropped."""
        topic = bytes(frames[0].buffer if isinstance(frames[0], zmq.Frame) else frames[0]).decode("ascii")
        self.published[topic] = self.published.get(topic, 0) + 1
        pub.send_multipart(frames, copy=False)
        return topic

    def status(self) -> Status:
        if self.state in ("idle", "acquiring"):
            self.state = "acquiring" if self.assembler.scans else "idle"
        counters = dict(self.counters)
        counters.update(self.scheduler.all_counters())
        if self.tip is not None:
            counters.update(self.tip.all_counters())
        if self.localize is not None:
            counters.update(self.localize.counters)
        if self.crop_requests is not None:
            counters.update(self.crop_requests.counters)
        counters["dropped"] = sum(self.drops.counts.values())
        counters.update({f"published_{topic}": count for topic, count in self.published.items()})
        latency = {k: v for k, v in self.scheduler.latency.summary().items() if k != "n"}
        if self.record_error:
            counters["record_error_active"] = 1
        now = time.time()
        heartbeat_age = {source: round(now - seen, 3) for source, seen in self.instrument_seen.items()}
        channels = tuple(dict.fromkeys(c.name for scan in self.assembler.scans.values()
                                       for c in scan.start.channels)) or self._last_channels
        return Status(SOURCE, self.state, self.scheduler.method, counters, dict(self.drops.counts),
                      latency, tuple(self.assembler.scans), channels, heartbeat_age, now)

    def _publish_status(self, pub: zmq.Socket) -> None:
        self._publish(pub, self.status())
