"""Quantization recipes: every setting that changes the numbers, in one serializable dataclass.

A recipe is the single source of truth for a quantized artifact (torchao's habit: one config
object per method, JSON in and out). The calibration table and the Q/DQ graph both record the
recipe they were made with, so an artifact made with other settings is never silently reused.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from qdiff.core.errors import RecipeError, strict_fields

CALIBRATORS = ("max", "percentile", "mse", "entropy")
TIMESTEP_SAMPLINGS = ("uniform", "tdac")
# The settings of TDAC (EDA-DM's temporal distribution alignment calibration). A recipe with
# uniform sampling and these at their defaults serializes without them, so the tables and
# graphs made before TDAC existed keep their recipe hashes (and stay reusable).
_TDAC_DEFAULTS = {"timestep_sampling": "uniform", "tdac_lambda": 1.2, "tdac_r": "auto"}
WEIGHT_CALIBRATORS = ("max", "mse")


@dataclass(frozen=True)
class Recipe:
    """How to quantize a denoiser, after Q-Diffusion.

    Timestep-uniform calibration: `num_timesteps` timesteps spread uniformly over the part of
    the trajectory given by `timestep_window` (0 = the first, noisiest step, 1 = the last),
    `samples_per_timestep` denoiser inputs at each (the paper: 20 x 256 on CIFAR-10).
    """

    name: str = "w8a8"
    weight_bits: int = 8
    activation_bits: int = 8
    activation_calibrator: str = "max"
    percentile: float = 99.99
    weight_calibrator: str = "max"
    num_timesteps: int = 20
    samples_per_timestep: int = 256
    calibration_steps: int = 100
    timestep_window: tuple[float, float] = (0.0, 1.0)
    scheduler: str = "ddim"
    guidance_scale: float = 3.0
    batch_size: int = 64
    seed: int = 0
    exclude: tuple[str, ...] = ("conv_in", "conv_out")
    quantize_ops: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    # Up-block resnets' `conv_shortcut` sees cat([hidden_states, skip]): give each branch its own
    # activation and weight quantizer (export: two Convs + Add). See calib.shortcuts.
    split_shortcut: bool = False
    # The same resnets' `conv1` sees that concat after norm1 and SiLU: split it too, at the same
    # channel (export: Slice -> two Convs + Add). Off by default and in the presets; an option
    # to measure (docs/results). A recipe JSON without the key keeps it off.
    split_conv1: bool = False
    histogram_bins: int = 2048
    # How the calibration budget (num_timesteps x samples_per_timestep denoiser inputs) is spread
    # over the trajectory: "uniform" (Q-Diffusion: num_timesteps evenly spaced steps, all
    # samples_per_timestep trajectories at each) or "tdac" (EDA-DM: every step of the window gets
    # a share proportional to its density + tdac_lambda x diversity of mid-block attention
    # inputs; see calib.tdac). tdac_r is the density radius in MSE units of the model's own
    # features, or "auto" (the median pairwise MSE; calib.tdac says why).
    timestep_sampling: str = "uniform"
    tdac_lambda: float = 1.2
    tdac_r: float | str = "auto"

    def __post_init__(self) -> None:
        problems = []
        if self.weight_bits not in (4, 8):
            problems.append(f"weight_bits={self.weight_bits} (use 4 or 8)")
        if self.activation_bits not in (4, 8):
            problems.append(f"activation_bits={self.activation_bits} (use 8, or 4 for fake-quant simulation only)")
        if self.activation_calibrator not in CALIBRATORS:
            problems.append(f"activation_calibrator={self.activation_calibrator!r} (one of {', '.join(CALIBRATORS)})")
        if self.weight_calibrator not in WEIGHT_CALIBRATORS:
            problems.append(f"weight_calibrator={self.weight_calibrator!r} (one of {', '.join(WEIGHT_CALIBRATORS)})")
        if not 0.0 < self.percentile <= 100.0:
            problems.append(f"percentile={self.percentile} (must be in (0, 100])")
        if self.num_timesteps < 1 or self.samples_per_timestep < 1 or self.batch_size < 1:
            problems.append("num_timesteps, samples_per_timestep and batch_size must be >= 1")
        if self.calibration_steps < self.num_timesteps:
            problems.append(
                f"calibration_steps={self.calibration_steps} < num_timesteps={self.num_timesteps}: "
                "the trajectory must have at least as many steps as timesteps to keep"
            )
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            problems.append(f"timestep_sampling={self.timestep_sampling!r} (one of {', '.join(TIMESTEP_SAMPLINGS)})")
        if not isinstance(self.tdac_lambda, (int, float)) or self.tdac_lambda < 0:
            problems.append(f"tdac_lambda={self.tdac_lambda!r} (a number >= 0)")
        if self.tdac_r != "auto" and (isinstance(self.tdac_r, bool) or not isinstance(self.tdac_r, (int, float)) or not self.tdac_r > 0):
            problems.append(f"tdac_r={self.tdac_r!r} (\"auto\" or a number > 0)")
        lo, hi = self.timestep_window
        if not 0.0 <= lo < hi <= 1.0:
            problems.append(f"timestep_window={self.timestep_window} (need 0 <= start < end <= 1)")
        if problems:
            raise RecipeError(f"recipe {self.name!r} is invalid: " + "; ".join(problems))

    @property
    def weight_qmax(self) -> int:
        """Largest quantized weight magnitude: 127 for INT8, 7 for INT4 values (symmetric)."""
        return 2 ** (self.weight_bits - 1) - 1

    @property
    def activation_qmax(self) -> int:
        return 2 ** (self.activation_bits - 1) - 1

    @property
    def simulated_only(self) -> str | None:
        """Why this recipe exists only in fake-quant (no Q/DQ graph, no engine), or None.

        INT4 activations (QuEST's W4A4) have no TensorRT kernels: TensorRT quantizes activations
        to INT8 or FP8 only, so a W4A4 recipe is calibrated and evaluated in the PyTorch
        fake-quant reference and refused by `qdiff quantize`/build."""
        if self.activation_bits != 8:
            return f"simulated: TensorRT has no INT{self.activation_bits} activations"
        return None

    def check_deployable(self, what: str) -> None:
        """Refuse a simulated-only recipe where a Q/DQ graph or an engine would be made."""
        if self.simulated_only is not None:
            raise RecipeError(
                f"recipe {self.name!r} (W{self.weight_bits}A{self.activation_bits}) is {self.simulated_only}; {what} cannot be made for it",
                hint="evaluate it in fake-quant (the evaluation harness, tools/quest_results.py); deploy w8a8 or w4a8",
            )

    def is_excluded(self, module_name: str) -> str | None:
        """The exclusion pattern that keeps `module_name` in float, or None."""
        for pattern in self.exclude:
            if module_name == pattern or fnmatch.fnmatchcase(module_name, pattern):
                return pattern
        return None

    def with_overrides(self, **overrides: Any) -> Recipe:
        return replace(self, **strict_fields(type(self), overrides, error=RecipeError, what="recipe"))

    def to_json(self) -> dict[str, Any]:
        obj = asdict(self)
        obj["timestep_window"] = list(self.timestep_window)
        obj["exclude"] = list(self.exclude)
        obj["quantize_ops"] = list(self.quantize_ops)
        if all(obj[k] == v for k, v in _TDAC_DEFAULTS.items()):
            for key in _TDAC_DEFAULTS:
                del obj[key]
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> Recipe:
        kwargs = strict_fields(cls, obj, error=RecipeError, what="recipe", tuples=("timestep_window", "exclude", "quantize_ops"))
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise RecipeError(f"recipe has a setting of the wrong type: {exc}") from exc


PRESETS: dict[str, Recipe] = {
    # Q-Diffusion's split-shortcut quantization is on in the presets; a bare `Recipe()` (and a
    # recipe JSON without the key) keeps it off, so older tables and graphs mean what they meant.
    # The activation calibrator is mse: in the project's ablations (docs/results, 16 images, split
    # on) it has the lowest per-step error of the four on both shipped models at W8A8
    # (shapes-ddpm 0.0177 vs percentile 0.0184, max 0.0250; shapes-cond 0.0196 vs 0.0202, max 0.0273).
    "w8a8": Recipe(name="w8a8", activation_calibrator="mse", split_shortcut=True),
    "w4a8": Recipe(name="w4a8", weight_bits=4, activation_calibrator="mse", weight_calibrator="mse", split_shortcut=True),
    # QuEST's headline setting, fake-quant only (`Recipe.simulated_only`): activation qmax 7.
    "w4a4": Recipe(name="w4a4", weight_bits=4, activation_bits=4, activation_calibrator="mse", weight_calibrator="mse", split_shortcut=True),
}


def load_recipe(spec: str | Path | Recipe, **overrides: Any) -> Recipe:
    """A preset name (`w8a8`, `w4a8`, `w4a4` simulated) or a path to a recipe JSON file, plus overrides."""
    if isinstance(spec, Recipe):
        recipe = spec
    elif str(spec) in PRESETS:
        recipe = PRESETS[str(spec)]
    else:
        path = Path(spec)
        if not path.is_file():
            raise RecipeError(
                f"recipe {str(spec)!r} is neither a preset nor a file",
                hint=f"use one of {', '.join(PRESETS)} or a path to a recipe .json",
            )
        try:
            recipe = Recipe.from_json(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path}: not valid JSON ({exc})") from exc
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return recipe.with_overrides(**overrides) if overrides else recipe
