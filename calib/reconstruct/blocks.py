"""BRECQ's reconstruction units for diffusers UNets, in the order the forward pass runs them.

A unit is reconstructed as a whole, so rounding decisions inside it can compensate each other
(BRECQ; Q-Diffusion's `quant_block.py` uses the same units): a `ResnetBlock2D`, an `Attention`
block, a `BasicTransformerBlock` (attn1 + attn2 + feed-forward). A quantized layer outside any
of them (time embedding, down/up samplers, a Transformer2DModel's proj_in/proj_out) is a unit
alone. Units are ordered by their first call in one forward pass, which is the order in which
"the already-quantized prefix" of the network grows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qdiff.calib.hooks import forward_with_hooks
from qdiff.core.errors import CalibrationError

BLOCK_CLASSES = ("ResnetBlock2D", "Attention", "BasicTransformerBlock")


@dataclass(frozen=True)
class Unit:
    name: str  # module name of the block (or of the lone layer)
    kind: str  # block class name, or "layer"
    layers: tuple[str, ...]  # the quantized layers inside, by module name


def _is_block(module: nn.Module) -> bool:
    return type(module).__name__ in BLOCK_CLASSES


def find_units(model: nn.Module, layer_names: list[str], example: dict[str, Any]) -> list[Unit]:
    """Units covering every name in `layer_names`, in execution order (one forward of `example`)."""
    blocks: dict[str, str] = {}
    for name, module in model.named_modules():
        if _is_block(module) and not any(name.startswith(outer + ".") for outer in blocks):
            blocks[name] = type(module).__name__
    members: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    for layer in layer_names:
        owner = next((b for b in blocks if layer.startswith(b + ".")), None)
        unit = owner if owner is not None else layer
        members.setdefault(unit, []).append(layer)
        kinds[unit] = blocks[owner] if owner is not None else "layer"
    order: list[str] = []
    handles = []
    for name in members:
        module = model.get_submodule(name)

        def hook(_m: nn.Module, _args: tuple, name: str = name) -> None:
            if name not in order:
                order.append(name)

        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        forward_with_hooks(model, example, handles)
    never = sorted(set(members) - set(order))
    if never:
        raise CalibrationError(f"reconstruction units never ran in a forward pass: {', '.join(never[:5])}", hint="they are not on the forward path; exclude them in the recipe")
    return [Unit(name, kinds[name], tuple(members[name])) for name in order]
