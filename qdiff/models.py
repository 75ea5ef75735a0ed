"""Loading denoisers from local diffusers folders, and the built-in default model.

Nothing is ever downloaded: a model is a local folder, read with diffusers' own
`from_pretrained`. Two layouts are accepted:

- a pipeline folder: `model_index.json`, `unet/`, `scheduler/`, and for text-to-image models
  `text_encoder/`, `tokenizer/`, `vae/`; qdiff's class-conditional models add `conditioning/`;
- a bare UNet folder: `config.json` plus weights.

The model hash that calibration tables and manifests record covers the UNet's config and
weights only, since that is what quantization depends on.

Weight files are checked before any library opens them: safetensors headers must parse, and
pickle-based files (`.bin`, `.pt`, ...) must load with `torch.load(weights_only=True)`, so a
pickle that would import and call arbitrary code (`os.system`, ...) is refused by name instead
of trusting that every loader diffusers or transformers uses passes `weights_only` too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: `qdiff --help` and path errors stay fast
    import torch

from qdiff.core.artifacts import sha256_files
from qdiff.core.errors import ModelLoadError

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Files that hold a pickle: loading them with plain `torch.load` can run code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PACKAGE_MODELS = Path(__file__).parent / "models"
# The built-in default model. Trained weights ship in qdiff/models/<name>; when that folder is
# missing, a seeded random-weight model is materialized from the config of the same name.
DEFAULT_MODEL = "shapes-ddpm"
DEFAULT_RANDOM_CONFIG = Path(__file__).parent / "configs" / "tiny-ddpm-unet.json"


@dataclass
class ModelBundle:
    """A denoiser and what sampling around it needs, loaded from one folder."""

    path: Path
    unet: torch.nn.Module
    unet_dir: Path
    scheduler_config: dict[str, Any] | None
    model_sha256: str
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: Any | None = None
    class_embeddings: torch.Tensor | None = None
    class_names: list[str] | None = None

    @property
    def is_conditional(self) -> bool:
        return type(self.unet).__name__ == "UNet2DConditionModel"

    @property
    def unet_class(self) -> str:
        return type(self.unet).__name__

    @property
    def sample_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def writes_latents(self) -> bool:
        """True for a latent denoiser without a VAE: its "images" are raw latents."""
        return self.vae is None and self.in_channels not in (1, 3)

    @property
    def output_kind(self) -> str:
        """What the sampled arrays are, said plainly in logs and reports."""
        if self.vae is not None:
            return "images (decoded by the folder's VAE)"
        if not self.writes_latents:
            return "images (pixel-space model)"
        return (f"raw {self.in_channels}-channel latents: the folder has no VAE, so PNGs hold latents "
                "(RGBA for 4 channels) and PSNR/SSIM compare latents, not images")

    @property
    def label(self) -> str:
        return self.path.name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return obj


def find_unet_dir(model_dir: Path) -> Path:
    """The folder that holds the UNet's config.json: `unet/` of a pipeline, or the folder itself."""
    if not model_dir.exists():
        raise ModelLoadError(f"model folder {model_dir} does not exist", hint="pass a local diffusers folder")
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir} is not a folder", hint="pass a local diffusers pipeline or UNet folder")
    if (model_dir / "model_index.json").is_file():
        unet_dir = model_dir / "unet"
        if not (unet_dir / "config.json").is_file():
            raise ModelLoadError(f"pipeline folder {model_dir} has no unet/config.json")
        return unet_dir
    if (model_dir / "config.json").is_file():
        return model_dir
    raise ModelLoadError(
        f"{model_dir} is neither a diffusers pipeline folder (model_index.json) nor a UNet folder (config.json)",
        hint="point at the folder that `DiffusionPipeline.save_pretrained` or `UNet2D*.save_pretrained` wrote",
    )


def check_weight_file(path: Path) -> None:
    """Refuse a weight file that is damaged or could run code, naming it, before it is loaded."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:  # reads and validates the header only
                fh.keys()
        except Exception as exc:
            raise ModelLoadError(
                f"{path} is not a valid safetensors file ({type(exc).__name__}: {exc})",
                hint="the file may be truncated or damaged; copy the model folder again",
            ) from exc
    elif path.suffix in PICKLE_SUFFIXES:
        import pickle
        import warnings
        import zipfile

        import torch

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # mmap: the zip format's tensors are mapped, not read, so the check is cheap.
                torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")
            raise ModelLoadError(
                f"{path} is a pickle that would run code or build non-tensor objects when loaded ({reason.strip()}); refusing to load it",
                hint="get the .safetensors weights, or convert this file with a tool you trust on a machine you can throw away",
            ) from exc
        except Exception as exc:
            raise ModelLoadError(
                f"{path} is not a readable PyTorch weights file ({type(exc).__name__}: {exc})",
                hint="the file may be truncated or damaged; copy the model folder again",
            ) from exc


def check_weight_files(folder: Path) -> None:
    """`check_weight_file` on every weight file of a component folder (shards included)."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".safetensors", *PICKLE_SUFFIXES):
            check_weight_file(path)


