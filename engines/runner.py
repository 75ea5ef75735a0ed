"""A deserialized TensorRT engine run on torch CUDA tensors: the engine runner.

It lives in engines/ (not runtime/) so that engines' own tools, the per-layer profiler and the
inspector, can run an engine without importing the runtime (dependencies point one way:
runtime -> engines). runtime/tensorrt_backend.py wraps it as a denoiser and a diffusers UNet.

Execution binds torch CUDA tensors to the engine by address (`set_tensor_address`,
`execute_async_v3` on torch's current stream), so nothing goes through host memory. Before each
call the input shapes are checked against the engine's profile (from its manifest), because
TensorRT's own error for an out-of-range shape does not say which input or dimension. The first
call at each input shape captures the engine's launch sequence in a CUDA graph and later calls
replay it (a UNet call is hundreds of launches; at batch 1-2 they cost as much as the math). A
capture that fails falls back to plain execution for that shape, once, with a log line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qdiff.engines.compat import import_tensorrt, make_logger, torch_dtype
from qdiff.engines.manifest import EngineInfo, read_engine_manifest, verify_engine
from qdiff.engines.profiles import check_shapes
from qdiff.core.errors import BackendUnavailableError, EngineMismatchError, SamplingError
from qdiff.core.progress import log


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph, or None when capture failed for this shape
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


class TensorRTEngine:
    """A deserialized engine with one execution context, run on torch tensors."""

    def __init__(self, engine: str | Path, *, verify: bool = True, cuda_graphs: bool = True) -> None:
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise BackendUnavailableError("the tensorrt backend needs a CUDA GPU; torch sees none", hint="use the onnxruntime backend on this machine")
        self.trt = trt
        self.info: EngineInfo = verify_engine(engine) if verify else read_engine_manifest(engine)
        self.profile = self.info.profile
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.info.path.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(f"TensorRT cannot load {self.info.path}: " + "; ".join(self.logger.errors[-3:]), hint="rebuild it with `qdiff build --force`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda_graphs = cuda_graphs
        self._captured: dict[tuple, _Captured] = {}

    # -- plain execution
    def prepare(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Check shapes against the profile, then put each input on the GPU in the engine's dtype."""
        check_shapes(self.profile, {n: tuple(t.shape) for n, t in feeds.items()}, where=f"engine {self.info.path}")
        return {n: feeds[n].to(device=self.device, dtype=self.dtypes[n], non_blocking=True).contiguous() for n in self.input_names}

    def _bind(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ctx = self.context
        for name in self.input_names:
            ctx.set_input_shape(name, tuple(inputs[name].shape))
            ctx.set_tensor_address(name, inputs[name].data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise SamplingError(f"engine {self.info.path.name}: output {name} has unresolved shape {shape} after setting the input shapes")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            ctx.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise SamplingError(f"TensorRT failed to run {self.info.path.name}: " + "; ".join(self.logger.errors[-3:]))

    def execute(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run once on torch's current stream (inputs already prepared)."""
        outputs = self._bind(inputs)
        self._enqueue(torch.cuda.current_stream())
        return outputs

    # -- CUDA graphs
    def _capture(self, inputs: dict[str, torch.Tensor]) -> _Captured:
        static_in = {n: t.clone() for n, t in inputs.items()}
        outputs = self._bind(static_in)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                self._enqueue(stream)  # TensorRT allocates lazily on the first run at a new shape
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self._enqueue(stream)
        except RuntimeError as exc:  # capture refused (e.g. a plugin syncs the stream)
            log(f"tensorrt: CUDA graph capture failed at shapes {self._key(inputs)} ({exc}); running this shape without graphs")
            torch.cuda.synchronize()
            graph = None
        torch.cuda.current_stream().wait_stream(stream)
        return _Captured(graph, static_in, outputs)

    @staticmethod
    def _key(inputs: dict[str, torch.Tensor]) -> tuple:
        return tuple((n, tuple(t.shape)) for n, t in sorted(inputs.items()))

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Check, prepare and run; returns fresh output tensors the caller may keep."""
        inputs = self.prepare(feeds)
        if not self.cuda_graphs:
            return self.execute(inputs)
        key = self._key(inputs)
        cap = self._captured.get(key)
        if cap is None:
            cap = self._captured[key] = self._capture(inputs)
        for name, t in inputs.items():
            cap.inputs[name].copy_(t, non_blocking=True)
        if cap.graph is None:
            self._rebind(cap)
            self._enqueue(torch.cuda.current_stream())
        else:
            cap.graph.replay()
        return {n: t.clone() for n, t in cap.outputs.items()}

    def _rebind(self, cap: _Captured) -> None:
        """Point the context at `cap`'s buffers again (another shape may have been bound since)."""
        for name in self.input_names:
            self.context.set_input_shape(name, tuple(cap.inputs[name].shape))
            self.context.set_tensor_address(name, cap.inputs[name].data_ptr())
        for name in self.output_names:
            self.context.set_tensor_address(name, cap.outputs[name].data_ptr())
