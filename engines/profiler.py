"""Per-layer time of an engine, from TensorRT's IProfiler (GPU only).

The profiler reports after each synchronous execution; layer times are summed per call and the
median over calls is kept, so one slow call (clock ramp-up) does not skew a layer. Profiling
disables CUDA graphs and adds a sync per layer, so the per-layer sum is larger than the
end-to-end time of a graph replay; it says where time goes, the benchmark says how much.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from qdiff.engines.compat import import_tensorrt
from qdiff.engines.runner import TensorRTEngine


def profile_layers(engine: str | Path, feeds: dict[str, torch.Tensor], *, runs: int = 20, warmup: int = 5, verify: bool = True) -> dict[str, float]:
    """Median milliseconds per engine layer at the shapes of `feeds`."""
    trt = import_tensorrt()
    runner = TensorRTEngine(engine, verify=verify, cuda_graphs=False)
    inputs = runner.prepare(feeds)
    for _ in range(warmup):
        runner.execute(inputs)
    torch.cuda.synchronize()

    per_call: list[dict[str, float]] = []

    class _Profiler(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            per_call[-1][layer_name] = per_call[-1].get(layer_name, 0.0) + ms

    profiler = _Profiler()
    runner.context.profiler = profiler
    for _ in range(runs):
        per_call.append({})
        runner.execute(inputs)
        torch.cuda.synchronize()
    names = {n for call in per_call for n in call}
    return {n: statistics.median(call.get(n, 0.0) for call in per_call) for n in sorted(names)}
