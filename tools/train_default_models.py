#!/usr/bin/env python3
"""Train qdiff's two small default denoisers on the procedural shapes dataset.

Why this exists
---------------
Post-training quantization can only be judged on trained weights, and the
machines this project runs on have no network: no checkpoint or dataset can be
downloaded.  This script builds both from a seed, in a few minutes of one GPU:

* ``shapes-ddpm/``  an unconditional pixel-space DDPM ``UNet2DModel`` (32x32 RGB,
  self-attention at 16x16 and 8x8), saved as a ``DDPMPipeline`` folder;
* ``shapes-cond/``  a class-conditional ``UNet2DConditionModel`` whose
  cross-attention reads learned class tokens (``conditioning/``; the last row
  is the null class, trained with label dropout so classifier-free guidance
  works).

Both are saved as fp16 safetensors (< 10 MB each) from EMA weights, reloaded
to check the files, then evaluated: DDIM samples are scored with a small
shapes classifier (class accuracy of conditional samples) and with "shape-FD",
a Frechet distance on that classifier's features against held-out real
images.  Everything lands in ``--out`` (metrics.json, train_log.json, PNG grids,
loss curves).

The LR schedule follows ``progress = max(step / steps, elapsed / time_budget)``,
so a run stopped by ``--time-budget-s`` still completes its warmup-cosine decay.
For bit-for-bit repeatable training pass ``--time-budget-s 0`` (step-driven only).

Usage::

    # H200: ~210 s of training per model, ~8 min in all with data, saving and eval
    python tools/train_default_models.py --out out/default-models --device cuda \
        --steps 20000 --batch-size 256 --time-budget-s 210
    python tools/train_default_models.py --smoke --device cpu --out /tmp/smoke_models
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers  # noqa: E402
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from qdiff.datasets import shape_classifier as sc  # noqa: E402
from qdiff.datasets.shapes import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, generate  # noqa: E402

# --------------------------------------------------------------------------- #
# Model definitions (each < 5M parameters, i.e. < 10 MB as fp16)
# --------------------------------------------------------------------------- #
DDPM_UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": (64, 128, 128),  # resolutions 32, 16, 8
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": 32,  # UNet2DModel: channels per head
    "norm_num_groups": 32,
}
COND_UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": (64, 96, 96),  # resolutions 32, 16, 8
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 128,
    "attention_head_dim": 3,  # UNet2DConditionModel's legacy name: this is the number of heads (96/3 = 32 per head)
    "norm_num_groups": 32,
}
CLASS_TOKENS = 4  # encoder_hidden_states sequence length per class
NULL_CLASS = NUM_CLASSES
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


@dataclass
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    ema_decay: float
    time_budget_s: float
    label_dropout: float
    log_every: int
    grad_clip: float
    compile: bool
    seed: int


class ClassTokens(nn.Module):
    """Learned encoder_hidden_states per class: labels [B] -> [B, CLASS_TOKENS, dim]; row NUM_CLASSES is null."""

    def __init__(self, num_classes: int, tokens: int, dim: int) -> None:
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.embedding = nn.Embedding(num_classes + 1, tokens * dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels).view(labels.shape[0], self.tokens, self.dim)

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """All classes' encoder_hidden_states, [num_classes + 1, tokens, dim]."""
        return self.embedding.weight.view(-1, self.tokens, self.dim).clone()


def count_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def build_ddpm_unet() -> UNet2DModel:
    return UNet2DModel(**DDPM_UNET_CONFIG)


def build_cond_unet() -> tuple[UNet2DConditionModel, ClassTokens]:
    unet = UNet2DConditionModel(**COND_UNET_CONFIG)
    return unet, ClassTokens(NUM_CLASSES, CLASS_TOKENS, COND_UNET_CONFIG["cross_attention_dim"])


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
class EMA:
    """Exponential moving average of parameters (fp32 shadow copies), with the usual warmup."""

    def __init__(self, modules: list[nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))


def lr_factor(step: int, progress: float, warmup_steps: int, floor: float = 0.02) -> float:
    """Linear warmup over steps, then cosine decay over progress in [0, 1] down to ``floor``."""
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    cos = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return warm * (floor + (1.0 - floor) * cos)


