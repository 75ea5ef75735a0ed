"""Reconstructed integer weights on disk (`reconstruction.safetensors`) and the table beside it.

Per layer the integer weight in PyTorch's layout (int8 storage, values on the recipe's grid:
[-8, 7] for W4, [-128, 127] for W8 as QuantizeLinear saturates) and its per-output-channel scale;
a split-shortcut layer has `weight_int_a`/`weight_int_b` and `weight_scale_a`/`weight_scale_b`
for its two input-channel slices. The file's metadata names the model (its sha256), the weight
bits and the method, so a reconstruction is never applied to another model: `check_model`
refuses it, naming both. Loading refuses any value off the grid.

Learned activation steps are not stored here: they go into a calibration table
(`reconstruction.calibration.json`) as ranges amax = step x qmax, which every stage already
reads. The Q/DQ pass and the fake-quant reference take this object (`weights=`) and use the
integers instead of rounding the float weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qdiff.core.artifacts import atomic_path
from qdiff.core.errors import CalibrationError

FORMAT = "qdiff-reconstruction/1"
ROLES = ("", "_a", "_b")


@dataclass
class LayerWeights:
    """One layer's integer weights and scales; `parts` keyed by "" (unsplit) or "_a"/"_b"."""

    parts: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # role -> (int8 weight, float32 scale)

    @property
    def split(self) -> bool:
        return "_a" in self.parts


@dataclass
class ReconstructedWeights:
    model_sha256: str
    weight_bits: int
    method: str
    layers: dict[str, LayerWeights] = field(default_factory=dict)
    source: str = "reconstruction"

    @property
    def qmax(self) -> int:
        return 2 ** (self.weight_bits - 1) - 1

    def dequantized(self, name: str, role: str = "", axis: int = 0) -> np.ndarray:
        """Integer weight x scale (float32), in PyTorch's layout; `axis` is the output-channel
        axis of that layout (1 for ConvTranspose). QuantizeLinear maps it back to the same
        integers exactly: (q * s) / s rounds to q for |q| <= 128."""
        q, s = self.layer(name).parts[role]
        shape = [1] * q.ndim
        shape[axis] = -1
        return (q.astype(np.float32) * s.reshape(shape)).astype(np.float32)

    def check_model(self, model_sha256: str, label: str) -> None:
        if self.model_sha256 != model_sha256:
            raise CalibrationError(
                f"{self.source} was reconstructed for model {self.model_sha256[:12]}, not for {label} ({model_sha256[:12]})",
                hint="run `qdiff reconstruct` on this model's calibration table",
            )

    def layer(self, name: str) -> LayerWeights:
        if name not in self.layers:
            raise CalibrationError(f"{self.source} has no weights for layer {name!r}", hint="the reconstruction was made with another recipe or model; rerun `qdiff reconstruct`")
        return self.layers[name]

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors = {}
        for name, lw in sorted(self.layers.items()):
            for role, (q, s) in lw.parts.items():
                tensors[f"{name}.weight_int{role}"] = np.ascontiguousarray(q.astype(np.int8))
                tensors[f"{name}.weight_scale{role}"] = np.ascontiguousarray(s.astype(np.float32))
        meta = {"format": FORMAT, "model_sha256": self.model_sha256, "weight_bits": str(self.weight_bits), "method": self.method}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> ReconstructedWeights:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"reconstruction {path} does not exist", hint="run `qdiff reconstruct` first")
        try:
            with safe_open(str(path), framework="np") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise CalibrationError(f"reconstruction {path} is not a readable safetensors file: {exc}", hint="rerun `qdiff reconstruct`") from exc
        if meta.get("format") != FORMAT or not meta.get("model_sha256") or meta.get("weight_bits") not in ("4", "8"):
            raise CalibrationError(f"reconstruction {path}: metadata {meta} is not {FORMAT}", hint="the file was made by another tool or version; rerun `qdiff reconstruct`")
        out = cls(meta["model_sha256"], int(meta["weight_bits"]), meta.get("method", ""), source=str(path))
        lo, hi = -out.qmax - 1, out.qmax
        for key, q in tensors.items():
            name, _, tail = key.rpartition(".")
            if not tail.startswith("weight_int"):
                continue
            role = tail[len("weight_int") :]
            scale_key = f"{name}.weight_scale{role}"
            if role not in ROLES or scale_key not in tensors or q.dtype != np.int8:
                raise CalibrationError(f"reconstruction {path}: tensor {key} is malformed (dtype {q.dtype}, scale {scale_key} {'present' if scale_key in tensors else 'missing'})")
            if q.size and (q.min() < lo or q.max() > hi):
                raise CalibrationError(f"reconstruction {path}: tensor {key} has values in [{q.min()}, {q.max()}], off the W{out.weight_bits} grid [{lo}, {hi}]")
            s = tensors[scale_key]
            if not np.all(np.isfinite(s) & (s > 0)):
                raise CalibrationError(f"reconstruction {path}: scale {scale_key} is not finite and positive")
            out.layers.setdefault(name, LayerWeights()).parts[role] = (q, s.astype(np.float32))
        return out


def weights_from_model(model: torch.nn.Module, model_sha256: str, weight_bits: int, method: str) -> ReconstructedWeights:
    """The fixed integers and scales of every `ReconLayer` of a reconstructed model."""
    from qdiff.calib.reconstruct.qlayer import ReconLayer

    out = ReconstructedWeights(model_sha256, weight_bits, method)
    for name, module in model.named_modules():
        if not isinstance(module, ReconLayer):
            continue
        lw = LayerWeights()
        for part in module.parts:
            role = f"_{part.role}" if part.role else ""
            lw.parts[role] = (part.fixed.detach().cpu().numpy().astype(np.int8), part.scale.detach().cpu().reshape(-1).numpy().astype(np.float32))
        out.layers[name] = lw
    return out
