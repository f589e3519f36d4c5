"""An engine chain: each call has a deadline, and an engine that raises or hangs hands the batch on.

The daemon must publish every frame even when a GPU runtime crashes or wedges. Each engine in the
chain runs on its own thread; a call that raises, returns something unusable, or outlives its
deadline passes the same batch to the next engine (normally `classical`). A Python thread cannot
be killed, so a hung call is left to finish on its thread; until it does, that engine is skipped,
and once it answers it is used again. Only when every engine fails does the caller get an
EngineError (and publishes the raw frames alone).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from stm_live.engines.base import EngineError, Reconstruction, Reconstructor, reconstruct_exact

log = logging.getLogger(__name__)


class _EngineThread:
    """One engine behind a call queue, so a caller can stop waiting without stopping the engine."""

    def __init__(self, engine: Reconstructor) -> None:
        self.engine = engine
        self.pending: Future | None = None
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"stm-live-engine-{engine.name}", daemon=True)
        self._thread.start()

    @property
    def hung(self) -> bool:
        return self.pending is not None and not self.pending.done()

    def submit(self, measured: np.ndarray, mask: np.ndarray) -> Future:
        future: Future = Future()
        self.pending = future
        self._calls.put((future, measured, mask, time.perf_counter()))
        return future

    def close(self) -> None:
        self._calls.put(None)

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, measured, mask, submitted = call
            try:
                future.set_result(reconstruct_exact(self.engine, measured, mask))
            except BaseException as exc:
                future.set_exception(exc)
            if getattr(future, "timed_out", False):
                log.warning("engine %s answered after %.1f s; using it again",
                            self.engine.name, time.perf_counter() - submitted)


class EngineChain(Reconstructor):
    """The configured engine first, then its fallbacks; `timeout_s` is the deadline per frame."""

    def __init__(self, engines: Sequence[Reconstructor], timeout_s: float) -> None:
        if not engines:
            raise ValueError("an engine chain needs at least one engine")
        if timeout_s <= 0:
            raise ValueError(f"engine timeout must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.name = engines[0].name
        self.counters = {"engine_errors": 0, "engine_timeouts": 0, "engine_fallbacks": 0, "engines_hung": 0}
        self._threads = [_EngineThread(engine) for engine in engines]

    @property
    def backend(self) -> str:
        """Where the first engine runs (a learned engine's runner, e.g. torch-cuda); '' if it does not say."""
        return getattr(self._threads[0].engine, "backend", "")

    @property
    def hung(self) -> list[str]:
        """Engines still busy with a call that timed out."""
        return [t.engine.name for t in self._threads if t.hung]

    def reconstruct(self, measured: np.ndarray, mask: np.ndarray) -> Reconstruction:
        """Measured pixels come back untouched; `method` names the engine that answered."""
        deadline = self.timeout_s * max(1, len(measured))
        failures = []
        for position, worker in enumerate(self._threads):
            name = worker.engine.name
            if worker.hung:
                failures.append(f"{name}: still busy with a call that timed out")
                continue
            future = worker.submit(measured, mask)
            try:
                result = future.result(deadline)
            except FutureTimeout:
                future.timed_out = True
                self.counters["engine_timeouts"] += 1
                log.error("engine %s gave no answer in %.1f s for %d frame(s); passing them on",
                          name, deadline, len(measured))
                failures.append(f"{name}: no answer in {deadline:.1f} s")
                continue
            except Exception as exc:
                self.counters["engine_errors"] += 1
                log.error("engine %s failed on %d frame(s) (%s: %s); passing them on",
                          name, len(measured), type(exc).__name__, exc)
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            finally:
                self.counters["engines_hung"] = len(self.hung)
            if position:
                self.counters["engine_fallbacks"] += 1
            return result
        raise EngineError("every engine failed: " + "; ".join(failures))

    def close(self) -> None:
        for worker in self._threads:
            worker.close()
