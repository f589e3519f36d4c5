"""Engine names accepted in config (`daemon.engine`) and how each is built.

`classical` is the default (docs/models.md says why: the shipped model does not yet beat it);
`model` is the learned MaskedUNet: if PyTorch or its weights cannot be loaded the daemon says
why in its log and falls back to `classical`, so reconstruction never stops. `create_chain`
puts the configured engine in front of its fallback (engines.chain) for the daemon.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from stm_live.engines.base import EngineError, Reconstructor
from stm_live.engines.chain import EngineChain
from stm_live.engines.classical import ClassicalReconstructor
from stm_live.engines.runners import RunnerOptions

log = logging.getLogger(__name__)


def _model(options: RunnerOptions, backend: str) -> Reconstructor:
    from stm_live.engines.torch_model import ModelReconstructor

    return ModelReconstructor(backend=backend, options=options)


LEARNED_ENGINES = ("model",)
ENGINES: dict[str, Callable[[RunnerOptions, str], Reconstructor]] = {
    "model": _model,
    "classical": lambda options, backend: ClassicalReconstructor(),
    "linear": lambda options, backend: ClassicalReconstructor("linear"),
    "biharmonic": lambda options, backend: ClassicalReconstructor("biharmonic"),
}


def create_engine(name: str, threads: int | None = None, backend: str = "auto",
                  options: RunnerOptions | None = None) -> Reconstructor | None:
    """Build the named engine; `threads`, `backend` and `options` (which override `threads`)
    apply to the learned one. 'none' = raw frames only."""
    if name == "none":
        return None
    try:
        factory = ENGINES[name]
    except KeyError:
        raise EngineError(f"unknown engine {name!r}; available: none, {', '.join(ENGINES)}") from None
    try:
        return factory(options or RunnerOptions(threads=threads), backend)
    except Exception as exc:
        if name == "classical":
            raise
        log.error("engine %s failed to load (%s: %s); falling back to classical", name, type(exc).__name__, exc)
        return ClassicalReconstructor()


def create_chain(name: str, fallback: str, timeout_s: float, threads: int | None = None,
                 backend: str = "auto", options: RunnerOptions | None = None) -> EngineChain | None:
    """The daemon's engines: `name`, then `fallback` when `name` raises or exceeds `timeout_s` per
    frame. None when `name` is 'none'; a fallback of 'none' (or equal to `name`) adds nothing."""
    first = create_engine(name, threads, backend, options)
    if first is None:
        return None
    engines = [first]
    if fallback not in ("none", name):
        engines.append(create_engine(fallback, threads, backend, options))
    return EngineChain(engines, timeout_s)
