"""Shipped weights: safetensors (no pickle) plus a JSON descriptor beside them."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from stm_live.models.architecture import INPUTS, SIZE_MULTIPLE, MaskedUNet

DEFAULT_WEIGHTS = Path(__file__).with_name("weights") / "masked_unet.safetensors"


def save_weights(model: MaskedUNet, path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    descriptor = {"architecture": "MaskedUNet", "size_multiple": SIZE_MULTIPLE, "inputs": list(INPUTS),
                  "outputs": ["mean", "log_variance"], "half_precision_safe": False, **meta}
    path.with_suffix(".json").write_text(json.dumps(descriptor, indent=2) + "\n")


def load_model(path: Path = DEFAULT_WEIGHTS) -> tuple[MaskedUNet, dict]:
    """The network with its weights, in eval mode, and its descriptor."""
    descriptor = json.loads(path.with_suffix(".json").read_text())
    model = MaskedUNet(descriptor["width"])
    model.load_state_dict(load_file(str(path)))
    model.eval()
    return model, descriptor
