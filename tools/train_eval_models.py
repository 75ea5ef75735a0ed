#!/usr/bin/env python3
"""Train the two evaluation models (scenes-ddpm, scenes-cond) and the scenes classifier in one GPU run.

Why this exists
---------------
The shipped shapes models are small and briefly trained, so quantization experiments on them
cannot tell methods apart (issue 15). The evaluation models are larger, trained on a harder
dataset (`qdiff.datasets.scenes`), and laid out like the UNets the papers evaluate on
(docs/eval-models.md):

* ``scenes-ddpm``: an unconditional ``UNet2DModel`` in the CIFAR-10 DDPM layout (4 levels,
  2 resnets per level, self-attention at 16x16 and in the mid block), 32x32 RGB;
* ``scenes-cond``: its class-conditional twin, a ``UNet2DConditionModel`` whose 16x16 level and
  mid block hold transformer blocks (self-attention, cross-attention, GEGLU FF) that read 4
  learned tokens per class; the last row is the null class for classifier-free guidance.

``--width 64`` (default) is the layout at half width (64/128/128/128, 8.95 M parameters), so the
fp16 files fit the GPU machine's transfer limits; ``--width 128`` is the paper's 128/256/256/256.

Their weights are not committed: this command reproduces them bit-for-bit on an H200
(step-driven schedule, fixed seeds and data order, deterministic kernels), and the sha256 of
each fp16 file is recorded (metrics.json, docs/eval-models.md). One command does it all:

1. generate the dataset (16 processes, before CUDA is touched);
2. train the scenes classifier (its folder goes to ``<out>/scene-classifier``);
3. with ``--steps auto``, probe both UNets' step rate in parallel and pick the steps that fit
   ``--budget-s`` (printed and recorded; pass them back as ``--steps`` to reproduce);
4. train both UNets, in two processes on the one GPU with ``--parallel``; each saves its EMA
   weights as fp16, reloads them, samples n images in FP32 and scores them (shape-FD vs real
   test images, class accuracy of CFG samples);
5. write the loss curves, metrics.json and train_log.json (updated after every phase), and with
   ``--pack DIR`` the model folders as <= 15 MB parts + manifest (tools/unpack_eval_models.py).

Usage::

    # H200, ~9 minutes in all
    python tools/train_eval_models.py --device cuda --out $OUT/train --pack $OUT --budget-s 360 --parallel
    python tools/train_eval_models.py --device cuda --out out/probe --probe 60 --parallel --budget-s 360
    python tools/train_eval_models.py --device cuda --out out/det --check-determinism 50 --parallel
    python tools/train_eval_models.py --device cuda --out out/modes --probe-modes 60 --parallel   # steps/s per --determinism mode
    python tools/train_eval_models.py --smoke --device cpu --out /tmp/eval-smoke --parallel
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(TOOLS))

import train_default_models as tdm  # noqa: E402
import train_shape_classifier as tsc  # noqa: E402
import unpack_eval_models as pack_tool  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402

from qdiff.core.artifacts import sha256_file, write_json_atomic  # noqa: E402
from qdiff.datasets import scenes  # noqa: E402
from qdiff.datasets import shape_classifier as sc  # noqa: E402
from qdiff.datasets.registry import write_dataset_file  # noqa: E402
from qdiff.datasets.shape_fd import load_classifier  # noqa: E402
from qdiff.datasets.shapes import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES  # noqa: E402

DATASET = "scenes"
MODEL_NAMES = {"ddpm": "scenes-ddpm", "cond": "scenes-cond"}
CROSS_ATTENTION_DIM = 128
MAX_WEIGHT_BYTES = 24e6  # fp16 UNet + class tokens per folder at --width 64; the 128 layout is ~4x
DEFAULT_MODELS_DIR = REPO / ".eval-models"


# --------------------------------------------------------------------------- #
# Model layouts
# --------------------------------------------------------------------------- #
def unet_configs(width: int) -> dict[str, dict[str, Any]]:
    """The CIFAR-10 DDPM layout at base width ``width`` (paper: 128), and its conditional twin."""
    channels = (width, 2 * width, 2 * width, 2 * width)  # resolutions 32, 16, 8, 4
    common = {"sample_size": IMAGE_SIZE, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
              "block_out_channels": channels, "norm_num_groups": math.gcd(32, width)}  # 32 from width 32 up  # fmt: skip
    ddpm = {**common,
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": None}  # one head over all channels, as in the DDPM paper  # fmt: skip
    cond = {**common,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "cross_attention_dim": CROSS_ATTENTION_DIM,
            "attention_head_dim": 4}  # diffusers' legacy name: the number of heads  # fmt: skip
    return {"ddpm": ddpm, "cond": cond}


def build(kind: str, width: int, seed: int) -> tuple[torch.nn.Module, tdm.ClassTokens | None]:
    """A freshly initialised UNet (and class tokens for cond), from a fixed seed, on the CPU."""
    torch.manual_seed(seed)
    config = unet_configs(width)[kind]
    if kind == "ddpm":
        return UNet2DModel(**config), None
    unet = UNet2DConditionModel(**config)
    return unet, tdm.ClassTokens(NUM_CLASSES, tdm.CLASS_TOKENS, CROSS_ATTENTION_DIM)


# --------------------------------------------------------------------------- #
# Determinism
# --------------------------------------------------------------------------- #
DETERMINISM_MODES = ("strict", "warn", "off")
PROBE_VARIANTS = ("eager", "channels-last", "compile", "compile+channels-last")


def make_deterministic(strict: bool = True, mode: str | None = None) -> None:
    """Deterministic kernels for the UNets' training (``strict``). It must be strict: with
    ``warn_only`` PyTorch keeps the flash / memory-efficient attention backward kernels, which
    add with atomics, and only warns. The classifier runs with ``strict=False``: its
    AdaptiveAvgPool2d backward has no deterministic CUDA kernel, and its weights are committed
    rather than reproduced.

    ``mode`` overrides ``strict``: "strict", "warn" (deterministic where a kernel exists) or
    "off" (cuDNN benchmarking, any kernel: not bit-for-bit). "off" exists to measure what
    determinism costs (`--probe-modes`): the strict run of 2026-12-02 trained at 9.0 / 6.7
    steps/s where the shipped models, nondeterministic, reached 32.5 / 24.9."""
    mode = mode or ("strict" if strict else "warn")
    if mode not in DETERMINISM_MODES:
        raise ValueError(f"determinism mode {mode!r}: choose one of {', '.join(DETERMINISM_MODES)}")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
    torch.use_deterministic_algorithms(mode != "off", warn_only=mode == "warn")
    # Filling every new tensor with NaN (the mode's default) costs time and changes no result
    # of code that never reads memory before writing it.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = mode != "off"
    torch.backends.cudnn.benchmark = mode == "off"
    # FP32 means FP32 (the evaluation samples in it); training runs under bf16 autocast anyway.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# --------------------------------------------------------------------------- #
# One model's job (runs in a worker process with --parallel, in-process otherwise)
# --------------------------------------------------------------------------- #
def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train (or probe) one model as ``job`` says; writes ``<name>.result.json`` to the job's folder."""
    device = torch.device(job["device"])
    make_deterministic(mode=job["determinism"])
    kind, name = job["kind"], MODEL_NAMES[job["kind"]]
    work = Path(job["work_dir"])
    images = torch.as_tensor(np.load(work / "train_x.npy")).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.as_tensor(np.load(work / "train_y.npy")).to(device)
    scheduler = DDPMScheduler(**tdm.SCHEDULER_CONFIG)
    unet, tokens = build(kind, job["width"], job["seed"] + (1 if kind == "ddpm" else 2))
    channels_last = bool(job.get("channels_last"))
    unet = unet.to(device, memory_format=torch.channels_last) if channels_last else unet.to(device)
    modules: list[torch.nn.Module] = [unet]
    # torch.compile fuses the UNet's elementwise work (GroupNorm, SiLU, residual adds), which at
    # batch 256 and 32x32 moves more bytes than the convolutions compute; the EMA, saving and
    # evaluation use `unet` itself (the compiled wrapper shares its parameters).
    compiled = tdm.maybe_compile(unet, bool(job.get("compile")))
    fwd = (lambda x, *a, **k: compiled(x.contiguous(memory_format=torch.channels_last), *a, **k)) if channels_last else compiled  # noqa: E731
    if tokens is not None:
        tokens = tokens.to(device)
        modules.append(tokens)
        denoise = lambda x, t, y: fwd(x, t, encoder_hidden_states=tokens(y)).sample  # noqa: E731
    else:
        denoise = lambda x, t, y: fwd(x, t).sample  # noqa: E731
    cfg = tdm.TrainConfig(steps=job["steps"], batch_size=job["batch_size"], lr=job["lr"], warmup_steps=job["warmup_steps"],
                          ema_decay=job["ema_decay"], time_budget_s=0.0, label_dropout=job["label_dropout"] if tokens is not None else 0.0,
                          log_every=job["log_every"], grad_clip=job["grad_clip"], compile=bool(job.get("compile")),
                          seed=job["seed"] + (1 if kind == "ddpm" else 2))  # fmt: skip
    params = tdm.count_params(unet)
    layout = ", channels_last" if channels_last else ""
    print(f"[{kind}] {type(unet).__name__}: {params:,} params, {cfg.steps} steps of batch {cfg.batch_size} on {device}{layout}", flush=True)
    log = tdm.train_denoiser(kind, modules, denoise, images, labels, scheduler, cfg, device)
    log.update(params=params, name=name, deterministic_algorithms=torch.are_deterministic_algorithms_enabled())
    result: dict[str, Any] = {"kind": kind, "name": name, "train": log}
    if job.get("probe"):
        result["probe_it_s"] = steady_rate(log["history"])
        write_json_atomic(work / f"{kind}.result.json", result)
        return result

    folder = Path(job["models_dir"]) / name
    if folder.exists():
        shutil.rmtree(folder)
    if tokens is None:
        tdm.save_ddpm(folder, unet, scheduler)
    else:
        tdm.save_cond(folder, unet, tokens, scheduler)
    write_dataset_file(folder, DATASET, seed=job["seed"], train_images=int(len(labels)), layout=f"width {job['width']}")
    cls = UNet2DModel if tokens is None else UNet2DConditionModel
    reloaded = tdm.reload_and_check(folder, cls, unet, max_weight_bytes=job["max_weight_bytes"])
    from qdiff.models import load_model

    bundle = load_model(folder)  # what every qdiff stage will do with it
    result["files"] = tdm.folder_sizes(folder)
    result["sha256"] = {rel: sha256_file(folder / rel) for rel in result["files"] if rel.endswith(".safetensors")}
    result["model_sha256"] = bundle.model_sha256
    write_json_atomic(work / f"{kind}.result.json", result)
    if job.get("eval_n"):
        result["eval"] = evaluate_model(job, kind, reloaded.to(device), bundle, device)
        write_json_atomic(work / f"{kind}.result.json", result)
    return result


