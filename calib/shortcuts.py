"""Which layers see a skip concat, and where the concat splits: the split-shortcut targets.

In a UNet decoder every up-block resnet gets `torch.cat([hidden_states, res_hidden_states],
dim=1)`; its `conv_shortcut` (a Conv2d, present because in and out channels differ) sees that
raw concat. The two halves have very different ranges (a deep feature map and a shallow skip),
so Q-Diffusion quantizes them separately: conv(cat(a, b), W) = conv(a, W[:, :Ca]) +
conv(b, W[:, Ca:]).

The split point is found by observation, not from block arithmetic: one forward pass with a
pre-hook on every block that takes `res_hidden_states_tuple` (diffusers' up blocks) records
the skip tensors it receives, and a pre-hook on each of its resnets' `conv_shortcut` checks
that the tensor it sees ends, along channels, with exactly one of those skip tensors. Only
then is the layer split, at `in_channels - skip_channels`. Anything else (FreeU rescaling the
skip, a resnet that up/down-samples its input, grouped convs) stays an ordinary layer.

The same resnet's `conv1` sees the concat too, but after `norm1` and the nonlinearity
(GroupNorm and SiLU keep the channel order), so its input splits at the same channel. With
`conv1=True` it is a split target as well, found the same way: a pre-hook on the resnet checks
that its input ends with a skip tensor, and one on `conv1` that what it sees is exactly
`nonlinearity(norm1(input))` with the same channel count. The export then splits it with Slice
nodes instead of reading the Concat (`export.split_shortcut.split_sliced_conv`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from qdiff.calib.hooks import forward_with_hooks

SKIP_ARG = "res_hidden_states_tuple"


def _takes_skips(module: nn.Module) -> bool:
    try:
        return SKIP_ARG in inspect.signature(module.forward).parameters and isinstance(getattr(module, "resnets", None), nn.ModuleList)
    except (TypeError, ValueError):
        return False


def find_split_shortcuts(model: nn.Module, example: dict[str, Any]) -> dict[str, int]:
    """{conv_shortcut module name: channels of the first concat branch}, from one forward pass."""
    return find_split_layers(model, example)[0]


def find_split_layers(model: nn.Module, example: dict[str, Any], conv1: bool = False) -> tuple[dict[str, int], dict[str, int]]:
    """({conv_shortcut name: split}, {conv1 name: split}) from one forward pass; the second is
    empty unless `conv1`. A split is the channel count of the first concat branch."""
    found: dict[str, int] = {}
    found_conv1: dict[str, int] = {}
    handles = []
    for block_name, block in model.named_modules():
        if not _takes_skips(block):
            continue
        state: dict[str, tuple] = {"skips": ()}
        position = list(inspect.signature(block.forward).parameters).index(SKIP_ARG)

        def block_hook(_mod: nn.Module, args: tuple, kwargs: dict, state=state, position=position) -> None:
            skips = kwargs.get(SKIP_ARG, args[position] if len(args) > position else ())
            state["skips"] = tuple(s for s in (skips or ()) if isinstance(s, torch.Tensor))

        handles.append(block.register_forward_pre_hook(block_hook, with_kwargs=True))
        for j, resnet in enumerate(block.resnets):
            if getattr(resnet, "up", False) or getattr(resnet, "down", False):
                continue  # its convs see a resampled tensor, not the concat
            prefix = f"{block_name}.resnets.{j}" if block_name else f"resnets.{j}"
            conv = getattr(resnet, "conv_shortcut", None)
            if isinstance(conv, nn.Conv2d) and conv.groups == 1:
                name = f"{prefix}.conv_shortcut"

                def conv_hook(_mod: nn.Module, args: tuple, name=name, state=state) -> None:
                    x = args[0] if args else None
                    split = _concat_split(x, state["skips"])
                    if split is not None:
                        found[name] = split

                handles.append(conv.register_forward_pre_hook(conv_hook))
            if conv1 and _conv1_splittable(resnet):
                handles += _conv1_hooks(resnet, f"{prefix}.conv1", state, found_conv1)
    forward_with_hooks(model, example, handles)
    return found, found_conv1


def _concat_split(x: Any, skips: tuple) -> int | None:
    """Channels before the skip tensor that `x` ends with along dim 1, or None."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        return None
    total = x.shape[1]
    for skip in skips:
        cb = skip.shape[1]
        if skip.shape[0] == x.shape[0] and skip.shape[2:] == x.shape[2:] and 0 < cb < total and torch.equal(x[:, total - cb :], skip):
            return total - cb
    return None


def _conv1_splittable(resnet: nn.Module) -> bool:
    conv = getattr(resnet, "conv1", None)
    return (
        isinstance(conv, nn.Conv2d)
        and conv.groups == 1
        and isinstance(getattr(resnet, "norm1", None), nn.Module)
        and callable(getattr(resnet, "nonlinearity", None))
        and getattr(resnet, "upsample", None) is None
        and getattr(resnet, "downsample", None) is None
    )


def _conv1_hooks(resnet: nn.Module, name: str, state: dict, found: dict[str, int]) -> list:
    """Pre-hooks on the resnet (does its input end with a skip?) and on its conv1 (is its input
    exactly nonlinearity(norm1(that input))?)."""
    seen: dict[str, Any] = {}

    def resnet_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_tensor", args[0] if args else None)
        split = _concat_split(x, state["skips"])
        seen.clear()
        if split is not None:
            seen.update(x=x, split=split)

    def conv1_hook(_mod: nn.Module, args: tuple) -> None:
        h = args[0] if args else None
        x = seen.pop("x", None)
        if x is None or not isinstance(h, torch.Tensor) or h.shape != x.shape:
            return
        if torch.allclose(h, resnet.nonlinearity(resnet.norm1(x)), rtol=1e-5, atol=1e-6):
            found[name] = seen["split"]

    return [resnet.register_forward_pre_hook(resnet_hook, with_kwargs=True), resnet.conv1.register_forward_pre_hook(conv1_hook)]
