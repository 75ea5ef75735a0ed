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

import queue
import threading
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


def live_bytes_per_sample(model: nn.Module, units: Sequence[str], example: dict[str, Any], device: torch.device | str) -> int:
    """An estimate (from above) of the activations a forward paused at a unit holds, per batch
    row: the bytes of every distinct tensor that enters or leaves a unit in one pass of the
    batch-1 `example`. A paused forward can hold at most the tensors made so far, and those it
    holds between units (skip connections, the time embedding, the hidden states) are units'
    inputs and outputs."""
    seen: dict[tuple[int, int], int] = {}

    def count(value: Any) -> None:
        for leaf in pytree.tree_leaves(value):
            if isinstance(leaf, torch.Tensor):
                seen[(leaf.untyped_storage().data_ptr(), leaf.storage_offset())] = leaf.numel() * leaf.element_size()

    handles = []
    for name in dict.fromkeys(units):
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda _m, args, kwargs: count((args, kwargs)), with_kwargs=True))
        handles.append(module.register_forward_hook(lambda _m, _a, out: count(out)))
    try:
        with torch.no_grad():
            model(**_to(example, device))
    finally:
        for h in handles:
            h.remove()
    return sum(seen.values())


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


# ----------------------------------------------------------------------------- paused forwards

_ABORT = object()
_thread_state = threading.local()  # the _PausedForward a worker thread runs, if any


class _PausedForward:
    """One calibration call's forward pass, run in a thread of its own and paused at a unit.

    The thread and the caller never run at the same time: `run_to(unit)` hands control to the
    thread and waits until its forward reaches `unit` (its pre-hook, or with `output` its
    post-hook), where the thread waits in turn. Resumed for a later unit, the forward goes on
    from where it stopped, through the unit it stopped at, with that unit as it is then (its
    rounding fixed by then).
    """

    def __init__(self, cursor: UnitCursor, call: dict[str, Any]) -> None:
        self.cursor = cursor
        self.call = call
        self.target: str | None = None
        self.seen: set[str] = set()  # units whose pre-hook has run in this forward
        self.args: tuple[list, Any] | None = None
        self._to_worker: queue.SimpleQueue = queue.SimpleQueue()
        self._to_caller: queue.SimpleQueue = queue.SimpleQueue()
        self.finished = False
        self._thread = threading.Thread(target=self._main, name="qdiff-unit-capture", daemon=True)
        self._thread.start()

    # -- the worker thread
    def _main(self) -> None:
        _thread_state.forward = self
        try:
            torch.set_num_threads(self.cursor.threads)  # as the caller computes (same kernels, same results)
            command = self._to_worker.get()
            if command is _ABORT:
                return
            self.target = command
            with torch.no_grad():
                self.cursor.model(**_to(self.call, self.cursor.device), return_dict=False)
            self._to_caller.put(("end", None))
        except _StopForward:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
            self._to_caller.put(("error", exc))
        finally:
            _thread_state.forward = None

    def pause(self, payload: Any) -> None:
        """In the worker: hand `payload` to the caller and wait for its next command."""
        self._to_caller.put(("at", payload))
        command = self._to_worker.get()
        if command is _ABORT:
            raise _StopForward
        self.target = command

    # -- the caller
    def run_to(self, unit: str) -> Any:
        self._to_worker.put(unit)
        kind, payload = self._to_caller.get()
        if kind == "error":
            self.finished = True
            raise payload
        if kind == "end":
            self.finished = True
            raise CalibrationError(f"reconstruction unit {unit!r} did not run in a forward pass of the calibration calls", hint="a unit off the forward path cannot be reconstructed")
        return payload

    def close(self) -> None:
        if not self.finished and self._thread.is_alive():
            self._to_worker.put(_ABORT)
        self._thread.join()
        self.finished = True


class UnitCursor:
    """The inputs (and with `output` the outputs) of units, taken in execution order from
    forward passes that pause between units instead of re-running the network's prefix.

    `capture(unit)` returns what `capture(model, unit, calls, device, output=...)` returns, with
    the same numbers: each call's forward runs the same operations on the same values, only
    once. The first `keep` calls (all by default) stay paused after the unit they were asked
    for, holding the activations their forward has alive there (the skip connections, say);
    the others run from the start for every unit and are dropped after it, as `capture` does.
    A unit asked for out of execution order restarts the forwards that have passed it.
    `close()` ends every paused forward (use the cursor as a context manager).
    """

    def __init__(self, model: nn.Module, units: Sequence[str], calls: Sequence[dict[str, Any]], device: torch.device | str, *, output: bool = False, keep: int | None = None) -> None:
        self.model = model
        self.calls = list(calls)
        self.device = device
        self.output = output
        self.keep = len(self.calls) if keep is None else max(0, min(keep, len(self.calls)))
        self.threads = torch.get_num_threads()
        self._forwards: list[_PausedForward | None] = [None] * len(self.calls)
        self._handles = []
        for name in dict.fromkeys(units):
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            if output:
                self._handles.append(module.register_forward_hook(self._post_hook(name), with_kwargs=True))

    def _mine(self) -> _PausedForward | None:
        forward = getattr(_thread_state, "forward", None)
        return forward if forward is not None and forward.cursor is self else None

    def _pre_hook(self, name: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            forward = self._mine()
            if forward is None:  # the caller running the unit itself (training, error)
                return
            first = name not in forward.seen
            forward.seen.add(name)
            if name != forward.target or not first:
                return
            leaves, spec = pytree.tree_flatten((args, kwargs))
            forward.args = ([v.detach() if isinstance(v, torch.Tensor) else v for v in leaves], spec)
            if not self.output:
                forward.pause(forward.args)

        return hook

    def _post_hook(self, name: str):
        def hook(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
            forward = self._mine()
            if forward is None or name != forward.target or forward.args is None:
                return
            args, forward.args = forward.args, None
            forward.pause((args, first_tensor(out).detach()))

        return hook

    def capture(self, unit: str) -> tuple[Captured, torch.Tensor | None]:
        flats: list[tuple[list, Any, int]] = []
        outputs: list[torch.Tensor] = []
        for i, call in enumerate(self.calls):
            forward = self._forwards[i]
            if forward is not None and (forward.finished or unit in forward.seen):
                forward.close()  # it has passed `unit` (or ended): start this call again
                forward = None
            if forward is None:
                forward = _PausedForward(self, call)
            self._forwards[i] = forward
            try:
                payload = forward.run_to(unit)
            except CalibrationError as exc:
                self.close()
                raise CalibrationError(f"reconstruction unit {unit!r} ran 0 times in one forward pass (expected once)", hint=exc.hint) from exc
            except BaseException:
                self.close()
                raise
            (leaves, spec), out = payload if self.output else (payload, None)
            flats.append((leaves, spec, _call_batch(call)))
            if out is not None:
                outputs.append(out)
            if i >= self.keep:
                forward.close()
                self._forwards[i] = None
        return _stack(unit, flats), (torch.cat(outputs) if self.output else None)

    def close(self) -> None:
        for i, forward in enumerate(self._forwards):
            if forward is not None:
                forward.close()
                self._forwards[i] = None

    def remove(self) -> None:
        """Close the forwards and remove the hooks."""
        self.close()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> UnitCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