def steady_rate(history: list[dict[str, float]]) -> float:
    """Steps per second after the first third of a short run (start-up and warm-up excluded)."""
    if len(history) < 2:
        return float("nan")
    first = history[len(history) // 3] if len(history) >= 3 else history[0]
    last = history[-1]
    return (last["step"] - first["step"]) / max(last["elapsed_s"] - first["elapsed_s"], 1e-9)


@torch.no_grad()
def evaluate_model(job: dict[str, Any], kind: str, unet: torch.nn.Module, bundle: Any, device: torch.device) -> dict[str, Any]:
    """FP32 DDIM samples of the reloaded fp16 weights: shape-FD vs real test images, CFG class accuracy, a grid."""
    started = time.perf_counter()
    out, work = Path(job["out"]), Path(job["work_dir"])
    clf = load_classifier(Path(job["classifier_dir"]), dataset=DATASET).to(device)
    real = sc.features(clf, np.load(work / "test_x.npy"))
    n, steps = job["eval_n"], job["ddim_steps"]
    print(f"[{kind}] eval: {n} FP32 samples, {steps} DDIM steps", flush=True)
    if kind == "ddpm":
        samples = tdm.ddim_sample(unet, bundle.scheduler_config, n, device, steps, seed=job["seed"] + 100)
        labels = None
    else:
        labels = np.arange(n) % NUM_CLASSES
        states = bundle.class_embeddings.to(device)
        samples = tdm.ddim_sample(unet, bundle.scheduler_config, n, device, steps, seed=job["seed"] + 200,
                                  cond=states[torch.as_tensor(labels, device=device)], uncond=states[NUM_CLASSES],
                                  guidance_scale=job["guidance_scale"])  # fmt: skip
    predicted = sc.predict(clf, samples)
    metrics: dict[str, Any] = {
        "n_samples": n, "n_real": len(real), "ddim_steps": steps, "precision": "fp32 (TF32 off), from the fp16 files",
        "shape_fd": sc.frechet_distance(sc.features(clf, samples), real),
        "predicted_class_fraction": (np.bincount(predicted, minlength=NUM_CLASSES) / n).tolist(),
    }  # fmt: skip
    if labels is not None:
        metrics["guidance_scale"] = job["guidance_scale"]
        metrics["class_accuracy"] = sc.accuracy(predicted, labels)
        grid = tdm.class_rows(samples, labels, 10)
    else:
        grid = samples[:80]
    tdm.save_png(out / f"samples_{kind}.png", tdm.image_grid(grid, ncols=10))
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    print(f"[{kind}] eval: shape-FD {metrics['shape_fd']:.4f} at n={n}"
          + (f", class accuracy {metrics['class_accuracy']['overall']:.4f}" if labels is not None else ""), flush=True)  # fmt: skip
    return metrics


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #
SMOKE_DEFAULTS: dict[str, Any] = {
    "width": 16, "steps": "3", "batch_size": 4, "warmup_steps": 1, "log_every": 1, "train_size": 128, "eval_n": 8, "real_n": 16,
    "ddim_steps": 2, "classifier_steps": 5, "classifier_images": 128, "classifier_test": 16, "classifier_batch": 32, "probe_steps": 4,
    "max_weight_bytes": 24e6,
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="small outputs: logs, metrics, grids, the classifier")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="where the model folders are written (not --out: too big to return)")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch (the dataset as .npy); default: a temporary folder, removed at the end")
    p.add_argument("--pack", type=Path, default=None, metavar="DIR", help="also write the model folders as <= 15 MB parts + manifest here")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parallel", action="store_true", help="train both models at once, in two processes on the one device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=64, help="base channels: 64 = half the CIFAR layout (default), 128 = the paper's")
    p.add_argument("--steps", default="auto", help="auto (probe, then fill --budget-s), N, or ddpm=N,cond=M")
    p.add_argument("--budget-s", type=float, default=360.0, help="training seconds per model that --steps auto fills")
    p.add_argument("--probe", type=int, default=0, metavar="N", help="only probe: N steps of each model, print steps/s and steps for --budget-s")
    p.add_argument("--probe-steps", type=int, default=60, help="steps of the in-run probe of --steps auto")
    p.add_argument("--check-determinism", type=int, default=0, metavar="N", help="train N steps twice, compare the weight hashes, exit")
    p.add_argument("--expect", type=Path, default=None, metavar="METRICS_JSON",
                   help="an earlier run's metrics.json (docs/eval-models/metrics.json): compare this run's fp16 sha256s with it, record and print the verdict")
    p.add_argument("--nondeterministic-ok", action="store_true",
                   help="fallback if strict determinism stops on an op without a deterministic kernel: warn instead (weights then not bit-for-bit)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets for training: 1.56x / 1.24x steps/s (ddpm / cond, parallel, H200) after ~65 s of compiling (docs/eval-models.md)")
    p.add_argument("--channels-last", action="store_true",
                   help="train in NHWC (channels_last) memory format: cuDNN's tensor-core convolutions take NHWC, so NCHW pays a transpose around each; untried on the H200 (measure with --probe-variants)")
    p.add_argument("--probe-variants", nargs="+", choices=PROBE_VARIANTS, metavar="VARIANT",
                   help=f"only probe: --probe-steps steps of each model per variant ({', '.join(PROBE_VARIANTS)}), print steps/s and samples/s, exit")
    p.add_argument("--determinism", choices=DETERMINISM_MODES, default=None,
                   help="strict (default; bit-for-bit), warn (= --nondeterministic-ok), off (cuDNN benchmarking, any kernel; not bit-for-bit)")
    p.add_argument("--probe-modes", type=int, default=0, metavar="N",
                   help="only probe: N steps of each model under every --determinism mode, print the steps/s table, exit")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.12)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--train-size", type=int, default=100_000, help="scenes training images (random flips double them)")
    p.add_argument("--real-n", type=int, default=1000, help="real test images shape-FD compares against")
    p.add_argument("--eval-n", type=int, default=1000, help="samples per model for shape-FD (0: no evaluation)")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--classifier-steps", type=int, default=3000)
    p.add_argument("--classifier-images", type=int, default=50_000)
    p.add_argument("--classifier-test", type=int, default=2000)
    p.add_argument("--classifier-batch", type=int, default=256)
    p.add_argument("--max-weight-bytes", type=float, default=MAX_WEIGHT_BYTES)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of every code path")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    if "--smoke" in (argv if argv is not None else sys.argv[1:]):
        p.set_defaults(**SMOKE_DEFAULTS)
    args = p.parse_args(argv)
    if args.width % 16:
        p.error("--width must be a multiple of 16 (GroupNorm groups divide the channels)")
    return args


