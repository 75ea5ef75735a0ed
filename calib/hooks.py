"""One forward pass with temporary hooks: how calibration measures things about a model
(MACs per layer, where skip concats split) without keeping hooks on it afterwards."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def forward_with_hooks(model: nn.Module, example: dict[str, Any], handles: Iterable[RemovableHandle]) -> None:
    """Run `model(**example)` without gradients, then remove `handles` whatever happens."""
    handles = list(handles)
    try:
        with torch.no_grad():
            model(**example)
    finally:
        for handle in handles:
            handle.remove()
