"""Engine names accepted in config (`daemon.engine`) and how each is built."""

from __future__ import annotations

from collections.abc import Callable

from stm_live.engines.base import EngineError, Reconstructor
from stm_live.engines.classical import ClassicalReconstructor

ENGINES: dict[str, Callable[[], Reconstructor]] = {
    "classical": ClassicalReconstructor,
}


def create_engine(name: str) -> Reconstructor | None:
    """Build the named engine; 'none' means raw frames only."""
    if name == "none":
        return None
    try:
        factory = ENGINES[name]
    except KeyError:
        raise EngineError(f"unknown engine {name!r}; available: none, {', '.join(ENGINES)}") from None
    return factory()
