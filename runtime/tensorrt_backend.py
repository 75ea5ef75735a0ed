"""TensorRT engines as denoisers: for qdiff's sampling loop and as a diffusers `pipe.unet`.

The engine runner itself (binding torch tensors, profile checks, CUDA graphs) is
`qdiff.engines.runner.TensorRTEngine`; it is re-exported here under its old import path. This
module adds the denoiser contract (runtime.backends) and the diffusers drop-in on top of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qdiff.engines.runner import TensorRTEngine
from qdiff.core.errors import EngineMismatchError, SamplingError
from qdiff.runtime.backends import timestep_batch

__all__ = ["OUTPUT_NAME", "TensorRTDenoiser", "TensorRTEngine", "TensorRTUNet"]

OUTPUT_NAME = "out_sample"


class TensorRTDenoiser:
    """The qdiff denoiser contract over an engine (see runtime.backends)."""

    name = "tensorrt"

    def __init__(self, engine: str | Path, *, verify: bool = True, cuda_graphs: bool = True) -> None:
        self.engine = TensorRTEngine(engine, verify=verify, cuda_graphs=cuda_graphs)
        self.device = self.engine.device

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor | None = None, **added_cond: torch.Tensor) -> torch.Tensor:
        feeds = {"sample": sample, "timestep": timestep_batch(timestep, sample.shape[0])}
        if encoder_hidden_states is not None:
            feeds["encoder_hidden_states"] = encoder_hidden_states
        feeds.update(added_cond)
        out = self.engine.run(feeds)[OUTPUT_NAME]
        return out.to(device=sample.device, dtype=sample.dtype)


class TensorRTUNet(torch.nn.Module):
    """A diffusers-compatible UNet backed by an engine: `pipe.unet = TensorRTUNet(engine_dir)`.

    It answers what pipelines ask of a UNet (`config`, `dtype`, `device`, the forward signature,
    `return_dict`), takes its config from the engine's manifest (recorded at export), and runs
    every call through the same checked, graph-captured path as `TensorRTDenoiser`.
    """

    def __init__(self, engine: str | Path, *, config: Any = None, verify: bool = True, cuda_graphs: bool = True) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.denoiser = TensorRTDenoiser(engine, verify=verify, cuda_graphs=cuda_graphs)
        cfg = config if config is not None else self.denoiser.engine.info.unet_config
        if cfg is None:
            raise EngineMismatchError(
                f"engine {self.denoiser.engine.info.path} does not record the UNet config a pipeline needs",
                hint="pass config=pipe.unet.config, or rebuild from a graph exported by `qdiff export`",
            )
        self.config = FrozenDict(dict(cfg))
        self._dtype = self.denoiser.engine.dtypes.get("sample", torch.float32)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        return_dict: bool = True,
        **unused: Any,
    ) -> Any:
        for name, value in (("class_labels", class_labels), ("timestep_cond", timestep_cond), ("attention_mask", attention_mask)):
            if value is not None:
                raise SamplingError(f"TensorRTUNet: the engine was exported without a {name} input, but the pipeline passed one", hint="export the UNet with that input, or use a pipeline that does not pass it")
        if cross_attention_kwargs and any(v is not None for v in cross_attention_kwargs.values()):
            raise SamplingError("TensorRTUNet: cross_attention_kwargs (e.g. LoRA scale) change the weights and cannot apply to a built engine", hint="fuse LoRA weights before export")
        out = self.denoiser(sample, timestep, encoder_hidden_states, **(added_cond_kwargs or {}))
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)
