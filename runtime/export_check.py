"""An exported graph checked against the PyTorch model it came from, under ONNX Runtime.

It runs the graph, so it lives in runtime (export/ knows nothing of backends); `qdiff.api`'s
`export_model` calls it and re-exports `validate_export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qdiff.core.errors import ExportError


def export_tolerance(dtype: str):
    """FP32: the export's round-off (~1e-6). FP16: one FP16 rounding (2^-11 ~ 4.9e-4 relative)
    per layer, amplified through ~100 layers, measured at 0.8-1.7e-3 relative L2 on the tiny
    test UNets (the same as the PyTorch model run in FP16): 1e-2 leaves 6x headroom and still
    fails a graph with a wrong weight or a lost layer (~1e-1 and above)."""
    from qdiff.export.validate import Tolerance

    return Tolerance() if dtype == "fp32" else Tolerance(rel_l2=1e-2, max_abs_fraction=2e-2)


def convert_export_to_fp16(unet: torch.nn.Module, fp32_path: Path, out_path: Path, external_data: bool | None):
    """FP32 export -> FP16 graph with the overflow guard run on the validation's own inputs."""
    from qdiff.export.fp16 import fp16_graph, tensor_maxima
    from qdiff.export.onnx_export import example_inputs
    from qdiff.export.onnx_io import load_onnx, save_onnx

    feeds = []
    for seed, batch in enumerate((1, 3)):  # the inputs `validate_export` checks with
        inputs = example_inputs(unet, batch=batch, seed=100 + seed, tokens=7 + seed)
        feeds.append({k: v.numpy() for k, v in inputs.items()})
    maxima = tensor_maxima(fp32_path, feeds)
    model = load_onnx(fp32_path, check=False)
    converted, islands = fp16_graph(model, maxima)
    external = bool(Path(str(fp32_path) + ".data").exists())
    save_onnx(converted, out_path, external_data=external_data or external or None)
    return islands


def validate_export(unet: torch.nn.Module, onnx_path: Path, tolerance=None, batches: tuple[int, ...] = (1, 3)) -> list[dict[str, Any]]:
    """ONNX Runtime vs PyTorch on seeded random inputs; raises ExportError above tolerance.

    Two batch sizes, neither the one traced with, so a broken dynamic axis shows up here.
    """
    from qdiff.export.onnx_export import example_inputs
    from qdiff.export.validate import Tolerance, error_stats
    from qdiff.runtime.backends import OnnxRuntimeDenoiser, TorchDenoiser

    tolerance = tolerance or Tolerance()
    session = OnnxRuntimeDenoiser(onnx_path)
    reference = TorchDenoiser(unet)
    results = []
    for seed, batch in enumerate(batches):
        inputs = example_inputs(unet, batch=batch, seed=100 + seed, tokens=7 + seed)
        sample, t = inputs.pop("sample"), inputs.pop("timestep")
        stats = error_stats(session(sample, t, **inputs), reference(sample, t, **inputs))
        problems = tolerance.violations(stats)
        results.append({"batch": batch, **stats.to_json(), "ok": not problems})
        if problems:
            raise ExportError(f"ONNX Runtime disagrees with PyTorch on {onnx_path.name} at batch {batch}: " + "; ".join(problems) + f" [{stats}]")
    return results