def progress_of(step: int, elapsed: float, cfg: TrainConfig) -> float:
    by_steps = step / max(cfg.steps, 1)
    by_time = elapsed / cfg.time_budget_s if cfg.time_budget_s > 0 else 0.0
    return max(by_steps, by_time)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def train_denoiser(
    name: str,
    modules: list[nn.Module],
    denoise: DenoiseFn,
    images: torch.Tensor,
    labels: torch.Tensor,
    scheduler: DDPMScheduler,
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Epsilon-prediction MSE training; leaves EMA weights in ``modules``; returns the training log.

    ``images`` are uint8 NCHW on ``device``; ``denoise(noisy, t, labels)`` returns predicted noise.
    """
    params = [p for m in modules for p in m.parameters()]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0, fused=fused)
    ema = EMA(modules, cfg.ema_decay)
    abar = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    sqrt_ab, sqrt_1mab = abar.sqrt(), (1.0 - abar).sqrt()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    record_every = max(1, cfg.log_every // 10)
    n, b = images.shape[0], cfg.batch_size

    for m in modules:
        m.train()
    history: list[dict[str, float]] = []  # mean loss every record_every steps
    throughput: list[dict[str, float]] = []  # it/s every log_every steps
    loss_sum = torch.zeros((), device=device)
    loss_count, last_print_step = 0, 0
    start = last_print = time.perf_counter()
    step, stop_reason = 0, "steps"
    while True:
        elapsed = time.perf_counter() - start
        progress = progress_of(step, elapsed, cfg)
        if progress >= 1.0:
            stop_reason = "steps" if step >= cfg.steps else "time_budget"
            break
        lr = cfg.lr * lr_factor(step, progress, cfg.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr

        idx = torch.randint(n, (b,), device=device, generator=gen)
        x0 = images[idx].float().div_(127.5).sub_(1.0)
        flip = torch.rand(b, device=device, generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        y = labels[idx]
        y = torch.where(torch.rand(b, device=device, generator=gen) < cfg.label_dropout, NULL_CLASS, y)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        t = torch.randint(scheduler.config.num_train_timesteps, (b,), device=device, generator=gen)
        noisy = sqrt_ab[t][:, None, None, None] * x0 + sqrt_1mab[t][:, None, None, None] * noise

        with autocast:
            pred = denoise(noisy, t, y)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update(step)
        step += 1

        loss_sum += loss.detach()
        loss_count += 1
        if step % record_every == 0:
            history.append({"step": step, "loss": loss_sum.item() / loss_count, "lr": lr,
                            "elapsed_s": time.perf_counter() - start})  # fmt: skip
            loss_sum.zero_()
            loss_count = 0
        if step % cfg.log_every == 0 or step == 1:
            now = time.perf_counter()
            its = (step - last_print_step) / max(now - last_print, 1e-9)
            last_print, last_print_step = now, step
            throughput.append({"step": step, "it_s": its, "elapsed_s": now - start})
            last_loss = history[-1]["loss"] if history else loss.item()  # step 1: nothing recorded yet
            print(f"[{name}] step {step:6d}  loss {last_loss:.4f}  lr {lr:.2e}  {its:6.1f} it/s  "
                  f"{now - start:7.1f}s  progress {progress:.3f}", flush=True)  # fmt: skip

    sync(device)
    wall = time.perf_counter() - start
    ema.copy_to_params()
    for m in modules:
        m.eval()
    print(f"[{name}] done: {step} steps in {wall:.1f}s ({step / max(wall, 1e-9):.1f} it/s), stop: {stop_reason}")
    return {"steps_done": step, "wall_s": wall, "it_s_mean": step / max(wall, 1e-9), "stop_reason": stop_reason,
            "samples_seen": step * b, "history": history, "throughput": throughput,
            "config": asdict(cfg)}  # fmt: skip


# --------------------------------------------------------------------------- #
# Saving and reloading
# --------------------------------------------------------------------------- #
def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save_unet_fp16(unet: nn.Module, folder: Path) -> None:
    half = copy.deepcopy(unet).to("cpu").half()  # .half(): diffusers warns on .to(dtype)
    half.save_pretrained(folder, safe_serialization=True)


def save_ddpm(folder: Path, unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
    """Write a DDPMPipeline folder: model_index.json, unet/ (fp16), scheduler/."""
    _write_json(folder / "model_index.json", {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    })  # fmt: skip
    _save_unet_fp16(unet, folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")


def save_cond(folder: Path, unet: UNet2DConditionModel, tokens: ClassTokens, scheduler: DDPMScheduler) -> None:
    """Write the class-conditional folder: model_index.json, unet/, scheduler/, conditioning/."""
    _write_json(folder / "model_index.json", {
        "_class_name": "QdiffClassConditionalPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    })  # fmt: skip
    _save_unet_fp16(unet, folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "conditioning").mkdir(parents=True, exist_ok=True)
    table = tokens.table().to("cpu", torch.float16).contiguous()
    save_file({"embeddings": table}, str(folder / "conditioning" / "class_embeddings.safetensors"))
    _write_json(folder / "conditioning" / "classes.json",
                {"class_names": list(CLASS_NAMES), "null_class_index": NULL_CLASS})  # fmt: skip


def folder_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def reload_and_check(folder: Path, cls: type, reference: nn.Module, max_weight_bytes: float = 10e6) -> nn.Module:
    """Reload ``folder/unet`` and check it matches ``reference`` cast to fp16; print file sizes."""
    unet = cls.from_pretrained(folder / "unet", torch_dtype=torch.float16, low_cpu_mem_usage=False)
    ref = {k: v.detach().to("cpu", torch.float16) for k, v in reference.state_dict().items()}
    got = unet.state_dict()
    bad = [k for k in ref if k not in got or not torch.equal(got[k], ref[k])]
    if bad or set(got) != set(ref):
        raise RuntimeError(f"{folder}: reloaded weights differ ({bad[:5]} ...)")
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        stored = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    sizes = folder_sizes(folder)
    print(f"reloaded {folder.name}: {count_params(unet):,} params, stored dtypes {stored}, weights match")
    for name, size in sizes.items():
        print(f"  {name:48s} {size / 1e6:8.3f} MB")
    weights = sum(s for n, s in sizes.items() if n.endswith(".safetensors"))
    if weights > max_weight_bytes:
        raise RuntimeError(f"{folder}: weights are {weights / 1e6:.2f} MB, over the {max_weight_bytes / 1e6:.0f} MB limit")
    return unet.float()


# --------------------------------------------------------------------------- #
# Sampling (plain DDIM, CFG by batching [uncond, cond])
# --------------------------------------------------------------------------- #
@torch.no_grad()
def ddim_sample(
    unet: nn.Module,
    scheduler_config: Any,
    n: int,
    device: torch.device,
    steps: int,
    seed: int,
    cond: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    batch_size: int = 512,
) -> np.ndarray:
    """Sample ``n`` images with ``steps`` DDIM steps (eta=0); returns uint8 NHWC.

    For a conditional UNet pass ``cond`` ([n, seq, dim] encoder_hidden_states)
    and ``uncond`` ([seq, dim], the null class); guidance_scale 1 skips CFG.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    outs = []
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        # 1. A fresh DDIM scheduler with the training schedule, and its timesteps.
        ddim = DDIMScheduler.from_config(scheduler_config)
        ddim.set_timesteps(steps, device=device)
        # 2. Start from pure Gaussian noise.
        x = torch.randn((hi - lo, 3, IMAGE_SIZE, IMAGE_SIZE), device=device, generator=gen)
        for t in ddim.timesteps:
            # 3. Predict the noise: with CFG, one batched call on [uncond, cond].
            if cond is None:
                eps = unet(x, t).sample
            elif guidance_scale == 1.0:
                eps = unet(x, t, encoder_hidden_states=cond[lo:hi]).sample
            else:
                states = torch.cat([uncond.expand(hi - lo, -1, -1), cond[lo:hi]])
                eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=states).sample.chunk(2)
                # 4. Classifier-free guidance.
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            # 5. One deterministic DDIM update x_t -> x_{t-1}.
            x = ddim.step(eps, t, x, eta=0.0).prev_sample
        # 6. [-1, 1] floats -> uint8 NHWC.
        outs.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(outs)


