"""The PyTorch fake-quant reference: the same function the Q/DQ ONNX graph computes.

Built from a calibration table, it replaces every quantized layer's forward with
"fake-quantize the input per tensor, fake-quantize the weight per output channel, then run the
float op". Tests hold this model and the Q/DQ graph under ONNX Runtime together at tight
tolerance, which is how we know the graph pass put the right scales on the right tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

import numpy as np

from qdiff.calib.quant_math import INT8_MAX, fake_quantize, scale_from_amax, scale_in_dtype
from qdiff.calib.recipe import Recipe
from qdiff.calib.table import CalibrationTable
from qdiff.calib.targets import select_targets
from qdiff.core.errors import CalibrationError


class FakeQuantLayer(nn.Module):
    """Wraps one Conv/Linear layer with input and weight fake quantization."""

    def __init__(self, layer: nn.Module, input_scale: float, weight_scale: torch.Tensor, weight_axis: int, weight_qmax: int, *, quantize_input: bool = True, quantize_weight: bool = True, input_qmax: int = INT8_MAX):
        super().__init__()
        self.layer = layer
        self.quantize_input = quantize_input  # False/False sides: the decomposition rows (`only=`)
        self.quantize_weight = quantize_weight
        self.input_qmax = input_qmax  # 127; 7 for the simulated-only A4 recipes
        self.register_buffer("input_scale", torch.tensor(input_scale, dtype=torch.float32))
        self.register_buffer("weight_scale", weight_scale.float())
        self.weight_axis = weight_axis
        self.weight_qmax = weight_qmax

    def quantized_weight(self) -> torch.Tensor:
        if not self.quantize_weight:
            return self.layer.weight
        return fake_quantize(self.layer.weight, self.weight_scale, axis=self.weight_axis, qmax=self.weight_qmax)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.quantize_input:
            x = fake_quantize(x, self.input_scale, qmax=self.input_qmax)
        weight = self.quantized_weight()
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, layer.bias)
        if isinstance(layer, nn.ConvTranspose2d):
            output_padding = layer._output_padding(x, kwargs.get("output_size"), layer.stride, layer.padding, layer.kernel_size, 2, layer.dilation)
            return F.conv_transpose2d(x, weight, layer.bias, layer.stride, layer.padding, output_padding, layer.groups, layer.dilation)
        return layer._conv_forward(x, weight, layer.bias)


class SplitShortcutFakeQuant(nn.Module):
    """A Conv2d whose input is cat([a, b], dim=1), quantized per branch (Q-Diffusion's split):
    conv(fq(a, s_a), fq(W[:, :C_a])) + conv(fq(b, s_b), fq(W[:, C_a:])) + bias.

    The same function the split-shortcut ONNX rewrite computes (two Convs, bias on the first,
    then Add). A split resnet `conv1` (recipe `split_conv1`) uses it too: its input is
    silu(norm1(cat(a, b))), split at the same channel (the export slices it)."""

    def __init__(self, layer: nn.Conv2d, split_channels: int, input_scales: tuple[float, float], weight_scales: tuple[torch.Tensor, torch.Tensor], weight_qmax: int, *, quantize_input: bool = True, quantize_weight: bool = True, input_qmax: int = INT8_MAX):
        super().__init__()
        self.quantize_input = quantize_input
        self.quantize_weight = quantize_weight
        self.input_qmax = input_qmax  # 127; 7 for the simulated-only A4 recipes
        if not isinstance(layer, nn.Conv2d) or layer.groups != 1:
            raise CalibrationError(f"split-shortcut needs an ungrouped Conv2d, got {layer!r}")
        self.layer = layer
        self.split_channels = split_channels
        self.register_buffer("input_scale_a", torch.tensor(input_scales[0], dtype=torch.float32))
        self.register_buffer("input_scale_b", torch.tensor(input_scales[1], dtype=torch.float32))
        self.register_buffer("weight_scale_a", weight_scales[0].float())
        self.register_buffer("weight_scale_b", weight_scales[1].float())
        self.weight_qmax = weight_qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.split_channels
        layer = self.layer
        xa, xb, wa, wb = x[:, :c], x[:, c:], layer.weight[:, :c], layer.weight[:, c:]
        if self.quantize_input:
            xa, xb = fake_quantize(xa, self.input_scale_a, qmax=self.input_qmax), fake_quantize(xb, self.input_scale_b, qmax=self.input_qmax)
        if self.quantize_weight:
            wa = fake_quantize(wa, self.weight_scale_a, axis=0, qmax=self.weight_qmax)
            wb = fake_quantize(wb, self.weight_scale_b, axis=0, qmax=self.weight_qmax)
        return layer._conv_forward(xa, wa, layer.bias) + layer._conv_forward(xb, wb, None)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _use_reconstructed(target, weights, split_channels: int | None) -> None:
    """Put the reconstructed integers x scales into the (copied) layer's weight, so the wrappers'
    rounding gives back exactly those integers (the weight scales are the same, see
    `calib.reconstruct.artifact`)."""
    lw = weights.layer(target.name)
    weight = target.module.weight
    with torch.no_grad():
        if split_channels is not None:
            if not lw.split:
                raise CalibrationError(f"layer {target.name!r} is split in the table but not in {weights.source}", hint="reconstruct with the table you quantize with")
            parts = ((slice(0, split_channels), "_a"), (slice(split_channels, None), "_b"))
        else:
            parts = ((slice(None), ""),)
        for sl, role in parts:
            if role not in lw.parts:
                raise CalibrationError(f"layer {target.name!r}: {weights.source} has no weight{role or ' (unsplit)'}; it has {sorted(lw.parts)}", hint="reconstruct with the table and split settings you quantize with")
            values = torch.from_numpy(weights.dequantized(target.name, role, target.weight_axis))
            if tuple(weight[:, sl].shape) != tuple(values.shape):
                raise CalibrationError(f"layer {target.name!r}: reconstructed weight{role} has shape {tuple(values.shape)}, the model's is {tuple(weight[:, sl].shape)}", hint="the reconstruction is for another model")
            weight[:, sl] = values.to(weight.dtype)


def build_fake_quant_model(
    model: nn.Module,
    table: CalibrationTable,
    recipe: Recipe | None = None,
    dtype: torch.dtype = torch.float32,
    weights=None,
    only: str | None = None,
    layers: Collection[str] | None = None,
) -> nn.Module:
    """A deep copy of `model` with every layer the table quantizes wrapped in `FakeQuantLayer`.

    `dtype=torch.float16` is the reference of the FP16 Q/DQ graph: the model in FP16 (run it
    on the CPU in float16; torch has CPU kernels for every UNet op), scales rounded to FP16 as
    the graph stores them (`scale_in_dtype`), quantize/dequantize in float32 with the result
    rounded to FP16, as ONNX Runtime computes FP16 Q/DQ.

    `weights` (a `calib.reconstruct.artifact.ReconstructedWeights`) replaces round-to-nearest
    by the reconstructed integers, as `export.qdq.insert_qdq(..., weights=)` does in the graph.

    `only="weights"` or `only="activations"` quantizes one side and leaves the other in float
    (no Q/DQ graph computes that; it is the evaluation's decomposition of the error by side).

    `layers` quantizes only those of the table's layers and leaves every other one in float
    (what a per-layer-group sensitivity measures, `calib.sensitivity`); a name the table does
    not have is an error, so a mistyped group cannot silently measure nothing.
    """
    if only not in (None, "weights", "activations"):
        raise CalibrationError(f"only={only!r}: expected None, 'weights' or 'activations'")
    sides = {"quantize_input": only != "weights", "quantize_weight": only != "activations"}
    recipe = recipe or Recipe.from_json(table.recipe)
    quantized = copy.deepcopy(model).eval()
    if dtype != torch.float32:
        quantized = quantized.to(dtype)
    np_dtype = np.float16 if dtype == torch.float16 else np.float32

    def scale_of(amax, qmax) -> np.ndarray:  # the shared rule, then the graph's storage type
        return scale_in_dtype(scale_from_amax(amax, qmax), np_dtype)

    targets, _ = select_targets(quantized, recipe)
    if layers is not None:
        unknown = sorted(set(layers) - set(table.layers))
        if unknown:
            raise CalibrationError(f"cannot quantize {len(unknown)} layer(s) the table has no ranges for: {unknown[:5]}", hint="calibrate them (check the recipe's exclude)")
        layers = set(layers)
    split = table.split_layers(recipe.split_shortcut, recipe.split_conv1)
    for target in targets:
        if layers is not None and target.name not in layers:
            continue
        ranges = table.layers.get(target.name)
        if ranges is None:
            continue  # the layer never ran during calibration (and so is not in the export either)
        if ranges.input is None or ranges.weight is None:
            raise CalibrationError(f"layer {target.name!r} has no input or weight range in the table")
        if weights is not None:
            _use_reconstructed(target, weights, ranges.split_channels if target.name in split else None)
        if target.name in split:
            wrapper = SplitShortcutFakeQuant(
                target.module,
                ranges.split_channels,
                (float(scale_of(ranges.shortcut_a, recipe.activation_qmax)), float(scale_of(ranges.shortcut_b, recipe.activation_qmax))),
                (torch.from_numpy(scale_of(ranges.weight_a, recipe.weight_qmax)), torch.from_numpy(scale_of(ranges.weight_b, recipe.weight_qmax))),
                recipe.weight_qmax,
                input_qmax=recipe.activation_qmax,
                **sides,
            )
            _set_submodule(quantized, target.name, wrapper)
            continue
        input_scale = float(scale_of(ranges.input, recipe.activation_qmax))
        weight_scale = torch.from_numpy(scale_of(ranges.weight, recipe.weight_qmax))
        wrapper = FakeQuantLayer(target.module, input_scale, weight_scale, target.weight_axis, recipe.weight_qmax, input_qmax=recipe.activation_qmax, **sides)
        _set_submodule(quantized, target.name, wrapper)
    return quantized
