"""Denoiser backends behind one contract:

    backend(sample, timestep, encoder_hidden_states=None, **added_cond) -> torch.Tensor

returning the model output on the sample's device. The sampling loop never knows which backend
it drives, which is what lets FP32 PyTorch, the ONNX graphs and TensorRT engines be compared
step by step from the same seeds.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from qdiff.errors import BackendUnavailableError, OnnxModelError


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


def _timestep_batch(timestep: torch.Tensor | float | int, batch: int) -> torch.Tensor:
    t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
    return t.expand(batch).contiguous() if t.numel() == 1 else t


class TorchDenoiser:
    """A diffusers UNet (or its fake-quant twin) called the way the ONNX graph is."""

    name = "pytorch"

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet

    @torch.no_grad()
    def __call__(self, sample, timestep, encoder_hidden_states=None, **added_cond):
        t = _timestep_batch(timestep, sample.shape[0]).to(sample.device)
        kwargs = {}
        if encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = encoder_hidden_states
        if added_cond:
            kwargs["added_cond_kwargs"] = added_cond
        return self.unet(sample, t, **kwargs, return_dict=False)[0]


class OnnxRuntimeDenoiser:
    """An exported denoiser graph (FP32 or Q/DQ) run by ONNX Runtime.

    On the CPU, ONNX Runtime runs Q/DQ graphs with real INT8 kernels where it can fuse them.
    `optimize=False` turns graph optimizations off so the graph runs node by node, which is how
    tests compare it exactly with the PyTorch fake-quant reference.
    """

    name = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike[str], *, providers: list[str] | None = None, optimize: bool = True, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(onnx_path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        # INT4 weight-only graphs: ORT fuses DequantizeLinear + MatMul into MatMulNBits, whose
        # default accuracy level quantizes activations to INT8; 0 keeps them in float.
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if threads:
            options.intra_op_num_threads = threads
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

    def __call__(self, sample, timestep, encoder_hidden_states=None, **added_cond):
        feeds = {"sample": sample, "timestep": _timestep_batch(timestep, sample.shape[0])}
        if encoder_hidden_states is not None:
            feeds["encoder_hidden_states"] = encoder_hidden_states
        feeds.update(added_cond)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise OnnxModelError(f"{self.path.name} needs input(s) {', '.join(missing)} that the caller did not give")
        arrays = {n: feeds[n].detach().cpu().float().numpy() for n in self.input_names}
        (out,) = self.session.run(["out_sample"], arrays)
        return torch.from_numpy(np.ascontiguousarray(out)).to(sample.device)
