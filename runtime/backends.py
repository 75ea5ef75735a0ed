"""Denoiser backends behind one contract:

    backend(sample, timestep, encoder_hidden_states=None, **added_cond) -> torch.Tensor

returning the model output on the sample's device. The sampling loop never knows which backend
it drives, which is what lets FP32 PyTorch, the ONNX graphs and TensorRT engines be compared
step by step from the same seeds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from qdiff.core.errors import BackendUnavailableError, OnnxModelError


class Denoiser(Protocol):
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, **added_cond: torch.Tensor) -> torch.Tensor: ...


# The backends `check_backend` knows; only tensorrt needs more than the CPU packages qdiff installs.
BACKENDS = ("pytorch", "onnxruntime", "tensorrt")


def _tensorrt_missing() -> list[str]:
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the tensorrt Python package (pip install qdiff[gpu])")
    return missing


def check_backend(name: str) -> None:
    """Raise `BackendUnavailableError` when this machine cannot run backend `name`.

    The message is one line: what is missing, and which backend works here instead, so the CLI
    shows exactly that and nothing else.
    """
    if name in ("pytorch", "onnxruntime"):
        return
    if name == "tensorrt":
        missing = _tensorrt_missing()
        if missing:
            raise BackendUnavailableError(
                f"the tensorrt backend needs {' and '.join(missing)}; use the onnxruntime backend (CPU, same Q/DQ graph) or pytorch instead"
            )
        return
    raise BackendUnavailableError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")


# The torch device types a stage can be asked to run on. MPS is not one: the observers' range
# searches (`calib.observers`) run in float64 where the histogram lives, which MPS lacks.
DEVICE_TYPES = ("cpu", "cuda")


def check_device(device: str | torch.device, *, what: str) -> torch.device:
    """The torch device `what` (e.g. "calibration") was asked to run on, checked before any work.

    An unknown name, a type other than cpu/cuda, or a device this machine does not have is a
    `BackendUnavailableError` that names the device and what to do, so a stage fails at once,
    before it loads a model or touches its artifacts, instead of deep inside torch (an
    AssertionError "Torch not compiled with CUDA enabled" after minutes of loading).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise BackendUnavailableError(f"{what} was asked to run on {device!r}, which is not a torch device", hint="use cpu, or cuda / cuda:N on a machine with an NVIDIA GPU") from exc
    if dev.type not in DEVICE_TYPES:
        raise BackendUnavailableError(f"{what} was asked to run on {str(device)!r}; qdiff runs it on cpu or cuda only", hint="use cpu, or cuda / cuda:N on a machine with an NVIDIA GPU")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"{what} was asked to run on {str(device)!r}, but this PyTorch sees no CUDA GPU (torch.cuda.is_available() is False)",
            hint="use device cpu here (--device cpu), or run on a machine with an NVIDIA GPU and a CUDA build of PyTorch",
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise BackendUnavailableError(f"{what} was asked to run on {str(device)!r}, but this machine has {count} CUDA GPU(s)", hint=f"use cuda:0 .. cuda:{count - 1}, or cpu")
    return dev


