"""The reconstruction engine: one loop over units, two losses (adaround-brecq | fbr).

For each unit in execution order (`blocks.find_units`): capture its inputs from the quantized
model (whose prefix is already reconstructed) and its float inputs and outputs from the float
model, measure its output error with round-to-nearest, train, fix the rounding, measure again,
and write a checkpoint. The captures come from one forward pass per calibration call and model
that pauses at each unit and goes on through it once it is fixed (`capture.UnitCursor`): the
same numbers as re-running the prefix for every unit, at the cost of one pass. A killed run finds the checkpoints of the units it
finished and restarts at the unit it was in; every random draw (minibatches, QDrop masks) comes
from a generator seeded by (seed, unit index), so a resumed run computes what an uninterrupted
one does, bit for bit on the CPU.

- adaround-brecq (Q-Diffusion): loss = block output L2 + lambda * rounding regulariser (beta
  annealed after a warm-up); optional learned activation steps alongside.
- fbr (EDA-DM): no rounding regulariser; loss = block output L2 + gamma * sum of the per-layer
  output L2 terms (each quantized layer against the same layer of the float block on float
  inputs); QDrop: the block's input mixes float and quantized elements with probability p.

The L2 is Q-Diffusion's `lp_loss`: squared error summed over dim 1 (channels), averaged over
the rest, which is what lambda = 0.01 is balanced against.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from qdiff.core.artifacts import atomic_path
from qdiff.calib.quant_math import scale_from_amax
from qdiff.calib.recipe import Recipe
from qdiff.calib.reconstruct.adaround import beta_at, rounding_regulariser
from qdiff.calib.reconstruct.blocks import Unit, find_units
from qdiff.calib.reconstruct.capture import Captured, UnitCursor, first_tensor, live_bytes_per_sample
from qdiff.calib.reconstruct.qlayer import PartSpec, ReconLayer
from qdiff.calib.reconstruct.settings import ReconstructionSettings
from qdiff.calib.table import CalibrationTable
from qdiff.calib.targets import select_targets
from qdiff.core.errors import CalibrationError
from qdiff.core.progress import Phases

UnitHook = Callable[[int, "UnitResult"], None]


@dataclass
class UnitResult:
    index: int
    name: str
    kind: str
    layers: list[str]
    samples: int
    rtn_error: float  # relative squared error of the unit's output with round-to-nearest
    error: float  # the same after reconstruction
    seconds: float
    resumed: bool = False


@dataclass
class ReconstructionOutcome:
    """What the engine produced: the quantized model (fixed rounding) and per-unit results."""

    model: nn.Module
    units: list[UnitResult] = field(default_factory=list)

    def layers(self) -> dict[str, ReconLayer]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, ReconLayer)}


def build_recon_model(model: nn.Module, table: CalibrationTable, recipe: Recipe) -> nn.Module:
    """A deep copy of `model` with every layer the table quantizes as a `ReconLayer`."""
    quantized = copy.deepcopy(model).eval()
    for p in quantized.parameters():
        p.requires_grad_(False)
    targets, _ = select_targets(quantized, recipe)
    split = table.split_layers(recipe.split_shortcut, recipe.split_conv1)
    for target in targets:
        ranges = table.layers.get(target.name)
        if ranges is None:
            continue
        if ranges.input is None or ranges.weight is None:
            raise CalibrationError(f"layer {target.name!r} has no input or weight range in the table")
        aq, wq = recipe.activation_qmax, recipe.weight_qmax
        if target.name in split:
            c = ranges.split_channels
            parts = [
                PartSpec("a", 0, c, float(scale_from_amax(ranges.shortcut_a, aq)), torch.from_numpy(scale_from_amax(ranges.weight_a, wq))),
                PartSpec("b", c, None, float(scale_from_amax(ranges.shortcut_b, aq)), torch.from_numpy(scale_from_amax(ranges.weight_b, wq))),
            ]
        else:
            parts = [PartSpec("", 0, None, float(scale_from_amax(ranges.input, aq)), torch.from_numpy(scale_from_amax(ranges.weight, wq)))]
        parent_name, _, child = target.name.rpartition(".")
        parent = quantized.get_submodule(parent_name) if parent_name else quantized
        setattr(parent, child, ReconLayer(target.module, parts, target.weight_axis, wq, aq))
    return quantized


def _free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's free memory, or the host's available memory (4 GiB if
    the system does not say)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def lp_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).sum(1).mean()


class _LayerOutputs:
    """Forward hooks keeping the outputs of named layers during one forward pass."""

    def __init__(self, root: nn.Module, names: Sequence[str], prefix: str) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            rel = name[len(prefix) + 1 :] if name != prefix else ""
            module = root.get_submodule(rel) if rel else root
            self.handles.append(module.register_forward_hook(lambda _m, _i, out, name=name: self.outputs.__setitem__(name, out)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Reconstructor:
    """Runs the reconstruction of one calibrated model on a set of calibration calls.

    `calls` are UNet keyword arguments (sample, timestep broadcast to the batch, and the
    conditioning), as `calibrate` fed the denoiser. `checkpoint_dir` holds one file per finished
    unit; `on_unit_done(index, result)` runs after each checkpoint (tests interrupt there).
    `phases` (one is made if not given) sums the wall time of each part over the units: `units`
    (finding them), `inputs` (the quantized model's inputs to the unit), `targets` (the float
    model's inputs and outputs), `error` (before and after), `optimisation` (the iterations),
    `checkpoints`; on a GPU each part ends with a synchronize, so the times are the device's.
    """

    def __init__(
        self,
        model: nn.Module,
        table: CalibrationTable,
        settings: ReconstructionSettings,
        calls: Sequence[dict[str, Any]],
        *,
        checkpoint_dir: Path | None = None,
        progress: Callable | None = None,
        on_unit_done: UnitHook | None = None,
        phases: Phases | None = None,
    ) -> None:
        if not calls:
            raise CalibrationError("reconstruction needs calibration calls; got none")
        self.settings = settings.resolved()
        self.recipe = Recipe.from_json(table.recipe)
        self.table = table
        self.device = torch.device(self.settings.device)
        self.fp_model = copy.deepcopy(model).eval().to(self.device)
        for p in self.fp_model.parameters():
            p.requires_grad_(False)
        self.q_model = build_recon_model(model, table, self.recipe).to(self.device)
        self.calls = list(calls)
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress
        self.on_unit_done = on_unit_done
        self.phases = phases if phases is not None else Phases()

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """A phase of `self.phases` that, on a GPU, waits for the device before it ends."""
        with self.phases(name):
            try:
                yield
            finally:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)

    def units(self) -> list[Unit]:
        names = [n for n, m in self.q_model.named_modules() if isinstance(m, ReconLayer)]
        example = {**self.calls[0], "return_dict": False}
        example = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in example.items()}
        for layer in self._layers(names):
            layer.weight_mode, layer.act_quant = "float", False  # the order of a float pass
        units = find_units(self.q_model, names, example)
        for layer in self._layers(names):
            layer.weight_mode, layer.act_quant = "nearest", True
        return units

    def _layers(self, names: Sequence[str]) -> list[ReconLayer]:
        return [self.q_model.get_submodule(n) for n in names]

    def run(self) -> ReconstructionOutcome:
        outcome = ReconstructionOutcome(self.q_model)
        with self._phase("units"):
            units = self.units()
            self.kept_calls = self._calls_to_keep([u.name for u in units])
        names = [u.name for u in units]
        # One forward per calibration call and model, paused between units (`UnitCursor`):
        # re-running the prefix for every unit made capture quadratic in the number of units
        # (SD 1.5: 78 units x 8 calls x 2 models of prefix passes, most of a short run).
        with UnitCursor(self.q_model, names, self.calls, self.device, keep=self.kept_calls) as q_cursor, \
                UnitCursor(self.fp_model, names, self.calls, self.device, output=True, keep=self.kept_calls) as fp_cursor:
            self._cursors = (q_cursor, fp_cursor)
            for index, unit in enumerate(units):
                with self._phase("checkpoints"):
                    result = self._load_checkpoint(index, unit)
                if result is None:
                    result = self._reconstruct(index, unit)
                    with self._phase("checkpoints"):
                        self._save_checkpoint(index, unit, result)
                outcome.units.append(result)
                if self.on_unit_done is not None:
                    self.on_unit_done(index, result)
        return outcome

    def _calls_to_keep(self, units: Sequence[str]) -> int:
        """How many calibration calls keep a paused forward per model between units: all whose
        activations (estimated from one batch-1 pass, `live_bytes_per_sample`) fit a third of
        the device's free memory for both models; the rest re-run their prefix per unit."""
        rows = int(self.calls[0]["sample"].shape[0])
        first_row = lambda v: v[:1] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == rows else v  # noqa: E731
        example = {**pytree.tree_map(first_row, self.calls[0]), "return_dict": False}
        per_sample = live_bytes_per_sample(self.fp_model, units, example, self.device)
        budget = _free_memory(self.device) // 3
        kept, used = 0, 0
        for call in self.calls:
            used += 2 * per_sample * int(call["sample"].shape[0])
            if used > budget:
                break
            kept += 1
        return kept

    # ------------------------------------------------------------------ one unit

    def _reconstruct(self, index: int, unit: Unit) -> UnitResult:
        started = time.perf_counter()
        s = self.settings
        layers = self._layers(unit.layers)
        q_cursor, fp_cursor = self._cursors
        with self._phase("inputs"):
            q_inputs, _ = q_cursor.capture(unit.name)
        with self._phase("targets"):
            fp_inputs, target = fp_cursor.capture(unit.name)
        q_block = self.q_model.get_submodule(unit.name)
        fp_block = self.fp_model.get_submodule(unit.name)
        with self._phase("error"):
            rtn_error = self._error(q_block, q_inputs, target)
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + index)
        mask_gen = torch.Generator(device=self.device).manual_seed(s.seed * 1_000_003 + index + 7919)
        v_params = [v for layer in layers for v in layer.begin_rounding()]
        steps = [st for layer in layers for st in layer.steps()]
        for layer in layers:
            layer.weight_mode = "soft"
        for v in v_params:
            v.requires_grad_(True)
        opt_w = torch.optim.Adam(v_params, lr=s.weight_lr)
        opt_a = sched_a = None
        if s.learn_activation_steps:
            for st in steps:
                st.step.requires_grad_(True)
            opt_a = torch.optim.Adam([st.step for st in steps], lr=s.activation_lr)
            sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=s.iterations, eta_min=0.0)
        q_hooks = _LayerOutputs(q_block, unit.layers, unit.name) if s.uses_layer_loss else None
        fp_hooks = _LayerOutputs(fp_block, unit.layers, unit.name) if s.uses_layer_loss else None
        bar = self.progress(total=s.iterations, desc=f"reconstruct {index + 1} {unit.name}", unit="it") if self.progress else None
        try:
            with self._phase("optimisation"):
                for it in range(s.iterations):
                    idx = torch.randint(0, q_inputs.size, (min(s.batch_size, q_inputs.size),), generator=gen).to(self.device)
                    if s.qdrop_p > 0:
                        args, kwargs = q_inputs.mixed_with(fp_inputs, idx, s.qdrop_p, mask_gen)
                    else:
                        args, kwargs = q_inputs.select(idx)
                    out = first_tensor(q_block(*args, **kwargs))
                    loss = lp_loss(out, target[idx])
                    if s.uses_layer_loss:
                        with torch.no_grad():
                            fp_args, fp_kwargs = fp_inputs.select(idx)
                            fp_block(*fp_args, **fp_kwargs)
                        loss = loss + s.layer_loss_weight * sum(lp_loss(first_tensor(q_hooks.outputs[n]), first_tensor(fp_hooks.outputs[n])) for n in unit.layers)
                    beta = beta_at(it, s.iterations, s.warmup, s.beta_start, s.beta_end)
                    if s.uses_round_regulariser and beta is not None:
                        loss = loss + s.round_weight * sum(rounding_regulariser(v, beta) for v in v_params)
                    opt_w.zero_grad(set_to_none=True)
                    if opt_a is not None:
                        opt_a.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_w.step()
                    if opt_a is not None:
                        opt_a.step()
                        sched_a.step()
                        for st in steps:
                            st.clamp_positive()
                    if bar:
                        bar.update(1)
        finally:
            if bar:
                bar.close()
            for hooks in (q_hooks, fp_hooks):
                if hooks is not None:
                    hooks.remove()
            for v in v_params:
                v.requires_grad_(False)
            for st in steps:
                st.step.requires_grad_(False)
        for layer in layers:
            for part in layer.parts:
                part.fix_rounding()
            layer.weight_mode = "fixed"
        with self._phase("error"):
            error = self._error(q_block, q_inputs, target)
        return UnitResult(index, unit.name, unit.kind, list(unit.layers), q_inputs.size, rtn_error, error, round(time.perf_counter() - started, 3))

    @torch.no_grad()
    def _error(self, block: nn.Module, inputs: Captured, target: torch.Tensor) -> float:
        """Relative squared error of the block's output over all captured samples."""
        err = ref = 0.0
        chunk = max(1, self.settings.batch_size)
        for start in range(0, inputs.size, chunk):
            idx = torch.arange(start, min(start + chunk, inputs.size), device=self.device)
            args, kwargs = inputs.select(idx)
            out = first_tensor(block(*args, **kwargs)).double()
            t = target[idx].double()
            err += float((out - t).pow(2).sum())
            ref += float(t.pow(2).sum())
        return err / max(ref, 1e-30)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_path(self, index: int) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / f"unit-{index:04d}.safetensors"

    def _save_checkpoint(self, index: int, unit: Unit, result: UnitResult) -> None:
        path = self._checkpoint_path(index)
        if path is None:
            return
        from safetensors.torch import save_file

        tensors = {}
        for name in unit.layers:
            for k, part in enumerate(self.q_model.get_submodule(name).parts):
                tensors[f"{name}/{k}/fixed"] = part.fixed.detach().to(torch.int8).cpu().contiguous()
                tensors[f"{name}/{k}/step"] = part.input.step.detach().cpu().reshape(1).contiguous()
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"unit": unit.name, "result": json.dumps(asdict(result))})

    def _load_checkpoint(self, index: int, unit: Unit) -> UnitResult | None:
        path = self._checkpoint_path(index)
        if path is None or not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("unit") != unit.name:
                return None  # another run's file (the cache key makes this unlikely); redo the unit
            for name in unit.layers:
                layer = self.q_model.get_submodule(name)
                for k, part in enumerate(layer.parts):
                    part.fixed.copy_(fh.get_tensor(f"{name}/{k}/fixed").to(part.fixed))
                    part.input.step.data.copy_(fh.get_tensor(f"{name}/{k}/step").reshape(()).to(part.input.step))
                layer.weight_mode = "fixed"
        result = UnitResult(**json.loads(meta["result"]))
        result.resumed = True
        return result
