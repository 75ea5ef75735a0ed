"""Block inputs and targets: what a unit sees and should produce, on the calibration calls.

Inputs come from the quantized model (its prefix holds the units reconstructed so far), the
targets from the float model, as BRECQ and Q-Diffusion do: each unit then learns to undo the
error the quantized prefix hands it. A pre-hook (or hook) on the unit records its arguments
(or output) and stops the forward pass there, so capturing a unit costs the prefix only.

The arguments of one call are flattened (torch's pytree); a tensor leaf whose first dimension is
the call's batch is concatenated over calls, any other leaf (a flag, a scale) must be the same
in every call and is kept once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from qdiff.core.errors import CalibrationError


class _StopForward(Exception):
    """Raised by a capture hook: the rest of the network is not needed."""


@dataclass
class Captured:
    """A unit's arguments over all calibration calls (batched leaves concatenated)."""

    spec: Any
    leaves: list[Any]
    batched: list[bool]
    size: int

    def select(self, index: torch.Tensor) -> tuple[tuple, dict]:
        leaves = [leaf[index] if b else leaf for leaf, b in zip(self.leaves, self.batched)]
        return pytree.tree_unflatten(leaves, self.spec)

    def mixed_with(self, other: Captured, index: torch.Tensor, p: float, generator: torch.Generator) -> tuple[tuple, dict]:
        """QDrop: every float element of a batched leaf taken from `other` with probability p
        (`generator` lives on the leaves' device, so masks are drawn where they are used)."""
        leaves = []
        for leaf, alt, b in zip(self.leaves, other.leaves, self.batched):
            if b and torch.is_floating_point(leaf):
                x, y = leaf[index], alt[index]
                mask = torch.rand(x.shape, generator=generator, device=x.device) < p
                leaves.append(torch.where(mask, y, x))
            else:
                leaves.append(leaf[index] if b else leaf)
        return pytree.tree_unflatten(leaves, self.spec)


def _to(obj: Any, device: torch.device | str) -> Any:
    return pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, obj)


def _call_batch(call: dict[str, Any]) -> int:
    return int(call["sample"].shape[0])


def run_calls(model: nn.Module, calls: Sequence[dict[str, Any]], device: torch.device | str) -> None:
    """Run the model on every call, swallowing `_StopForward` (used with capture hooks)."""
    with torch.no_grad():
        for call in calls:
            try:
                model(**_to(call, device), return_dict=False)
            except _StopForward:
                pass


def capture(model: nn.Module, unit: str, calls: Sequence[dict[str, Any]], device: torch.device | str, *, output: bool = False) -> tuple[Captured, torch.Tensor | None]:
    """The unit's inputs over `calls`, and with `output` its outputs (concatenated on dim 0)."""
    module = model.get_submodule(unit)
    flats: list[tuple[list, Any, int]] = []
    outputs: list[torch.Tensor] = []
    batch = {"size": 0}

    def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        flats.append(([v.detach() if isinstance(v, torch.Tensor) else v for v in leaves], spec, batch["size"]))
        if not output:
            raise _StopForward

    def post_hook(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
        outputs.append(first_tensor(out).detach())
        raise _StopForward

    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if output:
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for call in calls:
                batch["size"] = _call_batch(call)
                before = len(flats)
                try:
                    model(**_to(call, device), return_dict=False)
                except _StopForward:
                    pass
                if len(flats) != before + 1:
                    raise CalibrationError(f"reconstruction unit {unit!r} ran {len(flats) - before} times in one forward pass (expected once)", hint="a module called several times per forward cannot be reconstructed as a unit")
    finally:
        for h in handles:
            h.remove()
    return _stack(unit, flats), (torch.cat(outputs) if output else None)


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise CalibrationError(f"a reconstruction unit returned {type(out).__name__}, not a tensor")


def _stack(unit: str, flats: list[tuple[list, Any, int]]) -> Captured:
    leaves0, spec, _ = flats[0]
    batched = [isinstance(v, torch.Tensor) and v.ndim > 0 and all(f[0][i].shape[:1] == (f[2],) for f in flats) for i, v in enumerate(leaves0)]
    leaves: list[Any] = []
    for i, b in enumerate(batched):
        if b:
            leaves.append(torch.cat([f[0][i] for f in flats]))
            continue
        first = leaves0[i]
        for f in flats[1:]:
            other = f[0][i]
            same = torch.equal(first, other) if isinstance(first, torch.Tensor) and isinstance(other, torch.Tensor) else first == other
            if not same:
                raise CalibrationError(f"reconstruction unit {unit!r}: argument {i} changes between calibration calls but has no batch dimension", hint="reconstruct with a calibration set of fixed-size batches")
        leaves.append(first)
    size = sum(f[2] for f in flats)
    return Captured(spec, leaves, batched, size)
