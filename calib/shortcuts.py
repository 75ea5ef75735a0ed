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
    found: dict[str, int] = {}
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
            conv = getattr(resnet, "conv_shortcut", None)
            if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
                continue
            if getattr(resnet, "up", False) or getattr(resnet, "down", False):
                continue  # conv_shortcut sees a resampled tensor, not the concat
            name = f"{block_name}.resnets.{j}.conv_shortcut" if block_name else f"resnets.{j}.conv_shortcut"

            def conv_hook(_mod: nn.Module, args: tuple, name=name, state=state) -> None:
                x = args[0] if args else None
                if not isinstance(x, torch.Tensor) or x.ndim != 4:
                    return
                total = x.shape[1]
                for skip in state["skips"]:
                    cb = skip.shape[1]
                    if skip.shape[0] == x.shape[0] and skip.shape[2:] == x.shape[2:] and 0 < cb < total and torch.equal(x[:, total - cb :], skip):
                        found[name] = total - cb
                        return

            handles.append(conv.register_forward_pre_hook(conv_hook))
    forward_with_hooks(model, example, handles)
    return found
