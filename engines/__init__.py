"""Reconstruction engines: everything that turns a sparsely measured frame into a full one.

All engines implement `Reconstructor` (engines.base); the daemon only talks to that interface.
"""

from stm_live.engines.base import Reconstruction, Reconstructor, reconstruct_exact
from stm_live.engines.chain import EngineChain
from stm_live.engines.registry import ENGINES, LEARNED_ENGINES, create_chain, create_engine

__all__ = ["ENGINES", "EngineChain", "LEARNED_ENGINES", "Reconstruction", "Reconstructor", "create_chain", "create_engine",
           "reconstruct_exact"]