@contextlib.contextmanager
def exact_float(device: torch.device) -> Iterator[None]:
    """TF32 off on CUDA for the block, restored after: convolutions and matmuls in FP32, so
    ranges measured on a GPU are the FP32 model's (up to summation order), as on the CPU, and
    not those of TF32's 10-bit-mantissa approximation (PyTorch allows TF32 convolutions by
    default). A no-op on the CPU."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# How ONNX Runtime computes a Q/DQ graph. "exact" keeps every QuantizeLinear/DequantizeLinear
# pair as float simulation (round, clamp, rescale) with the rest of the graph optimized: the same
# function as TensorRT's INT8 x INT8 -> INT32 arithmetic and as the PyTorch fake-quant reference,
# on every CPU. "fused-int8" lets ORT fuse Q/DQ + Conv/MatMul into its u8s8 integer kernels:
# faster on the CPU, but on x86 without VNNI those kernels add u8*s8 products pairwise into
# saturating int16 (vpmaddubsw), so their output is not what an engine computes.
ORT_ARITHMETIC = ("exact", "fused-int8")
ARITHMETIC_DESCRIPTION = {
    "exact": "exact: Q/DQ simulated in float (TensorRT's INT8 x INT8 -> INT32 arithmetic, same result on every CPU)",
    "fused-int8": "fused-int8: ONNX Runtime's fused u8s8 integer kernels (CPU-dependent; saturates on x86 without VNNI)",
}


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def fused_int8_saturates(flags: set[str] | None = None, machine: str | None = None) -> bool | None:
    """Whether ORT's fused u8s8 kernels can saturate on this CPU (None: cannot tell).

    x86 CPUs with AVX-512 VNNI, AVX-VNNI or AMX accumulate u8 x s8 products straight into int32;
    older x86 (AVX2, AVX-512 without VNNI) go through a saturating int16 pair sum. Arm's dot
    product instructions accumulate into int32 as well.
    """
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return False if machine in ("aarch64", "arm64") else None
    flags = _cpu_flags() if flags is None else flags
    if flags is None:
        return None
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


def check_arithmetic(name: str) -> str:
    if name not in ORT_ARITHMETIC:
        raise BackendUnavailableError(f"unknown ONNX Runtime arithmetic {name!r}; use one of {', '.join(ORT_ARITHMETIC)}")
    return name


def session_options(*, arithmetic: str = "exact", optimize: bool = True, threads: int | None = None):
    """ONNX Runtime session options for a denoiser graph with the given Q/DQ arithmetic."""
    import onnxruntime as ort

    check_arithmetic(arithmetic)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if arithmetic == "exact":
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    # INT4 weight-only graphs in fused mode: ORT fuses DequantizeLinear + MatMul into
    # MatMulNBits, whose default accuracy level quantizes activations to INT8; 0 keeps them float.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


def timestep_batch(timestep: torch.Tensor | float | int, batch: int) -> torch.Tensor:
    """The timestep as a float32 vector of `batch` entries, as the exported graph takes it (a
    scalar scheduler timestep is broadcast; a per-sample vector passes through)."""
    t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
    return t.expand(batch).contiguous() if t.numel() == 1 else t


class TorchDenoiser:
    """A diffusers UNet (or its fake-quant twin) called the way the ONNX graph is."""

    name = "pytorch"

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet

    @torch.no_grad()
    def __call__(self, sample, timestep, encoder_hidden_states=None, **added_cond):
        t = timestep_batch(timestep, sample.shape[0]).to(sample.device)
        kwargs = {}
        if encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = encoder_hidden_states
        if added_cond:
            kwargs["added_cond_kwargs"] = added_cond
        return self.unet(sample, t, **kwargs, return_dict=False)[0]


class DeviceDenoiser(TorchDenoiser):
    """A `TorchDenoiser` whose UNet lives on `device` while the sampling loop may not.

    Inputs (and conditioning) are moved to the UNet's device and the noise prediction comes back
    on the device of `sample`, so one wrapper serves a CPU-side scheduler driving a GPU model
    (calibration peers, sensitivity) and a loop that already runs on the GPU (the harness),
    where both moves are no-ops."""

    def __init__(self, unet: torch.nn.Module, device: torch.device | str) -> None:
        self.device = torch.device(device)
        super().__init__(unet.to(self.device).eval())

    def __call__(self, sample, timestep, encoder_hidden_states=None, **added_cond):
        move = lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        out = super().__call__(move(sample), move(timestep), move(encoder_hidden_states), **{k: move(v) for k, v in added_cond.items()})
        return out.to(sample.device)


class OnnxRuntimeDenoiser:
    """An exported denoiser graph (FP32 or Q/DQ) run by ONNX Runtime.

    `arithmetic` (see ORT_ARITHMETIC): "exact" (the default) computes Q/DQ in float, which is
    TensorRT's arithmetic and the same on every CPU, so quality numbers predict the engine's;
    "fused-int8" opts into ORT's integer kernels for CPU speed, with a warning where this CPU
    saturates them. `optimize=False` turns all graph optimizations off (node by node).
    """

    name = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike[str], *, providers: list[str] | None = None, optimize: bool = True, threads: int | None = None, arithmetic: str = "exact") -> None:
        import onnxruntime as ort

        self.path = Path(onnx_path)
        # Without graph optimizations nothing is fused, so the arithmetic is exact either way.
        self.arithmetic = check_arithmetic(arithmetic) if optimize else "exact"
        options = session_options(arithmetic=self.arithmetic, optimize=optimize, threads=threads)
        if self.arithmetic == "fused-int8" and fused_int8_saturates():
            from qdiff.core.progress import log

            log(f"warning: {self.path.name}: ONNX Runtime's fused INT8 kernels saturate on this CPU (x86 without VNNI); "
                "its output differs from TensorRT's. Use arithmetic 'exact' (--ort-arithmetic exact) for quality numbers.")
        available = ort.get_available_providers()
        providers = providers or ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendUnavailableError(
                f"ONNX Runtime here lacks {', '.join(missing)} (it has {', '.join(available)}); "
                "use providers=['CPUExecutionProvider'], or install onnxruntime-gpu on a machine with a CUDA GPU"
            )
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:
            raise OnnxModelError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]

    def describe(self) -> dict[str, str]:
        """What computed the numbers, for reports: backend, provider, Q/DQ arithmetic."""
        return {"backend": "onnxruntime", "providers": ", ".join(self.session.get_providers()), "arithmetic": ARITHMETIC_DESCRIPTION[self.arithmetic]}

    def __call__(self, sample, timestep, encoder_hidden_states=None, **added_cond):
        feeds = {"sample": sample, "timestep": timestep_batch(timestep, sample.shape[0])}
        if encoder_hidden_states is not None:
            feeds["encoder_hidden_states"] = encoder_hidden_states
        feeds.update(added_cond)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise OnnxModelError(f"{self.path.name} needs input(s) {', '.join(missing)} that the caller did not give")
        arrays = {n: feeds[n].detach().cpu().float().numpy() for n in self.input_names}
        (out,) = self.session.run(["out_sample"], arrays)
        return torch.from_numpy(np.ascontiguousarray(out)).to(sample.device)
