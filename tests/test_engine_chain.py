"""The engine chain on its own: deadlines, fallbacks, and an engine coming back after a hang."""

import threading

import numpy as np
import pytest

from stm_live.engines import EngineChain, Reconstruction, Reconstructor
from stm_live.engines.base import EngineError
from stm_live.engines.classical import ClassicalReconstructor


class Scripted(Reconstructor):
    """Answers with a constant, raises, or blocks until released, as the test says."""

    def __init__(self, name: str, value: float = 1.0) -> None:
        self.name, self.value = name, value
        self.mode = "answer"
        self.release = threading.Event()
        self.calls = 0

    def reconstruct(self, measured, mask):
        self.calls += 1
        if self.mode == "raise":
            raise RuntimeError("boom")
        if self.mode == "hang":
            self.release.wait()
        if self.mode == "bad-shape":
            return Reconstruction(np.zeros((1, 2, 2)))
        return Reconstruction(np.full(measured.shape, self.value))


def batch(n=2, size=8):
    measured = np.arange(n * size * size, dtype=np.float32).reshape(n, size, size)
    mask = np.zeros(measured.shape, bool)
    mask[:, ::2] = True
    return measured, mask


@pytest.fixture
def chain():
    first, second = Scripted("first", 1.0), Scripted("second", 2.0)
    c = EngineChain([first, second], timeout_s=0.1)
    yield c, first, second
    first.release.set()
    c.close()


def test_the_first_engine_answers_and_measured_pixels_stay(chain):
    c, first, second = chain
    measured, mask = batch()
    result = c.reconstruct(measured, mask)
    assert result.method == "first" and second.calls == 0
    assert np.array_equal(result.images[mask], measured[mask]) and (result.images[~mask] == 1.0).all()
    assert c.counters == {"engine_errors": 0, "engine_timeouts": 0, "engine_fallbacks": 0, "engines_hung": 0}


@pytest.mark.parametrize("mode", ["raise", "bad-shape"])
def test_an_engine_that_fails_passes_the_batch_on(chain, mode):
    c, first, second = chain
    first.mode = mode
    measured, mask = batch()
    result = c.reconstruct(measured, mask)
    assert result.method == "second" and (result.images[~mask] == 2.0).all()
    assert np.array_equal(result.images[mask], measured[mask])
    assert c.counters["engine_errors"] == 1 and c.counters["engine_fallbacks"] == 1


def test_a_hung_engine_is_skipped_until_it_answers(chain):
    c, first, second = chain
    first.mode = "hang"
    measured, mask = batch()
    assert c.reconstruct(measured, mask).method == "second"
    assert c.counters["engine_timeouts"] == 1 and c.counters["engines_hung"] == 1
    assert c.reconstruct(measured, mask).method == "second"
    assert first.calls == 1 and c.counters["engine_timeouts"] == 1, "a hung engine is not called again"
    first.mode = "answer"
    first.release.set()
    for _ in range(100):
        if c.reconstruct(measured, mask).method == "first":
            break
        threading.Event().wait(0.02)
    assert first.calls == 2 and c.counters["engines_hung"] == 0


def test_when_every_engine_fails_the_caller_is_told(chain):
    c, first, second = chain
    first.mode = second.mode = "raise"
    with pytest.raises(EngineError, match="every engine failed: first: RuntimeError: boom; second"):
        c.reconstruct(*batch())


def test_the_deadline_scales_with_the_batch():
    slow = Scripted("slow")
    slow.mode = "hang"
    c = EngineChain([slow, ClassicalReconstructor()], timeout_s=0.05)
    try:
        timer = threading.Timer(0.15, slow.release.set)
        timer.start()
        result = c.reconstruct(*batch(n=4))
        timer.join()
        assert result.method == "slow", "0.15 s is inside 4 frames x 0.05 s"
    finally:
        slow.release.set()
        c.close()


def test_a_chain_needs_engines_and_a_positive_deadline():
    with pytest.raises(ValueError):
        EngineChain([], 1.0)
    with pytest.raises(ValueError):
        EngineChain([ClassicalReconstructor()], 0)