# --------------------------------------------------------------------------- #
# Evaluation and plots
# --------------------------------------------------------------------------- #
def image_grid(images: np.ndarray, ncols: int, scale: int = 2, pad: int = 2) -> np.ndarray:
    """Tile uint8 NHWC images into one uint8 HWC grid (white padding, nearest upscaling)."""
    n, h, w, c = images.shape
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid.repeat(scale, 0).repeat(scale, 1)


def save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def class_rows(images: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """Images reordered so each class fills one row of ``per_class`` columns."""
    rows = [images[np.flatnonzero(labels == c)[:per_class]] for c in range(NUM_CLASSES)]
    return np.concatenate(rows)


def debiased_ema(values: np.ndarray, beta: float) -> np.ndarray:
    """Exponential smoothing with Adam-style bias correction (no lag towards the first value)."""
    out, acc = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        acc = beta * acc + (1.0 - beta) * float(v)
        out[i] = acc / (1.0 - beta ** (i + 1))
    return out


def plot_loss_curves(path: Path, logs: dict[str, dict[str, Any]], title: str = "shapes default models: training loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, log in logs.items():
        hist = log["history"]
        if not hist:
            continue
        steps = np.array([h["step"] for h in hist])
        loss = np.array([h["loss"] for h in hist])
        smooth = debiased_ema(loss, beta=0.9 if len(loss) >= 50 else 0.5)
        (line,) = ax.plot(steps, smooth, label=f"{name} (smoothed)")
        ax.plot(steps, loss, alpha=0.25, color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(
    args: argparse.Namespace,
    out: Path,
    device: torch.device,
    data: dict[str, np.ndarray],
    ddpm: UNet2DModel,
    cond: UNet2DConditionModel,
    tokens: torch.Tensor,
    scheduler_config: Any,
) -> dict[str, Any]:
    """Sample both models, score them with the shapes classifier, write grids; returns metrics."""
    t0 = time.perf_counter()
    print(f"eval: training shape classifier ({args.classifier_steps} steps)", flush=True)
    clf = sc.train_classifier(data["train_x"], data["train_y"], device=device, steps=args.classifier_steps,
                              batch_size=min(256, len(data["train_x"])), seed=args.seed,
                              log_every=max(1, args.classifier_steps // 5))  # fmt: skip
    test_acc = sc.accuracy(sc.predict(clf, data["test_x"]), data["test_y"])
    print(f"eval: classifier accuracy on held-out real images: {test_acc['overall']:.4f}")
    test_feats = sc.features(clf, data["test_x"])

    n_u = args.eval_samples
    print(f"eval: sampling {n_u} unconditional images ({args.ddim_steps} DDIM steps)", flush=True)
    samples_u = ddim_sample(ddpm, scheduler_config, n_u, device, args.ddim_steps, seed=args.seed + 100)
    pred_u = sc.predict(clf, samples_u)

    labels_c = np.repeat(np.arange(NUM_CLASSES), args.eval_per_class)
    n_c = len(labels_c)
    print(f"eval: sampling {n_c} conditional images (guidance {args.guidance_scale})", flush=True)
    states = tokens.to(device, torch.float32)
    samples_c = ddim_sample(cond, scheduler_config, n_c, device, args.ddim_steps, seed=args.seed + 200,
                            cond=states[torch.as_tensor(labels_c, device=device)], uncond=states[NULL_CLASS],
                            guidance_scale=args.guidance_scale)  # fmt: skip
    acc_c = sc.accuracy(sc.predict(clf, samples_c), labels_c)

    def fd_pair(samples: np.ndarray) -> dict[str, float]:
        """FD of samples vs test, and the real-vs-real reference at the same counts."""
        k = len(samples)
        return {"shape_fd": sc.frechet_distance(sc.features(clf, samples), test_feats),
                "reference_real_train_vs_test": sc.frechet_distance(sc.features(clf, data["train_x"][:k]), test_feats),
                "n_samples": k, "n_real": len(test_feats)}  # fmt: skip

    metrics = {
        "classifier": {"steps": args.classifier_steps, "test_accuracy": test_acc,
                       "n_test": len(data["test_y"]), "class_names": list(CLASS_NAMES)},
        "ddpm": {**fd_pair(samples_u), "ddim_steps": args.ddim_steps,
                 "predicted_class_fraction": (np.bincount(pred_u, minlength=NUM_CLASSES) / len(pred_u)).tolist()},
        "cond": {**fd_pair(samples_c), "ddim_steps": args.ddim_steps, "guidance_scale": args.guidance_scale,
                 "per_class_samples": args.eval_per_class, "class_accuracy": acc_c},
    }  # fmt: skip
    save_png(out / "samples_ddpm.png", image_grid(samples_u[:64], ncols=8))
    save_png(out / "samples_cond.png", image_grid(class_rows(samples_c, labels_c, 10), ncols=min(10, args.eval_per_class)))
    metrics["eval_wall_s"] = time.perf_counter() - t0
    return metrics


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #
SMOKE_DEFAULTS: dict[str, Any] = {
    "steps": 12, "batch_size": 16, "warmup_steps": 4, "log_every": 4, "time_budget_s": 0.0,
    "train_size": 512, "test_size": 256, "eval_samples": 16, "eval_per_class": 4, "ddim_steps": 10,
    "classifier_steps": 40,
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20000, help="max optimizer steps per model (the time budget usually ends first)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup-steps", type=int, default=250)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--time-budget-s", type=float, default=210.0, help="training wall-clock limit per model (0: none)")
    p.add_argument("--label-dropout", type=float, default=0.12, help="cond model: fraction of labels set to null")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets (compile time counts)")
    p.add_argument("--train-size", type=int, default=50000)
    p.add_argument("--test-size", type=int, default=5000)
    p.add_argument("--models", default="ddpm,cond", help="comma list of models to train: ddpm, cond")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--eval-samples", type=int, default=500, help="unconditional samples")
    p.add_argument("--eval-per-class", type=int, default=50, help="conditional samples per class")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--classifier-steps", type=int, default=2000)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run that exercises every code path")
    if p.parse_args(argv).smoke:  # smoke sizes become the defaults; explicit flags still win
        p.set_defaults(**SMOKE_DEFAULTS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not set(args.models) <= {"ddpm", "cond"} or not args.models:
        p.error("--models takes a comma list of: ddpm, cond")
    if not args.skip_eval and set(args.models) != {"ddpm", "cond"}:
        p.error("evaluation needs both models; add --skip-eval to train only some")
    return args


def environment(device: torch.device) -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "numpy": np.__version__, "device": str(device), "host": platform.node()}  # fmt: skip
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def make_data(args: argparse.Namespace) -> dict[str, np.ndarray]:
    t0 = time.perf_counter()
    train_x, train_y = generate(args.train_size, seed=args.seed, split="train")
    test_x, test_y = generate(args.test_size, seed=args.seed, split="test")
    print(f"data: {len(train_x)} train + {len(test_x)} test images in {time.perf_counter() - t0:.1f}s", flush=True)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def train_config(args: argparse.Namespace, seed_offset: int) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                       ema_decay=args.ema_decay, time_budget_s=args.time_budget_s, label_dropout=args.label_dropout,
                       log_every=args.log_every, grad_clip=args.grad_clip, compile=args.compile,
                       seed=args.seed + seed_offset)  # fmt: skip


def maybe_compile(module: nn.Module, enabled: bool) -> Callable[..., Any]:
    return torch.compile(module) if enabled else module


def run_ddpm(
    args: argparse.Namespace, out: Path, device: torch.device, images: torch.Tensor, labels: torch.Tensor,
    scheduler: DDPMScheduler,
) -> tuple[dict[str, Any], UNet2DModel]:
    """Train, save (shapes-ddpm/) and reload the unconditional model; returns (log, reloaded fp32 UNet)."""
    torch.manual_seed(args.seed + 1)
    unet = build_ddpm_unet().to(device)
    fwd = maybe_compile(unet, args.compile)
    cfg = train_config(args, 1)
    cfg.label_dropout = 0.0
    print(f"ddpm: UNet2DModel with {count_params(unet):,} params", flush=True)
    log = train_denoiser("ddpm", [unet], lambda x, t, y: fwd(x, t).sample, images, labels, scheduler, cfg, device)
    log["params"] = count_params(unet)
    folder = out / "shapes-ddpm"
    save_ddpm(folder, unet, scheduler)
    reloaded = reload_and_check(folder, UNet2DModel, unet)
    pipe = DDPMPipeline.from_pretrained(folder, low_cpu_mem_usage=False)  # model_index.json is loadable
    print(f"reloaded {folder.name} as {type(pipe).__name__} ({type(pipe.unet).__name__}, {type(pipe.scheduler).__name__})")
    log["files"] = folder_sizes(folder)
    return log, reloaded


def run_cond(
    args: argparse.Namespace, out: Path, device: torch.device, images: torch.Tensor, labels: torch.Tensor,
    scheduler: DDPMScheduler,
) -> tuple[dict[str, Any], UNet2DConditionModel, torch.Tensor]:
    """Train, save (shapes-cond/) and reload the conditional model; returns (log, reloaded UNet, token table)."""
    torch.manual_seed(args.seed + 2)
    unet, tokens = build_cond_unet()
    unet, tokens = unet.to(device), tokens.to(device)
    fwd = maybe_compile(unet, args.compile)
    print(f"cond: UNet2DConditionModel with {count_params(unet):,} params + {count_params(tokens):,} in class tokens",
          flush=True)  # fmt: skip
    log = train_denoiser("cond", [unet, tokens],
                         lambda x, t, y: fwd(x, t, encoder_hidden_states=tokens(y)).sample,
                         images, labels, scheduler, train_config(args, 2), device)  # fmt: skip
    log["params"] = count_params(unet)
    log["params_class_tokens"] = count_params(tokens)
    folder = out / "shapes-cond"
    save_cond(folder, unet, tokens, scheduler)
    reloaded = reload_and_check(folder, UNet2DConditionModel, unet)
    table = load_file(str(folder / "conditioning" / "class_embeddings.safetensors"))["embeddings"]
    expected = (NUM_CLASSES + 1, CLASS_TOKENS, COND_UNET_CONFIG["cross_attention_dim"])
    if tuple(table.shape) != expected or table.dtype != torch.float16:
        raise RuntimeError(f"class_embeddings: got {tuple(table.shape)} {table.dtype}, want {expected} float16")
    log["files"] = folder_sizes(folder)
    return log, reloaded, table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(args)  # before touching the GPU: generation forks worker processes

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    env = environment(device)
    print(f"env: {env}", flush=True)
    save_png(out / "dataset_grid.png", image_grid(class_rows(data["train_x"], data["train_y"], 10), ncols=10))

    images = torch.as_tensor(data["train_x"]).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.as_tensor(data["train_y"]).to(device)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)

    logs: dict[str, dict[str, Any]] = {}
    trained: dict[str, Any] = {}
    if "ddpm" in args.models:
        logs["ddpm"], trained["ddpm"] = run_ddpm(args, out, device, images, labels, scheduler)
    if "cond" in args.models:
        logs["cond"], trained["cond"], trained["tokens"] = run_cond(args, out, device, images, labels, scheduler)
    del images
    plot_loss_curves(out / "loss_curves.png", logs)
    _write_json(out / "train_log.json", {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                         "environment": env, "models": logs})  # fmt: skip

    if not args.skip_eval:
        metrics = evaluate(args, out, device, data, trained["ddpm"].to(device), trained["cond"].to(device),
                           trained["tokens"], scheduler.config)  # fmt: skip
        metrics["environment"] = env
        metrics["total_wall_s"] = time.perf_counter() - t_start
        _write_json(out / "metrics.json", metrics)
        print_summary(metrics)
    print(f"total wall time {time.perf_counter() - t_start:.1f}s; outputs in {out}")
    return 0


def print_summary(m: dict[str, Any]) -> None:
    print("=" * 72)
    print(f"classifier accuracy, held-out real: {m['classifier']['test_accuracy']['overall']:.4f}")
    acc = m["cond"]["class_accuracy"]
    per = "  ".join(f"{n}={a:.2f}" for n, a in zip(CLASS_NAMES, acc["per_class"]))
    print(f"cond samples class accuracy (w={m['cond']['guidance_scale']}): {acc['overall']:.4f}  [{per}]")
    for name in ("ddpm", "cond"):
        r = m[name]
        print(f"shape-FD {name}: {r['shape_fd']:.4f}  (real train-vs-test reference at n={r['n_samples']}: "
              f"{r['reference_real_train_vs_test']:.4f})")  # fmt: skip
    frac = "  ".join(f"{n}={f:.2f}" for n, f in zip(CLASS_NAMES, m["ddpm"]["predicted_class_fraction"]))
    print(f"ddpm samples, predicted class mix: {frac}")
    print("=" * 72)


if __name__ == "__main__":
    sys.exit(main())
