"""What an engine was built from and for, and the check that runs before one is loaded.

A TensorRT plan only runs on the TensorRT version and the GPU model that built it; loading it
elsewhere fails deep inside TensorRT, or worse, runs tactics tuned for another chip. The
manifest beside each plan records the graph, the TensorRT version, the GPU and its compute
capability, the precision and the profile. `verify_engine` compares them with the running
machine and with the plan's bytes, and says what to rebuild when they differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdiff.engines.profiles import Profile, profile_from_json
from qdiff.core.artifacts import Manifest, read_manifest, sha256_file
from qdiff.core.errors import EngineMismatchError

ENGINE_KIND = "tensorrt-engine"
ENGINE_FILE = "engine.plan"


@dataclass(frozen=True)
class Platform:
    """The TensorRT version and GPU an engine is for."""

    tensorrt: str
    gpu: str
    compute_capability: str

    def to_inputs(self) -> dict[str, str]:
        return {"tensorrt": self.tensorrt, "gpu": self.gpu, "compute_capability": self.compute_capability}


def current_platform(device: int = 0) -> Platform:
    import torch

    from qdiff.engines.compat import import_tensorrt

    trt = import_tensorrt()
    if not torch.cuda.is_available():
        from qdiff.core.errors import BackendUnavailableError

        raise BackendUnavailableError("TensorRT engines need a CUDA GPU, and torch sees none here", hint="run on a machine with an NVIDIA GPU")
    major, minor = torch.cuda.get_device_capability(device)
    return Platform(str(trt.__version__), torch.cuda.get_device_name(device), f"{major}.{minor}")


def engine_path(engine: str | Path) -> Path:
    """An engine folder (holding engine.plan) or the plan file itself."""
    engine = Path(engine)
    return engine / ENGINE_FILE if engine.is_dir() or engine.suffix != ".plan" else engine


@dataclass
class EngineInfo:
    """The parts of an engine manifest the runtime and the inspector use."""

    path: Path
    manifest: Manifest

    @property
    def profile(self) -> Profile:
        return profile_from_json(self.manifest.settings["profile"])

    @property
    def precision(self) -> str:
        return str(self.manifest.settings["precision"])

    @property
    def unet_config(self) -> dict[str, Any] | None:
        return self.manifest.unet_config


def read_engine_manifest(engine: str | Path) -> EngineInfo:
    path = engine_path(engine)
    if not path.exists():
        raise EngineMismatchError(f"no engine at {path}", hint="build one with `qdiff build ONNX -o ENGINE_DIR`")
    manifest = read_manifest(path)
    if manifest is None:
        raise EngineMismatchError(f"{path} has no manifest ({path.name}.manifest.json)", hint="rebuild it with `qdiff build` so its graph, TensorRT and GPU are recorded")
    if manifest.kind != ENGINE_KIND:
        raise EngineMismatchError(f"{path}'s manifest describes a {manifest.kind!r}, not a TensorRT engine")
    for key in ("precision", "profile"):
        if key not in manifest.settings:
            raise EngineMismatchError(f"{path}'s manifest lacks settings.{key}", hint="rebuild it with `qdiff build`")
    return EngineInfo(path, manifest)


def mismatches(manifest: Manifest, platform: Platform) -> list[str]:
    """Why an engine built per `manifest` cannot run on `platform` (empty when it can)."""
    problems = []
    built = manifest.inputs
    if built.get("tensorrt") != platform.tensorrt:
        problems.append(f"it was built with TensorRT {built.get('tensorrt')}, this is TensorRT {platform.tensorrt}")
    if built.get("compute_capability") != platform.compute_capability or built.get("gpu") != platform.gpu:
        problems.append(f"it was built for {built.get('gpu')} (sm {built.get('compute_capability')}), this GPU is {platform.gpu} (sm {platform.compute_capability})")
    return problems


def verify_engine(engine: str | Path, platform: Platform | None = None, check_bytes: bool = True) -> EngineInfo:
    """Refuse an engine that was built elsewhere or whose bytes changed since it was built."""
    info = read_engine_manifest(engine)
    platform = platform or current_platform()
    problems = mismatches(info.manifest, platform)
    if check_bytes:
        want = info.manifest.sha256
        if want != sha256_file(info.path):
            problems.append("its bytes differ from the sha256 its manifest recorded (a partial copy, or another build's plan)")
    if problems:
        onnx = info.manifest.details.get("onnx_path", "ONNX")
        raise EngineMismatchError(
            f"engine {info.path} cannot be used here: " + "; ".join(problems),
            hint=f"rebuild it: qdiff build {onnx} -o {info.path.parent} --precision {info.precision} --force",
        )
    return info