def parse_steps(text: str) -> dict[str, int] | None:
    """``auto`` -> None; ``N`` -> both N; ``ddpm=N,cond=M`` -> each its own."""
    if text == "auto":
        return None
    if "=" not in text:
        return {"ddpm": int(text), "cond": int(text)}
    steps = {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}
    if set(steps) != set(MODEL_NAMES):
        raise SystemExit(f"--steps {text}: name both ddpm and cond")
    return steps


def steps_text(steps: dict[str, int]) -> str:
    return f"ddpm={steps['ddpm']},cond={steps['cond']}"


class RunLog:
    """metrics.json and train_log.json, rewritten after every phase so a cut-off run keeps what finished."""

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out = out
        self.metrics: dict[str, Any] = {"status": "running", "dataset": DATASET, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        self.train: dict[str, Any] = {"models": {}}
        self.started = time.perf_counter()

    def update(self, **rows: Any) -> None:
        self.metrics.update(rows)
        self.metrics["wall_s"] = round(time.perf_counter() - self.started, 1)
        write_json_atomic(self.out / "metrics.json", self.metrics)
        write_json_atomic(self.out / "train_log.json", self.train)


def make_data(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Generate the training and real test scenes with a process pool (before CUDA exists) into ``work``."""
    t0 = time.perf_counter()
    train_x, train_y = scenes.generate(args.train_size, seed=args.seed, split="train")
    gen_s = time.perf_counter() - t0
    test_x, _ = scenes.generate(args.real_n, seed=args.seed, split="test")
    np.save(work / "train_x.npy", train_x)
    np.save(work / "train_y.npy", train_y)
    np.save(work / "test_x.npy", test_x)
    rate = len(train_x) / max(gen_s, 1e-9)
    print(f"data: {len(train_x)} train scenes in {gen_s:.1f}s ({rate:,.0f} images/s on {os.cpu_count()} CPUs), {len(test_x)} real test scenes", flush=True)
    return {"train_images": len(train_x), "test_images": len(test_x), "generate_s": round(gen_s, 2), "images_per_s": round(rate), "cpus": os.cpu_count()}


def job_for(args: argparse.Namespace, kind: str, work: Path, steps: int, *, probe: bool = False, models_dir: Path | None = None, evaluate: bool = True) -> dict[str, Any]:
    return {
        "kind": kind, "device": args.device, "work_dir": str(work), "out": str(args.out), "models_dir": str(models_dir or args.models_dir),
        "width": args.width, "seed": args.seed, "steps": steps, "batch_size": args.batch_size, "lr": args.lr,
        "warmup_steps": args.warmup_steps, "ema_decay": args.ema_decay, "label_dropout": args.label_dropout,
        "grad_clip": args.grad_clip, "log_every": max(1, min(args.log_every, steps // 2)) if probe else args.log_every,
        "probe": probe, "compile": args.compile, "channels_last": args.channels_last, "determinism": determinism_mode(args), "max_weight_bytes": args.max_weight_bytes, "classifier_dir": str(args.out / "scene-classifier"),
        "eval_n": args.eval_n if evaluate and not probe else 0, "ddim_steps": args.ddim_steps, "guidance_scale": args.guidance_scale,
    }  # fmt: skip


def _stream(proc: subprocess.Popen, log_path: Path) -> None:
    with open(log_path, "w", encoding="utf-8") as log:
        for line in proc.stdout:  # type: ignore[union-attr]
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)


def run_jobs(args: argparse.Namespace, jobs: list[dict[str, Any]], tag: str) -> dict[str, dict[str, Any]]:
    """Run the jobs, in parallel worker processes with --parallel; returns {kind: result}."""
    work = Path(jobs[0]["work_dir"])
    if not args.parallel:
        return {job["kind"]: run_job(job) for job in jobs}
    procs = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    for job in jobs:
        path = work / f"job-{tag}-{job['kind']}.json"
        write_json_atomic(path, job)
        (work / f"{job['kind']}.result.json").unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, __file__, "--out", str(args.out), "--worker", str(path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
        thread = threading.Thread(target=_stream, args=(proc, args.out / f"{tag}-{job['kind']}.log"), daemon=True)
        thread.start()
        procs.append((job["kind"], proc, thread))
    failed = []
    for kind, proc, thread in procs:
        proc.wait()
        thread.join()
        if proc.returncode != 0:
            failed.append(f"{kind} (exit {proc.returncode}, log {args.out / f'{tag}-{kind}.log'})")
    if failed:
        raise RuntimeError(f"{tag}: worker(s) failed: {', '.join(failed)}")
    return {job["kind"]: json.loads((work / f"{job['kind']}.result.json").read_text()) for job in jobs}


def probe(args: argparse.Namespace, work: Path, steps: int) -> dict[str, Any]:
    """Train ``steps`` steps of each model as the real run will (in parallel with --parallel); rates and fitting steps."""
    results = run_jobs(args, [job_for(args, kind, work, steps, probe=True) for kind in MODEL_NAMES], "probe")
    rates = {kind: r["probe_it_s"] for kind, r in results.items()}
    fit = {kind: fitting_steps(rate, args.budget_s) for kind, rate in rates.items()}
    for kind in MODEL_NAMES:
        print(f"probe: {kind} {rates[kind]:.2f} steps/s ({'parallel' if args.parallel else 'alone'}) -> {fit[kind]} steps in {args.budget_s:.0f} s", flush=True)
    return {"steps": steps, "it_s": rates, "steps_for_budget": fit, "budget_s": args.budget_s, "parallel": args.parallel}


def probe_each(args: argparse.Namespace, work: Path, steps: int, settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`probe` once per named setting (options of `args` to set for it), one after another, with
    `args` restored afterwards; per name the steps/s of each model and the probe's wall seconds."""
    names = {attr for changes in settings.values() for attr in changes}
    chosen = {attr: getattr(args, attr) for attr in names}
    table = {}
    try:
        for name, changes in settings.items():
            for attr, value in changes.items():
                setattr(args, attr, value)
            t0 = time.perf_counter()
            table[name] = {"it_s": probe(args, work, steps)["it_s"], "wall_s": round(time.perf_counter() - t0, 1)}
    finally:
        for attr, value in chosen.items():
            setattr(args, attr, value)
    return table


def probe_variants(args: argparse.Namespace, work: Path, steps: int, variants: list[str]) -> dict[str, Any]:
    """`probe` per speed variant (eager / compile, NCHW / channels_last), one after another, at the
    run's batch size: which setting buys the most training steps in a device call. The compile
    variants include their compile time in the wall but not in the steady rate."""
    table = probe_each(args, work, steps, {v: {"compile": "compile" in v.split("+"), "channels_last": "channels-last" in v.split("+")} for v in variants})
    for variant, row in table.items():
        print(f"probe-variants: {variant:22s} " + "  ".join(f"{kind} {rate:.2f} steps/s ({rate * args.batch_size:,.0f} samples/s)" for kind, rate in row["it_s"].items())
              + f"  wall {row['wall_s']} s", flush=True)
    return {"steps": steps, "batch_size": args.batch_size, "parallel": args.parallel, "variants": table}


def probe_modes(args: argparse.Namespace, work: Path, steps: int) -> dict[str, Any]:
    """`probe` under each determinism mode, one after another: what bit-for-bit costs in steps/s."""
    table = {mode: row["it_s"] for mode, row in probe_each(args, work, steps, {m: {"determinism": m} for m in DETERMINISM_MODES}).items()}
    for mode, rates in table.items():
        print(f"probe-modes: {mode:6s} " + "  ".join(f"{kind} {rate:.2f} steps/s" for kind, rate in rates.items()), flush=True)
    return {"steps": steps, "parallel": args.parallel, "it_s": table}


def fitting_steps(rate: float, budget_s: float) -> int:
    """Steps that ``rate`` fits in ``budget_s``, rounded down to a multiple of 100 from 1000 up."""
    steps = max(1, int(rate * budget_s))
    return steps // 100 * 100 if steps >= 1000 else steps


def reproduce_flags(args: argparse.Namespace, steps: dict[str, int]) -> str:
    """The options that decide the trained weights, as they go on the command line: the schedule
    and data, and the speed settings that change which kernels run (``--compile`` and
    ``--channels-last`` train the same model with other rounding, so other bits). ``--parallel``
    is not among them: each model trains in its own process either way."""
    flags = f"--steps {steps_text(steps)} --seed {args.seed} --width {args.width} --train-size {args.train_size} --batch-size {args.batch_size}"
    defaults = parse_args(["--out", "unused"])
    for name in ("lr", "warmup_steps", "ema_decay", "label_dropout", "grad_clip"):
        if getattr(args, name) != getattr(defaults, name):
            flags += f" --{name.replace('_', '-')} {getattr(args, name)}"
    flags += " --compile" * bool(args.compile) + " --channels-last" * bool(args.channels_last)
    mode = determinism_mode(args)
    if mode != "strict":  # then not bit-for-bit (metrics.json: bit_for_bit)
        flags += f" --determinism {mode}"
    return flags


def determinism_mode(args: argparse.Namespace) -> str:
    """The mode a run trains under: --determinism, else warn with --nondeterministic-ok, else strict."""
    return args.determinism or ("warn" if args.nondeterministic_ok else "strict")


def check_determinism(args: argparse.Namespace, work: Path, steps: int) -> dict[str, Any]:
    """Train ``steps`` steps twice into separate folders; the fp16 files must hash the same."""
    hashes = []
    for run in (0, 1):
        folder = work / f"determinism-{run}"
        results = run_jobs(args, [job_for(args, kind, work, steps, models_dir=folder, evaluate=False) for kind in MODEL_NAMES], f"det{run}")
        hashes.append({kind: r["sha256"] for kind, r in results.items()})
    same = hashes[0] == hashes[1]
    print(f"determinism: {steps} steps twice -> {'IDENTICAL' if same else 'DIFFERENT'} weights", flush=True)
    for kind in MODEL_NAMES:
        for rel, digest in hashes[0][kind].items():
            print(f"  {kind} {rel}: {digest[:16]} vs {hashes[1][kind][rel][:16]}")
    return {"steps": steps, "identical": same, "runs": hashes}


def train_classifier(args: argparse.Namespace, work: Path, log: RunLog) -> None:
    """The scenes classifier, trained before the UNets (their evaluation needs it), and the real-vs-real floor."""
    t0 = time.perf_counter()
    train_x, train_y = np.load(work / "train_x.npy", mmap_mode="r"), np.load(work / "train_y.npy")
    k = min(args.classifier_images, len(train_y))
    print(f"classifier: {args.classifier_steps} steps on {k} train scenes", flush=True)
    model, meta = tsc.train_and_save(DATASET, args.out / "scene-classifier", train_images=(np.ascontiguousarray(train_x[:k]), train_y[:k]),
                                     test_images=args.classifier_test, steps=args.classifier_steps, batch_size=args.classifier_batch,
                                     seed=args.seed, device=args.device)  # fmt: skip
    real = sc.features(model, np.load(work / "test_x.npy"))
    n = args.eval_n or args.real_n
    floor = sc.frechet_distance(sc.features(model, np.ascontiguousarray(train_x[:n])), real)
    print(f"classifier: held-out accuracy {meta['held_out_accuracy']['overall']:.4f}; real-vs-real shape-FD floor at n={n}: {floor:.4f} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)  # fmt: skip
    log.update(classifier=meta, real_vs_real={"shape_fd": floor, "n_train_images": n, "n_real": len(real)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.expect is not None and not args.expect.is_file():
        raise SystemExit(f"--expect {args.expect}: no such file (an earlier run's metrics.json, e.g. docs/eval-models/metrics.json)")
    if args.worker is not None:
        run_job(json.loads(args.worker.read_text()))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    own_work = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="qdiff-eval-train-")) if own_work else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    log = RunLog(args.out, args)
    try:
        return _run(args, work, log)
    except BaseException as exc:
        log.update(status=f"failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path, log: RunLog) -> int:
    make_deterministic(strict=False)  # the parent trains only the classifier; CUBLAS config before CUDA
    log.update(data=make_data(args, work), environment=tdm.environment(torch.device(args.device)))
    x = np.load(work / "train_x.npy", mmap_mode="r")
    y = np.load(work / "train_y.npy")
    tdm.save_png(args.out / "dataset_grid.png", tdm.image_grid(tdm.class_rows(np.asarray(x[:400]), y[:400], 10), ncols=10))

    if args.check_determinism:
        log.update(determinism=check_determinism(args, work, args.check_determinism), status="done")
        return 0 if log.metrics["determinism"]["identical"] else 2
    if args.probe:
        log.update(probe=probe(args, work, args.probe), status="done")
        return 0
    if args.probe_modes:
        log.update(probe_modes=probe_modes(args, work, args.probe_modes), status="done")
        return 0
    if args.probe_variants:
        log.update(probe_variants=probe_variants(args, work, args.probe_steps, args.probe_variants), status="done")
        return 0

    # read now, not after ~20 minutes of training: on the GPU machine each call re-copies the tree
    expected = json.loads(args.expect.read_text()) if args.expect is not None else None
    if args.eval_n:
        train_classifier(args, work, log)
    steps = parse_steps(args.steps)
    if steps is None:
        found = probe(args, work, args.probe_steps)
        steps = found["steps_for_budget"]
        log.update(probe=found)
    reproduce = reproduce_flags(args, steps)
    print(f"steps: {steps_text(steps)} (reproduce with {reproduce})", flush=True)
    log.update(steps=steps, reproduce=reproduce, bit_for_bit=determinism_mode(args) == "strict")

    results = run_jobs(args, [job_for(args, kind, work, steps[kind]) for kind in MODEL_NAMES], "train")
    for kind, result in results.items():
        log.train["models"][kind] = result.pop("train")
        log.update(**{kind: result})
    tdm.plot_loss_curves(args.out / "loss_curves.png", {MODEL_NAMES[k]: v for k, v in log.train["models"].items()}, title="evaluation models (scenes): training loss")

    if expected is not None:
        log.update(reproduction=compare_with_expected(log.metrics, expected, str(args.expect)))
    if args.pack:
        manifest = pack_tool.pack_models([args.models_dir / MODEL_NAMES[k] for k in MODEL_NAMES], args.pack)
        log.update(pack={"manifest": str(manifest), "parts": json.loads(manifest.read_text())["parts"]})
        print(f"pack: {manifest.parent} ({len(log.metrics['pack']['parts'])} parts + manifest)", flush=True)
    log.update(status="done")
    print_summary(log.metrics)
    return 0


def compare_with_expected(metrics: dict[str, Any], expected: dict[str, Any], source: str) -> dict[str, Any]:
    """Per fp16 file, this run's sha256 against an earlier run's (the bit-for-bit claim of
    docs/eval-models.md is this comparison coming out IDENTICAL on a second run); the earlier
    run's reproduce line is printed beside this one's, since different options mean different
    weights by design."""
    files = {}
    for kind in MODEL_NAMES:
        have, want = metrics.get(kind, {}).get("sha256", {}), expected.get(kind, {}).get("sha256", {})
        for rel in sorted(set(have) | set(want)):  # a file only one run has is a difference too
            files[f"{MODEL_NAMES[kind]}/{rel}"] = {"sha256": have.get(rel), "expected": want.get(rel), "same": have.get(rel) is not None and have.get(rel) == want.get(rel)}
    same = bool(files) and all(f["same"] for f in files.values())
    verdict = "IDENTICAL" if same else "DIFFERENT"
    print(f"reproduction: {verdict} to {source} ({sum(f['same'] for f in files.values())}/{len(files)} files)", flush=True)
    for name, f in files.items():
        print(f"  {name}: {(f['sha256'] or 'absent')[:16]} vs {(f['expected'] or 'absent')[:16]}{'' if f['same'] else '  <- differs'}")
    if not same and metrics.get("reproduce") != expected.get("reproduce"):
        print(f"  (options differ: this run {metrics.get('reproduce')!r}, that run {expected.get('reproduce')!r})")
    return {"against": source, "verdict": verdict, "files": files, "expected_reproduce": expected.get("reproduce"), "expected_environment": expected.get("environment")}


def print_summary(m: dict[str, Any]) -> None:
    print("=" * 72)
    if "classifier" in m:
        print(f"scenes classifier, held-out accuracy: {m['classifier']['held_out_accuracy']['overall']:.4f}")
    for kind in MODEL_NAMES:
        r = m.get(kind, {})
        line = f"{MODEL_NAMES[kind]}: {r.get('model_sha256', '?')[:16]}  "
        if "eval" in r:
            e = r["eval"]
            line += f"shape-FD {e['shape_fd']:.4f} (n={e['n_samples']})"
            if "class_accuracy" in e:
                line += f", class accuracy {e['class_accuracy']['overall']:.4f} (CFG {e['guidance_scale']})"
        print(line)
        for rel, digest in r.get("sha256", {}).items():
            print(f"  sha256 {rel}: {digest}")
    if "real_vs_real" in m:
        print(f"real-vs-real floor: {m['real_vs_real']['shape_fd']:.4f} at n={m['real_vs_real']['n_train_images']}")
    print(f"total wall time {m['wall_s']:.1f}s")
    print("=" * 72)


if __name__ == "__main__":
    sys.exit(main())
