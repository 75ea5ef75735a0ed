"""`qdiff` command line: parses arguments and calls `qdiff.api`; nothing else lives here.

User errors (`QdiffError`, and OS errors such as a full disk or a folder without write
permission) print one or two lines on stderr and exit non-zero; so do argument errors (exit 2).
`--verbose`, before or after the subcommand, adds the traceback. Anything else is a bug and
always shows its traceback. No subprocess, and never a shell, is started from here.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from qdiff.core.errors import QdiffError, SamplingError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is two lines (what is wrong, where to look), not the usage."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n  hint: see `{self.prog} --help`\n")


def _one_line(text: str) -> str:
    """Messages quoted from other libraries (the ONNX checker, diffusers) may span lines."""
    return " ".join(str(text).split())


def _add_conditioning(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("conditioning (conditional UNets only)")
    g.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT", help="prompt for the folder's text encoder (repeatable; default: none)")
    g.add_argument("--class", action="append", type=int, dest="class_labels", metavar="ID", help="class id for class-conditional models (repeatable; default: none)")
    g.add_argument("--embeddings", type=Path, metavar="FILE", help="safetensors file with encoder_hidden_states (and optional uncond_*, text_embeds, time_ids) (default: none)")
    g.add_argument("--random-conditioning", action="store_true", help="use seeded random conditioning (bare UNet folders, benchmarking) (default: off)")


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new option's dest and warns on stderr."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed in the next release; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_recipe(p: argparse.ArgumentParser, default: str = "w8a8", run: bool = False) -> None:
    """Recipe overrides; unset, each comes from the recipe (the presets' values in the help,
    from `qdiff.calib.recipe`), except that `qdiff run` uses its lighter calibration settings
    (`qdiff.api.RUN_CALIBRATION`) for the four sizes."""
    from qdiff.calib.recipe import PRESETS

    r = PRESETS[default]

    def size(key: str) -> str:
        if run:
            from qdiff.api import RUN_CALIBRATION

            return f"(default: {RUN_CALIBRATION[key]}, qdiff run's; the presets': {getattr(r, key)})"
        return f"(default: the recipe's; the presets': {getattr(r, key)})"

    title = "recipe"
    if run:
        from qdiff.api import RUN_CALIBRATION as c

        title += f" (qdiff run calibrates lighter than the recipe unless told: {c['num_timesteps']} timesteps x {c['samples_per_timestep']} samples x {c['calibration_steps']}-step loop, batch {c['batch_size']})"
    g = p.add_argument_group(title)
    g.add_argument("--recipe", default=default, help="preset (w8a8, w4a8; w4a4 is fake-quant only: calibrate works, quantize/run refuse it) or a recipe .json file (default: %(default)s)")
    g.add_argument("--calibrator", dest="activation_calibrator", choices=["max", "percentile", "mse", "entropy"], help=f"activation calibrator (default: the recipe's; the presets': {r.activation_calibrator})")
    g.add_argument("--percentile", type=float, help=f"percentile for the percentile calibrator (default: the recipe's, {r.percentile})")
    g.add_argument("--timesteps", dest="num_timesteps", type=int, help="calibration timesteps, spread uniformly over the trajectory " + size("num_timesteps"))
    g.add_argument("--samples", dest="samples_per_timestep", type=int, help="calibration samples per timestep " + size("samples_per_timestep"))
    g.add_argument("--calib-steps", dest="calibration_steps", type=int, help="length of the calibration trajectory (its denoising loop) " + size("calibration_steps"))
    g.add_argument("--calib-batch", dest="batch_size", type=int, help="trajectories per batch during calibration " + size("batch_size"))
    g.add_argument("--calib-scheduler", dest="calib_scheduler", metavar="NAME", help=f"diffusers scheduler of the calibration trajectory; --sampler is the sampling one (default: the recipe's, {r.scheduler})")
    g.add_argument("--scheduler", dest="calib_scheduler", action=_DeprecatedAlias, new="--calib-scheduler", help=argparse.SUPPRESS)
    g.add_argument("--split-shortcut", action=argparse.BooleanOptionalAction, default=None, help="per-branch quantization of skip-concat convolutions (default: the recipe's; the presets: on)")
    g.add_argument("--split-conv1", action=argparse.BooleanOptionalAction, default=None, help="also split the up-block resnets' conv1, which sees the concat after GroupNorm+SiLU (default: the recipe's; the presets: off)")
    g.add_argument("--timestep-sampling", choices=["uniform", "tdac"], help="how the calibration samples are spread over the trajectory: uniform (Q-Diffusion) or tdac (EDA-DM: by density and diversity of the mid-block attention input) (default: the recipe's; the presets: uniform)")
    g.add_argument("--tdac-lambda", type=float, help=f"TDAC's weight of diversity against density (default: the recipe's, {r.tdac_lambda})")
    g.add_argument("--tdac-r", type=_tdac_radius, help=f"TDAC's density radius in MSE of the mid-block features, or auto (the median pairwise MSE) (default: the recipe's, {r.tdac_r})")


def _tdac_radius(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a number") from None


def _add_reconstruction(p: argparse.ArgumentParser) -> None:
    from qdiff.calib.reconstruct.settings import DEFAULT_ITERATIONS, METHODS, ReconstructionSettings

    d = ReconstructionSettings()
    g = p.add_argument_group("reconstruction")
    g.add_argument("--method", choices=METHODS, default=d.method, help="adaround-brecq (Q-Diffusion) or fbr (EDA-DM) (default: %(default)s)")
    g.add_argument("--iterations", type=int, help=f"iterations per unit (default: {DEFAULT_ITERATIONS['adaround-brecq']} for adaround-brecq, {DEFAULT_ITERATIONS['fbr']} for fbr)")
    g.add_argument("--batch", dest="batch_size", type=int, default=d.batch_size, help="samples per iteration (default: %(default)s)")
    g.add_argument("--weight-lr", type=float, default=d.weight_lr, help="Adam lr of the rounding variables (default: %(default)s)")
    g.add_argument("--round-weight", type=float, default=d.round_weight, help="lambda of AdaRound's rounding regulariser (default: %(default)s)")
    g.add_argument("--beta", nargs=2, type=float, metavar=("START", "END"), default=(d.beta_start, d.beta_end), help="regulariser beta, annealed after the warm-up (default: 20 2)")
    g.add_argument("--warmup", type=float, default=d.warmup, help="fraction of iterations without the regulariser (default: %(default)s)")
    g.add_argument("--layer-loss-weight", type=float, default=d.layer_loss_weight, help="gamma of FBR's per-layer output terms (default: %(default)s)")
    g.add_argument("--qdrop", dest="qdrop_p", type=float, help="QDrop probability of a float input element (default: 0.5 for fbr, 0 for adaround-brecq)")
    g.add_argument("--learn-act-steps", dest="learn_activation_steps", action=argparse.BooleanOptionalAction, default=None, help="learn activation step sizes (LSQ) (default: on for fbr, off for adaround-brecq)")
    g.add_argument("--act-lr", dest="activation_lr", type=float, default=d.activation_lr, help="Adam lr (cosine schedule) of the activation steps (default: %(default)s)")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of minibatches and QDrop masks (default: %(default)s)")


def _reconstruction_settings(args: argparse.Namespace):
    import torch

    from qdiff.calib.reconstruct.settings import ReconstructionSettings

    return ReconstructionSettings(
        method=args.method, iterations=args.iterations, batch_size=args.batch_size, weight_lr=args.weight_lr, round_weight=args.round_weight,
        beta_start=args.beta[0], beta_end=args.beta[1], warmup=args.warmup, layer_loss_weight=args.layer_loss_weight, qdrop_p=args.qdrop_p,
        learn_activation_steps=args.learn_activation_steps, activation_lr=args.activation_lr,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), seed=args.seed,
    )


def _add_finetune(p: argparse.ArgumentParser) -> None:
    from qdiff.calib.quest.settings import STAGES, FinetuneSettings

    d = FinetuneSettings()
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--stages", nargs="+", choices=STAGES, default=list(d.stages), help="stages in order (default: %(default)s)")
    g.add_argument("--iterations", nargs="+", type=int, default=[d.iterations], help="iterations per stage: one number for all, or one per stage (default: %(default)s)")
    g.add_argument("--batch", dest="batch_size", type=int, default=d.batch_size, help="calibration samples per iteration (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam lr of the selected layers' float weights (default: %(default)s, QuEST's)")
    g.add_argument("--learn-act-steps", dest="learn_activation_steps", action=argparse.BooleanOptionalAction, default=d.learn_activation_steps, help="also train the selected layers' activation steps (default: off)")
    g.add_argument("--act-lr", dest="activation_lr", type=float, default=d.activation_lr, help="Adam lr of the activation steps (default: %(default)s)")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the minibatches (default: %(default)s)")


def _finetune_settings(args: argparse.Namespace):
    import torch

    from qdiff.calib.quest.settings import FinetuneSettings

    iterations = args.iterations[0] if len(args.iterations) == 1 else tuple(args.iterations)
    return FinetuneSettings(
        stages=tuple(args.stages), iterations=iterations, batch_size=args.batch_size, lr=args.lr, learn_activation_steps=args.learn_activation_steps,
        activation_lr=args.activation_lr, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), seed=args.seed,
    )


def _recipe_overrides(args: argparse.Namespace) -> dict:
    keys = ("activation_calibrator", "percentile", "num_timesteps", "samples_per_timestep", "calibration_steps", "batch_size", "split_shortcut", "split_conv1", "timestep_sampling", "tdac_lambda", "tdac_r")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _conditioning(args: argparse.Namespace) -> dict:
    return {"prompts": args.prompts, "class_labels": args.class_labels, "embeddings": args.embeddings, "random_conditioning": args.random_conditioning}


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "dpm++", "euler", "euler-a", "pndm"], help="diffusers scheduler of the sampling loop (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    p.add_argument("--num-images", type=int, default=8, help="images to generate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance scale (default: %(default)s)")
    p.add_argument("--ort-arithmetic", choices=["exact", "fused-int8"], default="exact",
                   help="how ONNX Runtime computes Q/DQ graphs: exact = float simulation, TensorRT's arithmetic on every CPU; "
                        "fused-int8 = ORT's integer kernels, faster, but they saturate on x86 CPUs without VNNI (default: %(default)s)")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="quality of a quantized graph vs its FP32 graph: per-step error, PSNR/SSIM, shape-FD, plots")
    p.add_argument("model", nargs="?", type=Path, help="local diffusers folder (default: the one the FP32 graph was exported from, else the built-in model)")
    p.add_argument("--run-dir", type=Path, help="output folder of `qdiff run` (its denoiser.onnx and Q/DQ graph) (default: none; then --fp32 and --quantized)")
    p.add_argument("--fp32", type=Path, help="FP32 graph (default with --run-dir: <run-dir>/denoiser.onnx)")
    p.add_argument("--quantized", type=Path, help="quantized (Q/DQ) graph (default with --run-dir: the run's)")
    p.add_argument("-o", "--out", type=Path, default=Path("qdiff-eval"), help="output folder for eval.json/.md and plots (default: %(default)s)")
    p.add_argument("--no-shape-fd", dest="shape_fd", action="store_false", help="skip shape-FD (default: computed for the shipped shapes models only)")
    p.add_argument("--allow-nonfinite", action="store_true", help="continue when a step returns NaN/Inf")
    _sampling_args(p)
    _add_conditioning(p)
    from qdiff.harness_settings import HarnessSettings

    d = HarnessSettings()
    g = p.add_argument_group("evaluation harness (with --calib: PyTorch fake-quant models of calibration tables vs FP32, on --device, n images x seed sets, bootstrap intervals; docs/evaluation.md)")
    g.add_argument("--calib", action="append", type=Path, metavar="TABLE", help="calibration table to evaluate (repeatable: one candidate each) (default: none, the ONNX graph comparison above)")
    g.add_argument("--reconstruction", action="append", type=Path, metavar="WEIGHTS", help="reconstruction.safetensors for the --calib of the same position (repeatable) (default: round-to-nearest)")
    g.add_argument("--label", action="append", dest="labels", metavar="NAME", help="row label for the --calib of the same position (default: its recipe name, -<method> with a reconstruction)")
    g.add_argument("--baseline", metavar="LABEL", help="candidate the others are compared with (default: the first)")
    g.add_argument("--decomposition", action="store_true", help="also evaluate weights-only and activations-only quantization of every table")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--images", type=int, default=d.images, help="images per seed set (default: %(default)s)")
    g.add_argument("--seed-sets", type=int, default=d.seed_sets, help="disjoint seed sets; set k uses seeds --seed + k*images ... (default: %(default)s)")
    g.add_argument("--step-images", type=int, default=d.step_images, help="images per seed set whose FP32 trajectory gives the per-step error (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per UNet call (default: %(default)s)")
    g.add_argument("--bootstrap", type=int, default=d.bootstrap, help="bootstrap replicates (default: %(default)s)")


def _harness(args: argparse.Namespace):
    """`qdiff eval --calib ...`: the evaluation harness."""
    import torch

    from qdiff import api
    from qdiff.core.errors import EvaluationError

    if args.run_dir or args.fp32 or args.quantized:
        raise EvaluationError("--calib evaluates fake-quant models of tables; it takes no --run-dir, --fp32 or --quantized", hint="drop those, or drop --calib for the ONNX graph comparison")
    if any(getattr(args, k) for k in ("prompts", "class_labels", "embeddings", "random_conditioning")):
        raise EvaluationError("the harness conditions class-conditional models on every class in turn; it takes no --prompt, --class, --embeddings or --random-conditioning")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return api.evaluate_table(
        args.model, args.calib, args.out, weights=args.reconstruction, labels=args.labels, decomposition=args.decomposition, baseline=args.baseline,
        images=args.images, seed_sets=args.seed_sets, step_images=args.step_images, batch_size=args.batch_size, bootstrap=args.bootstrap,
        steps=args.steps, seed_offset=args.seed, guidance_scale=args.guidance_scale, scheduler=args.sampler, device=device, shape_fd=args.shape_fd,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qdiff", description="Post-training quantization of diffusion denoisers: export -> calibrate -> quantize -> sample.")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines; the path of the results is still printed")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="the whole pipeline on a model (default: the built-in model), FP32 vs quantized report")
    p.add_argument("model", nargs="?", type=Path, help="local diffusers folder (default: built-in model)")
    p.add_argument("-o", "--out", type=Path, default=Path("qdiff-out"), help="output folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="redo every stage even if its artifact is up to date")
    from qdiff.calib.reconstruct.settings import DEFAULT_ITERATIONS, METHODS

    p.add_argument("--reconstruct", dest="reconstruct_method", choices=list(METHODS), help="reconstruct the weights after calibration (default: round-to-nearest)")
    p.add_argument("--reconstruct-iterations", type=int, help="iterations per unit with --reconstruct (default: the method's, " + " / ".join(f"{m} {n}" for m, n in DEFAULT_ITERATIONS.items()) + ")")
    p.add_argument("--reconstruct-device", help="device for --reconstruct (default: cuda if available, else cpu)")
    p.add_argument("--calib-device", default="cpu", help="torch device of the calibration trajectories and observers, cpu or cuda[:N], as calibrate's --device (default: %(default)s)")
    _add_recipe(p, run=True)
    _sampling_args(p)
    _add_conditioning(p)

    p = sub.add_parser("export", help="export the denoiser to ONNX and check it against PyTorch")
    p.add_argument("model", type=Path, help="local diffusers pipeline or UNet folder")
    p.add_argument("-o", "--out", type=Path, required=True, help="output .onnx file or folder")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s; TensorRT 8.6 parses up to 17)")
    p.add_argument("--external-data", action="store_true", default=None, help="store weights in a .data file (default: only above 2 GB)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the ONNX Runtime vs PyTorch check (default: check)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="graph float type: fp32 (TensorRT 8.6 with its FP16 flag) or fp16 (FP16 weights/activations, FP32 I/O, FP32 only where FP16 would overflow; what TensorRT >= 10 strongly typed needs; writes denoiser.fp16.onnx) (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="export again even if the graph is up to date")

    p = sub.add_parser("calibrate", help="timestep-uniform calibration; writes a calibration table")
    p.add_argument("model", type=Path, help="local diffusers pipeline or UNet folder")
    p.add_argument("-o", "--out", type=Path, required=True, help="output .json file or folder (a folder gets calibration.json)")
    p.add_argument("--force", action="store_true", help="calibrate again even if the table is up to date")
    p.add_argument("--device", default="cpu",
                   help="torch device of the calibration trajectories and observers: cpu or cuda[:N]. "
                        "Not cuda-if-available: ranges differ in the last bits between devices, so the device type is part of the table's manifest "
                        "(a table from another device type is recalibrated), and the default does not change with the machine (default: %(default)s)")
    _add_recipe(p)
    _add_conditioning(p)

    p = sub.add_parser("reconstruct", help="weight reconstruction (AdaRound-BRECQ or EDA-DM's FBR) of a calibrated model; writes reconstruction.safetensors + a table")
    p.add_argument("model", type=Path, help="the local diffusers folder the table was calibrated on")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (or .safetensors file)")
    p.add_argument("--calib", type=Path, required=True, help="calibration table from `qdiff calibrate`")
    p.add_argument("--force", action="store_true", help="reconstruct again even if the result is up to date")
    _add_reconstruction(p)
    _add_conditioning(p)

    p = sub.add_parser("finetune", help="QuEST's selective fine-tuning (time embedding, then attention) of a calibrated or reconstructed model; writes finetune.safetensors + a table")
    p.add_argument("model", type=Path, help="the local diffusers folder the table was calibrated on")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (or .safetensors file)")
    p.add_argument("--calib", type=Path, required=True, help="calibration table (with --reconstruction: the reconstruction.calibration.json beside it)")
    p.add_argument("--reconstruction", type=Path, help="start from these integers (reconstruction.safetensors from `qdiff reconstruct`) (default: none, round-to-nearest)")
    p.add_argument("--force", action="store_true", help="fine-tune again even if the result is up to date")
    _add_finetune(p)
    _add_conditioning(p)

    p = sub.add_parser("quantize", help="insert Q/DQ nodes into an exported graph (or INT4 weight-only MatMul/Gemm weights)")
    p.add_argument("onnx", type=Path, help="FP32 graph from `qdiff export` (denoiser.onnx)")
    p.add_argument("--calib", type=Path, help="calibration table from `qdiff calibrate` (required, except with --int4-weight-only)")
    p.add_argument("--int4-weight-only", action="store_true", help="INT4 block-quantized MatMul/Gemm weights, activations untouched (opset 21, TensorRT >= 10); no --calib; writes <stem>.int4wo.onnx (denoiser.int4wo.onnx for denoiser.onnx) beside the graph or into -o DIR")
    p.add_argument("--block-size", type=int, help="with --int4-weight-only: weights per scale along the input channels (default: 128)")
    p.add_argument("-o", "--out", type=Path, help="output .onnx or folder (default: <stem>.<recipe>[-<method>][.fp16|.fp16-op17].onnx beside the graph, e.g. denoiser.w8a8.onnx; -<method> with --reconstruction)")
    p.add_argument("--placement", choices=["all", "conv", "conv-ff"], help="named Q/DQ placement (docs/int8-engines.md): all calibrated layers, convolutions only, or convolutions + feed-forward Linears (default: none, the table's recipe decides)")
    p.add_argument("--ops", help="quantize only these op types (subset of the table's, e.g. Conv,ConvTranspose) (default: the table's recipe's)")
    p.add_argument("--exclude", action="append", metavar="PATTERN", help="keep matching modules in float (fnmatch; repeatable; replaces the recipe's list) (default: the recipe's; the presets': conv_in, conv_out)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="float type of the written graph, from the FP32 export: fp32 (opset 17, TensorRT 8.6) or fp16 (opset >= 19, FP16 scales and DequantizeLinear outputs, FP32 I/O, FP32 islands where FP16 would overflow; TensorRT >= 10 strongly typed; <stem>.<recipe>.fp16.onnx, e.g. denoiser.w8a8.fp16.onnx) (default: %(default)s)")
    p.add_argument("--opset", type=int, help="with --dtype fp16: 19 (FP16 Q/DQ, TensorRT >= 10) or 17 (the FP16 graph TensorRT 8.6 parses: each Q/DQ pair an FP32 island, Cast to FLOAT -> Q/DQ with FP32 scales -> Cast to FLOAT16, INT8 weight initializers; <stem>.<recipe>.fp16-op17.onnx) (default: 19 for --dtype fp16; the FP32 graph keeps the export's opset, INT4 weight-only is opset 21)")
    p.add_argument("--reconstruction", type=Path, help="reconstruction.safetensors from `qdiff reconstruct`: use its integer weights (pass its reconstruction.calibration.json as --calib) (default: none, round-to-nearest)")
    p.add_argument("--force", action="store_true", help="quantize again even if the graph is up to date")

    _add_eval(sub)

    p = sub.add_parser("sample", help="generate images with PyTorch or an ONNX graph")
    p.add_argument("model", nargs="?", type=Path, help="local diffusers folder (default: built-in model)")
    p.add_argument("-o", "--out", type=Path, default=Path("qdiff-samples"), help="output folder for the PNGs and grid.png (default: %(default)s)")
    p.add_argument("--onnx", type=Path, help="run this ONNX graph (FP32 or Q/DQ) with ONNX Runtime instead of PyTorch (default: PyTorch)")
    p.add_argument("--engine", type=Path, help="run this TensorRT engine folder (from `qdiff build`) on the GPU (default: PyTorch)")
    p.add_argument("--allow-nonfinite", action="store_true", help="continue when a step returns NaN/Inf")
    _sampling_args(p)
    _add_conditioning(p)
    p = sub.add_parser("build", help="build a TensorRT engine from an exported or quantized ONNX graph (GPU)")
    p.add_argument("onnx", type=Path, help="graph from `qdiff export` (fp16/fp32) or `qdiff quantize` (int8/w4a8)")
    p.add_argument("-o", "--out", type=Path, required=True, help="engine folder (engine.plan + manifest + layers.json)")
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8", "w4a8", "int4-weight-only"], help="engine precision; int8/w4a8/int4-weight-only need a quantized graph (default: %(default)s)")
    g = p.add_argument_group("optimization profile (min,opt,max; one value fixes a dimension)")
    g.add_argument("--batch", default="1,2,4", help="batch range (default: %(default)s; CFG doubles the batch)")
    g.add_argument("--size", help="height=width range in the sample's pixels (latent pixels for latent models; default: the model's sample_size)")
    g.add_argument("--tokens", default="77", help="text tokens range (default: %(default)s)")
    g.add_argument("--shape", action="append", default=[], metavar="NAME=MIN:OPT:MAX", help="explicit range for one input, e.g. sample=1x4x64x64:2x4x64x64:4x4x64x64 (repeatable; default: from --batch/--size/--tokens)")
    g = p.add_argument_group("builder")
    g.add_argument("--workspace-gib", type=float, help="workspace memory limit (default: TensorRT's, the GPU's memory)")
    g.add_argument("--float-layers", choices=["fp16"], help="TensorRT < 10 only (an error on >= 10, whose strongly typed networks take precisions from the graph): pin the float layers of a Q/DQ network to FP16 (default: TensorRT chooses)")
    g.add_argument("--opt-level", dest="optimization_level", type=int, help="builder optimization level 0-5 (default: TensorRT's 3; INT8/W4A8 on TensorRT >= 10: 4, not measured here; lower builds faster)")
    g.add_argument("--tactic-sources", help="comma-separated: cublas,cublas_lt,cudnn,edge_mask_convolutions,jit_convolutions (default: $QDIFF_TRT_TACTIC_SOURCES or TensorRT's); sources this TensorRT lacks (cuBLAS/cuDNN on 11.x) are left out with a log line")
    g.add_argument("--timing-cache", type=Path, help="timing cache file to reuse and update across builds (default: none)")
    g.add_argument("--strongly-typed", action="store_true", help="insist on a strongly typed network (TensorRT >= 10 builds one anyway; refused on 8.6): layers run in the graph's own types, so it needs an FP16 graph (qdiff export --dtype fp16) (default: off)")
    p.add_argument("--force", action="store_true", help="rebuild even if the engine is up to date")

    p = sub.add_parser("inspect", help="per-layer precision of an engine: INT8 coverage by MACs, fallbacks, reformats")
    p.add_argument("engine", type=Path, help="engine folder from `qdiff build`")
    p.add_argument("--onnx", type=Path, help="the graph it was built from (default: the path in its manifest)")
    p.add_argument("--profile", action="store_true", help="also time every layer with TensorRT's profiler (GPU) (default: off)")
    p.add_argument("--runs", type=int, default=20, help="profiled calls; the median per layer is kept (default: %(default)s)")
    p.add_argument("-o", "--out", type=Path, help="folder for inspect.json/inspect.md (default: the engine folder)")
    for p in sub.choices.values():  # every flag's help says its default, as the options' do
        for action in p._actions:
            if isinstance(action, argparse._StoreTrueAction) and action.help and "default" not in action.help:
                action.help += " (default: off)"
    for p in sub.choices.values():  # also accepted after the subcommand; SUPPRESS keeps an earlier flag
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or log lines; the path of the results is still printed")
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    from qdiff import api
    from qdiff.calib.recipe import load_recipe

    if args.command == "run":
        rec = None
        if args.reconstruct_method:
            import torch

            rec = {"iterations": args.reconstruct_iterations, "device": args.reconstruct_device or ("cuda" if torch.cuda.is_available() else "cpu")}
        # --calib-scheduler goes into the recipe: api.run's `scheduler` is the sampling one (--sampler)
        recipe = load_recipe(args.recipe, scheduler=args.calib_scheduler) if args.calib_scheduler else args.recipe
        result = api.run(args.model, args.out, recipe=recipe, scheduler=args.sampler, steps=args.steps, num_images=args.num_images, seed=args.seed, guidance_scale=args.guidance_scale, ort_arithmetic=args.ort_arithmetic, force=args.force, reconstruct_method=args.reconstruct_method, reconstruct_settings=rec, calib_device=args.calib_device, **_conditioning(args), **_recipe_overrides(args))
        print(result.report_paths[1])  # where the results went, also with --quiet
    elif args.command == "export":
        result = api.export_model(args.model, args.out, opset=args.opset, external_data=args.external_data, force=args.force, check=args.check, dtype=args.dtype)
        print(result.onnx_path)
    elif args.command == "calibrate":
        result = api.calibrate(args.model, args.out, args.recipe, scheduler=args.calib_scheduler, force=args.force, device=args.device, **_conditioning(args), **_recipe_overrides(args))
        print(result.table_path)
    elif args.command == "reconstruct":
        result = api.reconstruct(args.model, args.out, args.calib, _reconstruction_settings(args), force=args.force, **_conditioning(args))
        print(result.weights_path)
    elif args.command == "finetune":
        result = api.finetune(args.model, args.out, args.calib, _finetune_settings(args), reconstruction=args.reconstruction, force=args.force, **_conditioning(args))
        print(result.weights_path)
    elif args.command == "quantize" and args.int4_weight_only:
        result = api.quantize_int4_weight_only(args.onnx, args.out, block_size=args.block_size or 128, exclude=tuple(args.exclude or ()), force=args.force, dtype=args.dtype, opset=args.opset)
        print(result.onnx_path)
    elif args.command == "quantize":
        ops = tuple(o.strip() for o in args.ops.split(",") if o.strip()) if args.ops else None
        result = api.quantize_onnx(args.onnx, args.calib, args.out, force=args.force, placement=args.placement, quantize_ops=ops, exclude=tuple(args.exclude) if args.exclude else None, dtype=args.dtype, reconstruction=args.reconstruction, opset=args.opset)
        print(result.onnx_path)
    elif args.command == "eval" and args.calib:
        _harness(args)
        print(Path(args.out) / "harness.md")
    elif args.command == "eval":
        from qdiff.evaluate import evaluate

        result = evaluate(args.model, args.fp32, args.quantized, args.out, run_dir=args.run_dir, scheduler=args.sampler, steps=args.steps, num_images=args.num_images, seed=args.seed, guidance_scale=args.guidance_scale, shape_fd=args.shape_fd, allow_nonfinite=args.allow_nonfinite, ort_arithmetic=args.ort_arithmetic, **_conditioning(args))
        print(result.paths["markdown"])
    elif args.command == "build":
        from qdiff.engines.profiles import parse_range, parse_shape_spec

        shapes = dict(parse_shape_spec(spec) for spec in args.shape)
        result = api.build_engine(
            args.onnx,
            args.out,
            precision=args.precision,
            batch=parse_range(args.batch, "--batch"),
            size=parse_range(args.size, "--size") if args.size else None,
            tokens=parse_range(args.tokens, "--tokens"),
            shapes=shapes,
            workspace_gib=args.workspace_gib,
            optimization_level=args.optimization_level,
            tactic_sources=args.tactic_sources,
            timing_cache=args.timing_cache,
            strongly_typed=args.strongly_typed,
            float_layers=args.float_layers,
            force=args.force,
            verbose=args.verbose,
        )
        print(result.engine_path)
    elif args.command == "inspect":
        from qdiff.engines.inspector import to_markdown

        report = api.inspect_engine(args.engine, onnx=args.onnx, profile=args.profile, runs=args.runs, out=args.out)
        print(to_markdown(report, title=f"{args.engine}"), end="")
        out = args.out if args.out is not None else (args.engine if args.engine.suffix != ".plan" else args.engine.parent)
        print(Path(out) / "inspect.md")  # where the report went, also with --quiet
    elif args.command == "sample":
        if args.onnx and args.engine:
            raise SamplingError("give --onnx or --engine, not both")
        backend = "tensorrt" if args.engine else "onnxruntime" if args.onnx else "pytorch"
        api.sample(args.model, args.out, backend=backend, onnx=args.onnx, engine=args.engine, scheduler=args.sampler, steps=args.steps, num_images=args.num_images, seed=args.seed, guidance_scale=args.guidance_scale, allow_nonfinite=args.allow_nonfinite, ort_arithmetic=args.ort_arithmetic, **_conditioning(args))
        print(Path(args.out) / "grid.png")  # where the images went, also with --quiet
    return 0


def _check_quantize_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--calib is required for Q/DQ insertion only; INT4 weight-only takes its scales from the weights."""
    if args.int4_weight_only:
        if args.calib is not None or args.ops or args.placement or args.reconstruction is not None:
            parser.error("quantize --int4-weight-only takes no --calib, --ops, --placement or --reconstruction (its scales come from the weights)")
    elif args.placement and (args.ops or args.exclude):
        parser.error("--placement sets the quantized ops and exclusions itself; give it or --ops/--exclude, not both")
    elif args.block_size is not None:
        parser.error("--block-size applies to --int4-weight-only only")
    elif args.calib is None:
        parser.error("quantize needs --calib TABLE (from `qdiff calibrate`), or --int4-weight-only for INT4 weight-only MatMul/Gemm weights")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "quantize":
        _check_quantize_args(parser, args)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.quiet:
        os.environ["QDIFF_QUIET"] = "1"
    try:
        return _dispatch(args)
    except QdiffError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"qdiff {args.command}: error: {_one_line(exc.message)}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {_one_line(exc.hint)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the machine, not qdiff: no space left, no permission, ...
        if args.verbose:
            traceback.print_exc()
        print(f"qdiff {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        print("  hint: check the path, its permissions and the free disk space; --verbose shows where it happened", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"qdiff {args.command}: interrupted; finished artifacts are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