def unet_sha256(unet_dir: Path) -> str:
    files = [unet_dir / "config.json"] + [p for p in unet_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    return sha256_files(files, unet_dir)


def _load_unet(unet_dir: Path) -> torch.nn.Module:
    import diffusers
    import torch

    config = _read_json(unet_dir / "config.json")
    class_name = config.get("_class_name")
    if class_name not in UNET_CLASSES:
        raise ModelLoadError(
            f"{unet_dir / 'config.json'}: _class_name is {class_name!r}; qdiff exports {' and '.join(UNET_CLASSES)}"
        )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in unet_dir.iterdir()):
        raise ModelLoadError(f"{unet_dir} has a config.json but no weights (.safetensors or .bin)")
    check_weight_files(unet_dir)
    cls = getattr(diffusers, class_name)
    try:
        # Weights are upcast to float32: calibration statistics and the ONNX export are float32.
        unet = cls.from_pretrained(unet_dir, torch_dtype=torch.float32, low_cpu_mem_usage=False)
    except Exception as exc:  # diffusers raises many types here; name the folder and the cause
        raise ModelLoadError(f"diffusers could not load {unet_dir}: {type(exc).__name__}: {exc}") from exc
    return unet.float().eval().requires_grad_(False)


def _load_optional(model_dir: Path, sub: str, cls_name: str, module: str) -> Any | None:
    folder = model_dir / sub
    if not folder.is_dir():
        return None
    check_weight_files(folder)
    import torch

    lib = __import__(module, fromlist=[cls_name])
    cls = getattr(lib, cls_name)
    try:
        obj = cls.from_pretrained(folder)
    except Exception as exc:
        raise ModelLoadError(f"could not load {folder} as {cls_name}: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, torch.nn.Module):
        obj = obj.float().eval().requires_grad_(False)
    return obj


def _load_class_embeddings(model_dir: Path) -> tuple[torch.Tensor | None, list[str] | None]:
    folder = model_dir / "conditioning"
    weights = folder / "class_embeddings.safetensors"
    if not weights.is_file():
        return None, None
    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except Exception as exc:
        raise ModelLoadError(f"{weights} is not a readable safetensors file ({type(exc).__name__}: {exc})", hint="copy the model folder again") from exc
    if "embeddings" not in tensors or tensors["embeddings"].ndim != 3:
        raise ModelLoadError(f"{weights} must hold a tensor 'embeddings' of shape [classes + 1, tokens, dim]")
    if not torch.isfinite(tensors["embeddings"].float()).all():
        raise ModelLoadError(f"{weights}: tensor 'embeddings' holds NaN or Inf values", hint="the file is damaged; copy the model folder again")
    names = None
    if (folder / "classes.json").is_file():
        names = list(_read_json(folder / "classes.json").get("class_names", []))
    return tensors["embeddings"].float(), names


def load_model(model_dir: str | os.PathLike[str] | None = None, *, components: bool = True) -> ModelBundle:
    """Load a denoiser (and, with `components`, its scheduler config, VAE, text encoder...).

    `model_dir=None` loads the built-in default model.
    """
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    unet_dir = find_unet_dir(model_dir)
    unet = _load_unet(unet_dir)
    is_pipeline = unet_dir != model_dir
    scheduler_config = None
    if is_pipeline and (model_dir / "scheduler" / "scheduler_config.json").is_file():
        scheduler_config = _read_json(model_dir / "scheduler" / "scheduler_config.json")
    bundle = ModelBundle(
        path=model_dir,
        unet=unet,
        unet_dir=unet_dir,
        scheduler_config=scheduler_config,
        model_sha256=unet_sha256(unet_dir),
    )
    if is_pipeline and components:
        bundle.vae = _load_optional(model_dir, "vae", "AutoencoderKL", "diffusers")
        if (model_dir / "text_encoder").is_dir():
            bundle.text_encoder = _load_optional(model_dir, "text_encoder", "CLIPTextModel", "transformers")
            bundle.tokenizer = _load_optional(model_dir, "tokenizer", "CLIPTokenizer", "transformers")
        bundle.class_embeddings, bundle.class_names = _load_class_embeddings(model_dir)
    return bundle


def default_model_dir() -> Path:
    """The built-in model: trained weights shipped in the package, else seeded random weights."""
    shipped = PACKAGE_MODELS / DEFAULT_MODEL
    if (shipped / "model_index.json").is_file():
        return shipped
    return materialize_random_model(DEFAULT_RANDOM_CONFIG, cache_dir() / "models" / "tiny-ddpm-random")


def cache_dir() -> Path:
    return Path(os.environ.get("QDIFF_CACHE", Path.home() / ".cache" / "qdiff"))


def materialize_random_model(config_path: Path, out_dir: Path, seed: int = 0) -> Path:
    """Write a pipeline folder with a seeded random-weight UNet2DModel and a DDPM scheduler.

    Written to a temporary folder and renamed, so a half-written model is never picked up.
    """
    if (out_dir / "model_index.json").is_file():
        return out_dir
    import tempfile

    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    config = _read_json(config_path)
    config.pop("_class_name", None)
    torch.manual_seed(seed)
    unet = UNet2DModel(**config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    from qdiff.core.artifacts import current_umask

    tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would stay on the published folder
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "DDPMPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process won the race; its folder is as good as ours
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def as_bundle(model: str | Path | ModelBundle | None, components: bool = True) -> ModelBundle:
    """A loaded model as is, or a folder (None: the built-in default) loaded."""
    return model if isinstance(model, ModelBundle) else load_model(model, components=components)


def unet_config_of(bundle: ModelBundle) -> dict[str, Any]:
    """The UNet's diffusers config, JSON-ready: kept with a graph so an engine built from it can
    stand in for the UNet inside a diffusers pipeline (which reads `unet.config`)."""
    return json.loads(json.dumps(dict(bundle.unet.config), default=str))
