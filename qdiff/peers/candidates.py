"""The peer quantizers as evaluation-harness candidates (issue 15: the peers through the harness).

The peer tools measure ModelOpt's and ONNX Runtime's graphs on 8 images on a CPU; ranking them
against qdiff needs the harness's n and intervals. ModelOpt quantizes the PyTorch UNet, so its
calibrated module (the function its Q/DQ graph computes) runs in the harness on the GPU like
qdiff's fake-quant model; ONNX Runtime's quantizer exists only as a graph, which
`qdiff.eval_harness.onnx_graph_candidate` runs. Both see the calibration calls qdiff's own
calibration observes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from qdiff.calib.recipe import Recipe, load_recipe
from qdiff.eval_harness import Candidate
from qdiff.peers.modelopt_int8 import ModelOptInt8Settings, check_w8a8, modelopt_quantized_unet, resolve_device


def modelopt_candidate(
    label: str,
    model,
    recipe: str | Recipe = "w8a8",
    *,
    settings: ModelOptInt8Settings | dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    calibration_inputs: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    meta: dict | None = None,
    **recipe_overrides: Any,
) -> Candidate:
    """ModelOpt's INT8 recipe (`qdiff.peers.modelopt_int8`), calibrated on `device` when the harness
    asks for the candidate, on the same calls `quantize_with_modelopt` would use (pass
    `calibration_inputs` to share them between variants)."""
    from qdiff.core.conditioning import resolve_conditioning
    from qdiff.models import as_bundle

    recipe = load_recipe(recipe, **recipe_overrides)
    check_w8a8(recipe)  # here, not when the harness reaches the candidate
    dev = resolve_device(device)
    bundle = as_bundle(model)
    settings = ModelOptInt8Settings.coerce(settings)

    def make(unet: torch.nn.Module) -> torch.nn.Module:
        conditioning = resolve_conditioning(bundle, recipe.samples_per_timestep, seed=recipe.seed)
        quantized, _, _ = modelopt_quantized_unet(bundle, recipe, settings, dev, conditioning=conditioning, calibration_inputs=calibration_inputs, unet=unet)
        return quantized

    return Candidate(label, make, {"kind": "modelopt-int8", "modelopt": settings.to_json(), "recipe": recipe.name, **(meta or {})})


def modelopt_int8_layers(unet: torch.nn.Module, table_layers: Sequence[str], settings: ModelOptInt8Settings | dict[str, Any] | None = None) -> list[str]:
    """The table's layers that ModelOpt's recipe quantizes too, read off the recipe's own
    `mtq.quantize` config for this UNet (`modelopt_config`: Conv2d and Linear only, its filter
    keeping conv_in/conv_out, the residual shortcuts and the timestep MLPs float, quant level's
    Linear rule): qdiff's table placed on ModelOpt's INT8 layers (`fake_quant_candidate(...,
    layers=)`), the two quantizers compared on equal layers."""
    from qdiff.peers.modelopt_int8 import modelopt_config

    config, _ = modelopt_config(unet, ModelOptInt8Settings.coerce(settings), total_step=1)
    theirs = {key[: -len(".weight_quantizer")] for key in config["quant_cfg"] if key.endswith(".weight_quantizer")}
    return [name for name in table_layers if name in theirs]
