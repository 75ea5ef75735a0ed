"""QuEST's selective fine-tuning: distil the quantized UNet's noise prediction into the float one's,
training only the layers that carry the timestep (time embedding) and attention.

QuEST's premise is that after reconstruction the remaining error sits in a few layer groups
whose activations the timestep moves (the time embedding and its per-resnet projections) and in
attention; instead of more block-wise reconstruction it trains those layers' weights end to end
on the whole network's output: MSE between the quantized and the float model's epsilon on the
calibration inputs (x_t, t, conditioning), Adam lr 1e-5, one stage after the other.

Weights stay on the recipe's integer grid throughout. Every quantized layer is a `ReconLayer`
(`calib.reconstruct.qlayer`) holding the starting integers (round-to-nearest, or a
reconstruction's); a trained layer computes floor_ste(w / s) + offset with the starting rounding
decision as offset, as QuEST's AdaRound quantizer does with hard rounding, so its float weight
gets a straight-through gradient and an integer moves only when w / s crosses a grid line. The
scales never change (the table's weight scales are the graph's), and biases stay as they are
(QuEST also trains them, but a trained bias would not be a weight of the Q/DQ graph's form; the
artifact is integers + scales only). At the end of a stage the float weight is re-rounded into
the integers: the result is an ordinary `ReconstructedWeights`.

A stage writes a checkpoint when it ends (its layers' integers and steps); a killed run loads the
stages it finished and restarts at the one it was in. Minibatches come from a generator seeded by
(seed, stage index), so a resumed run computes what an uninterrupted one does.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qdiff.calib.quest.settings import STAGE_LAYERS, FinetuneSettings
from qdiff.calib.recipe import Recipe
from qdiff.calib.reconstruct.artifact import ReconstructedWeights
from qdiff.calib.reconstruct.capture import Captured, capture, first_tensor
from qdiff.calib.reconstruct.engine import build_recon_model
from qdiff.calib.reconstruct.qlayer import ReconLayer
from qdiff.calib.table import CalibrationTable
from qdiff.core.artifacts import atomic_path
from qdiff.core.errors import CalibrationError

StageHook = Callable[[int, "StageResult"], None]


@dataclass
class StageResult:
    index: int
    name: str
    layers: list[str]
    iterations: int
    error_before: float  # relative squared error of the model's eps vs FP on the calibration inputs
    error_after: float
    integers_changed: int  # weights whose integer moved in this stage
    seconds: float
    resumed: bool = False


@dataclass
class FinetuneOutcome:
    model: nn.Module
    stages: list[StageResult] = field(default_factory=list)

    def layers(self) -> dict[str, ReconLayer]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, ReconLayer)}


def stage_layers(names: Sequence[str], stage: str) -> list[str]:
    """The quantized layers (module names, in model order) that `stage` trains."""
    include, exclude = STAGE_LAYERS[stage]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]


def load_integers(model: nn.Module, weights: ReconstructedWeights) -> None:
    """Put `weights`' integers into every `ReconLayer` of `model` (built from the same table).

    The stored scales must be the table's: the integers mean nothing on another grid, and the
    Q/DQ pass would refuse them later (`export.qdq`)."""
    for name, layer in model.named_modules():
        if not isinstance(layer, ReconLayer):
            continue
        lw = weights.layer(name)
        for part in layer.parts:
            role = f"_{part.role}" if part.role else ""
            if role not in lw.parts:
                raise CalibrationError(f"layer {name!r}: {weights.source} has no weight{role or ' (unsplit)'}; it has {sorted(lw.parts)}", hint="fine-tune with the table the reconstruction was made with")
            q, s = lw.parts[role]
            if tuple(q.shape) != tuple(part.fixed.shape):
                raise CalibrationError(f"layer {name!r}: {weights.source} holds a weight{role} of shape {tuple(q.shape)}, the model's is {tuple(part.fixed.shape)}", hint="the reconstruction is for another model")
            if not np.array_equal(s, part.scale.detach().cpu().reshape(-1).numpy()):
                raise CalibrationError(f"layer {name!r}: the weight{role} scales in {weights.source} differ from the calibration table's", hint="pass the table written beside the reconstruction (reconstruction.calibration.json)")
            part.fixed.copy_(torch.from_numpy(q.astype(np.float32)).to(part.fixed))
        layer.weight_mode = "fixed"


class SelectiveFinetuner:
    """Runs QuEST's stages on one calibrated (and optionally reconstructed) model.

    `calls` are UNet keyword arguments as reconstruction replays them; `weights` the starting
    integers (None: round-to-nearest from the table's scales).
    """

    def __init__(
        self,
        model: nn.Module,
        table: CalibrationTable,
        settings: FinetuneSettings,
        calls: Sequence[dict[str, Any]],
        *,
        weights: ReconstructedWeights | None = None,
        checkpoint_dir: Path | None = None,
        progress: Callable | None = None,
        on_stage_done: StageHook | None = None,
    ) -> None:
        if not calls:
            raise CalibrationError("fine-tuning needs calibration calls; got none")
        self.settings = settings
        self.device = torch.device(settings.device)
        recipe = Recipe.from_json(table.recipe)
        self.fp_model = copy.deepcopy(model).eval().to(self.device)
        for p in self.fp_model.parameters():
            p.requires_grad_(False)
        self.q_model = build_recon_model(model, table, recipe)
        for layer in self._all_layers().values():
            layer.weight_mode = "fixed"  # `fixed` starts as round-to-nearest (QuantPart), unless weights say otherwise
        if weights is not None:
            load_integers(self.q_model, weights)
        self.q_model.to(self.device)
        self.calls = list(calls)
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress
        self.on_stage_done = on_stage_done
        self.inputs: Captured | None = None
        self.target: torch.Tensor | None = None

    def _all_layers(self) -> dict[str, ReconLayer]:
        return {n: m for n, m in self.q_model.named_modules() if isinstance(m, ReconLayer)}

    def run(self) -> FinetuneOutcome:
        outcome = FinetuneOutcome(self.q_model)
        names = list(self._all_layers())
        for index, (stage, iterations) in enumerate(zip(self.settings.stages, self.settings.stage_iterations())):
            layers = stage_layers(names, stage)
            result = self._load_checkpoint(index, stage, layers)
            if result is None:
                result = self._train(index, stage, layers, iterations)
                self._save_checkpoint(index, stage, layers, result)
            outcome.stages.append(result)
            if self.on_stage_done is not None:
                self.on_stage_done(index, result)
        return outcome

    def _data(self) -> tuple[Captured, torch.Tensor]:
        """Every calibration call's UNet arguments, concatenated, and the float model's eps."""
        if self.inputs is None:
            self.inputs, self.target = capture(self.fp_model, "", self.calls, self.device, output=True)
        return self.inputs, self.target

    def _train(self, index: int, stage: str, names: list[str], iterations: int) -> StageResult:
        started = time.perf_counter()
        s = self.settings
        inputs, target = self._data()
        error_before = self.error(inputs, target)
        layers = [self.q_model.get_submodule(n) for n in names]
        if not layers:
            return StageResult(index, stage, [], 0, error_before, error_before, 0, round(time.perf_counter() - started, 3))
        before = [part.fixed.clone() for layer in layers for part in layer.parts]
        for layer in layers:
            for part in layer.parts:
                part.start_weight_training()
            layer.weight_mode = "trained"
        weights = [part.weight for layer in layers for part in layer.parts]
        opt = torch.optim.Adam(weights, lr=s.lr)
        steps = [st for layer in layers for st in layer.steps()] if s.learn_activation_steps else []
        for st in steps:
            st.step.requires_grad_(True)
        opt_a = torch.optim.Adam([st.step for st in steps], lr=s.activation_lr) if steps else None
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + index)
        bar = self.progress(total=iterations, desc=f"finetune {index + 1}/{len(s.stages)} {stage} ({len(layers)} layers)", unit="it") if self.progress else None
        try:
            for _ in range(iterations):
                idx = torch.randint(0, inputs.size, (min(s.batch_size, inputs.size),), generator=gen).to(self.device)
                args, kwargs = inputs.select(idx)
                loss = F.mse_loss(first_tensor(self.q_model(*args, **kwargs)), target[idx])
                opt.zero_grad(set_to_none=True)
                if opt_a is not None:
                    opt_a.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if opt_a is not None:
                    opt_a.step()
                    for st in steps:
                        st.clamp_positive()
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.3g}")
        finally:
            if bar:
                bar.close()
            for st in steps:
                st.step.requires_grad_(False)
            for layer in layers:
                for part in layer.parts:
                    part.fix_trained_weight()
                layer.weight_mode = "fixed"
        after = [part.fixed for layer in layers for part in layer.parts]
        changed = int(sum(int((a != b).sum()) for a, b in zip(after, before)))
        error_after = self.error(inputs, target)
        return StageResult(index, stage, names, iterations, error_before, error_after, changed, round(time.perf_counter() - started, 3))

    @torch.no_grad()
    def error(self, inputs: Captured, target: torch.Tensor) -> float:
        """Relative squared error of the quantized model's eps over all calibration samples."""
        err = ref = 0.0
        chunk = max(1, self.settings.batch_size)
        for start in range(0, inputs.size, chunk):
            idx = torch.arange(start, min(start + chunk, inputs.size), device=self.device)
            args, kwargs = inputs.select(idx)
            out = first_tensor(self.q_model(*args, **kwargs)).double()
            t = target[idx].double()
            err += float((out - t).pow(2).sum())
            ref += float(t.pow(2).sum())
        return err / max(ref, 1e-30)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_path(self, index: int) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / f"stage-{index:02d}.safetensors"

    def _save_checkpoint(self, index: int, stage: str, names: list[str], result: StageResult) -> None:
        path = self._checkpoint_path(index)
        if path is None:
            return
        from safetensors.torch import save_file

        tensors = {}
        for name in names:
            for k, part in enumerate(self.q_model.get_submodule(name).parts):
                tensors[f"{name}/{k}/fixed"] = part.fixed.detach().to(torch.int8).cpu().contiguous()
                tensors[f"{name}/{k}/step"] = part.input.step.detach().cpu().reshape(1).contiguous()
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"stage": stage, "result": json.dumps(asdict(result))})

    def _load_checkpoint(self, index: int, stage: str, names: list[str]) -> StageResult | None:
        path = self._checkpoint_path(index)
        if path is None or not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("stage") != stage:
                return None
            for name in names:
                for k, part in enumerate(self.q_model.get_submodule(name).parts):
                    part.fixed.copy_(fh.get_tensor(f"{name}/{k}/fixed").to(part.fixed))
                    part.input.step.data.copy_(fh.get_tensor(f"{name}/{k}/step").reshape(()).to(part.input.step))
        result = StageResult(**json.loads(meta["result"]))
        result.resumed = True
        return result
