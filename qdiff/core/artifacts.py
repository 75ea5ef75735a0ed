"""Artifacts on disk: atomic writes, content hashes and the manifest beside each artifact.

A stage may run for minutes and be killed at any point, so nothing is ever written in place:
bytes go to a temporary file in the destination folder and are renamed over the target, which
POSIX makes atomic. A reader therefore sees the previous artifact or the new one, never half.

Each artifact `X` gets `X.manifest.json` saying what it was made from (input hashes, settings,
versions). A stage compares the manifest it would write with the one on disk to decide whether
its work can be skipped, instead of trusting file timestamps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qdiff.core._version import __version__
from qdiff.core.errors import ArtifactMismatchError
from qdiff.core.progress import log

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_SCHEMA = 1


# Temporary files carry the writer's process id, `.<name>.~<pid>~<random><suffix>.tmp`, so the
# next successful write of the same artifact can tell the leftovers of a killed writer (pid gone)
# from the file a live concurrent writer is still filling (pid alive), and delete only the former.
_TEMP_TAG = "~"


def new_temp_path(target: str | os.PathLike[str], suffix: str = "") -> Path:
    """Create an empty temporary file beside `target` (same folder, so renaming it is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{_TEMP_TAG}{os.getpid()}{_TEMP_TAG}", suffix=suffix + ".tmp", dir=target.parent)
    try:
        # mkstemp makes the file 0600; once renamed into place it must read like any file the
        # user writes (0666 less their umask), so set that now, before anything is written.
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(tmp)


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: alive, someone else's; overflow: not a pid we made
        return True
    return True


def remove_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files of `target` whose writer is dead (killed mid-write).

    Only POSIX can ask whether a pid is alive without side effects; elsewhere nothing is removed.
    A temporary file of a live writer is never touched, so concurrent writers stay safe.
    """
    target = Path(target)
    if os.name != "posix" or not target.parent.is_dir():
        return []
    prefix = f".{target.name}.{_TEMP_TAG}"
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+){_TEMP_TAG}.*\.tmp(\.data)?$")
    removed = []
    with os.scandir(target.parent) as entries:  # cheap even in a folder of many images
        for entry in entries:
            match = pattern.match(entry.name) if entry.name.startswith(prefix) else None
            if match and not pid_alive(int(match.group(1))):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make renames in `folder` durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive advisory lock on a folder, for publishing steps that rename several files.

    The kernel releases it when the holder dies, so a SIGKILL never leaves it stuck. Without
    `fcntl` (Windows) publishing is not serialized.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only on success.

    The temporary file lives in the same folder so the final `os.replace` never crosses a
    file system (which would make it a copy, not an atomic rename). Two writers of the same
    target each rename a whole file, so the last one wins and neither corrupts the other.
    After a successful write, temporary files that killed writers left behind are removed.
    """
    target = Path(target)
    tmp_path = new_temp_path(target, suffix)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
    remove_stale_temps(target)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: list[Path], root: Path) -> str:
    """One hash over several files, each keyed by its path relative to `root` (stable order)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour an artifact depends on."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "onnx", "onnxruntime", "pytorch_quantization", "tensorrt"):
        try:
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", "unknown"))
        except Exception:  # noqa: BLE001 - a missing optional library is simply not recorded
            continue
    versions["qdiff"] = __version__
    return versions


def manifest_path(artifact: str | os.PathLike[str]) -> Path:
    return Path(str(artifact) + MANIFEST_SUFFIX)


@dataclass
class Manifest:
    """What an artifact was made from. `inputs` and `settings` decide reuse; the rest informs."""

    kind: str
    inputs: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    # Facts about the result (validation errors, coverage) that inform but do not decide reuse.
    details: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    schema: int = MANIFEST_SCHEMA

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "kind": self.kind,
            "created": self.created,
            "inputs": self.inputs,
            "settings": self.settings,
            "outputs": self.outputs,
            "details": self.details,
            "versions": self.versions,
        }

    @classmethod
    def from_json(cls, obj: Any, source: str = "manifest") -> Manifest:
        """Parse strictly: anything that is not exactly a manifest is an ArtifactMismatchError."""
        if not isinstance(obj, dict):
            raise ArtifactMismatchError(f"{source}: expected a JSON object, got {type(obj).__name__}")
        schema = obj.get("schema")
        if isinstance(schema, bool) or schema != MANIFEST_SCHEMA:
            raise ArtifactMismatchError(
                f"{source}: manifest schema {schema!r} is not {MANIFEST_SCHEMA}",
                hint="the artifact was made by another qdiff version; rebuild it",
            )
        for key in ("inputs", "settings", "outputs", "details", "versions"):
            if not isinstance(obj.get(key, {}), dict):
                raise ArtifactMismatchError(f"{source}: field {key!r} must be an object")
        # Hashes and versions are compared as strings; anything else would never match.
        for key in ("inputs", "outputs", "versions"):
            if not all(isinstance(v, str) for v in obj.get(key, {}).values()):
                raise ArtifactMismatchError(f"{source}: field {key!r} must map names to strings")
        if not isinstance(obj.get("kind"), str):
            raise ArtifactMismatchError(f"{source}: field 'kind' must be a string")
        if not isinstance(obj.get("created", ""), str):
            raise ArtifactMismatchError(f"{source}: field 'created' must be a string")
        return cls(
            kind=obj["kind"],
            inputs=dict(obj.get("inputs", {})),
            settings=dict(obj.get("settings", {})),
            outputs=dict(obj.get("outputs", {})),
            details=dict(obj.get("details", {})),
            versions=dict(obj.get("versions", {})),
            created=obj.get("created", ""),
        )

    # Typed accessors for the keys stages read from each other's manifests.

    @property
    def model_sha256(self) -> str | None:
        """The model the artifact was made from (`inputs["model_sha256"]`), if recorded."""
        value = self.inputs.get("model_sha256")
        return value or None

    @property
    def sha256(self) -> str | None:
        """The artifact's own hash (`outputs["sha256"]`), if recorded."""
        return self.outputs.get("sha256")

    @property
    def unet_config(self) -> dict[str, Any] | None:
        """The UNet config the export recorded (`details["unet_config"]`), copied downstream."""
        return self.details.get("unet_config")

    @property
    def sample_size(self) -> int | None:
        """The UNet's latent sample size from `unet_config`, if recorded."""
        return config_sample_size(self.unet_config)

    @property
    def coverage(self) -> dict[str, Any] | None:
        """A quantized graph's coverage report as JSON (`details["coverage"]`)."""
        return self.details.get("coverage")

    def matches(self, other: Manifest) -> bool:
        """True when `other` describes the same recipe applied to the same inputs."""
        return (self.kind, self.inputs, _jsonable(self.settings)) == (
            other.kind,
            other.inputs,
            _jsonable(other.settings),
        )


def config_sample_size(unet_config: dict[str, Any] | None) -> int | None:
    """`sample_size` of a UNet config (the first of a [h, w] pair), or None when absent."""
    size = (unet_config or {}).get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) if isinstance(size, int) and not isinstance(size, bool) else None


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def write_manifest(artifact: str | os.PathLike[str], manifest: Manifest) -> Path:
    path = manifest_path(artifact)
    write_json_atomic(path, manifest.to_json())
    return path


def read_manifest(artifact: str | os.PathLike[str]) -> Manifest | None:
    path = manifest_path(artifact)
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ArtifactMismatchError(f"{path}: not valid JSON ({type(exc).__name__}: {exc})", hint="delete it and rerun the stage") from exc
    except OSError as exc:
        raise ArtifactMismatchError(f"{path}: cannot be read ({exc})", hint="delete it and rerun the stage") from exc
    return Manifest.from_json(obj, source=str(path))


def check_made_from_model(artifact: str | os.PathLike[str], model_sha256: str, model_label: str, error: type[Exception] = ArtifactMismatchError) -> str:
    """Refuse an artifact whose manifest names another model; say what was checked otherwise.

    Run before an artifact is used with a model (sampling a graph, evaluating it), so a graph
    exported from one model is never driven with another model's scheduler, size or conditioning.
    """
    path = Path(artifact)
    try:
        manifest = read_manifest(path)
    except ArtifactMismatchError as exc:
        raise error(f"{path}: its manifest is unreadable ({exc.message})", hint="re-export or re-quantize it") from exc
    if manifest is None:
        return "no manifest: not checked against the model"
    made_from = manifest.model_sha256
    if made_from and made_from != model_sha256:
        raise error(
            f"{path.name} was made from model {made_from[:12]}, but {model_label} is {model_sha256[:12]}",
            hint="pass the model folder the graph was made from (or re-export and re-quantize it from this one)",
        )
    return "manifest matches the model" if made_from else "manifest names no model"


def up_to_date_manifest(artifact: str | os.PathLike[str], wanted: Manifest) -> Manifest | None:
    """The manifest on disk when the artifact can be reused (it exists, its manifest matches,
    its bytes are intact), else None."""
    artifact = Path(artifact)
    if not artifact.exists():
        return None
    try:
        have = read_manifest(artifact)
    except ArtifactMismatchError:
        return None
    if have is None or not wanted.matches(have):
        return None
    recorded = have.sha256
    return have if recorded is None or recorded == sha256_file(artifact) else None


def is_up_to_date(artifact: str | os.PathLike[str], wanted: Manifest) -> bool:
    """An artifact can be reused when it exists, its manifest matches, and its bytes are intact."""
    return up_to_date_manifest(artifact, wanted) is not None


STAGING_PREFIX = ".qdiff-staging-"


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder inside `out_dir` (same file system, so publishing is a rename).

    Named with the writer's pid; folders of writers that were killed are removed here.
    """
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{STAGING_PREFIX}*"):
        pid = stale.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out_dir) as tmp:
        yield Path(tmp)


@dataclass
class CachedStage:
    """The sequence every caching stage runs: up-to-date check -> staging folder -> publish ->
    hash -> manifest.

        stage = CachedStage(target, wanted, log_as="export", why="same model and settings")
        if (have := stage.reusable(force)) is not None:
            return Result(target, have.details..., reused=True)
        with stage.staging() as tmp:
            ...write tmp / target.name, then publish it to target...
        stage.record({"seconds": ...})

    `companions` are files written beside the artifact whose hashes the manifest's `outputs`
    keep under their own keys (`{"stats_sha256": path}`): reuse needs each to be intact too, and
    `record` hashes each one that exists.
    """

    target: Path
    wanted: Manifest
    log_as: str = ""
    why: str = ""
    companions: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.target = Path(self.target)

    def reusable(self, force: bool = False) -> Manifest | None:
        """The manifest on disk when the artifact (and every companion) is up to date, else None;
        logs `<log_as>: <target> is up to date (<why>); skipping` when it is."""
        if force:
            return None
        have = up_to_date_manifest(self.target, self.wanted)
        if have is None:
            return None
        for key, path in self.companions.items():
            recorded = have.outputs.get(key)
            if recorded is None or not Path(path).is_file() or sha256_file(path) != recorded:
                return None
        if self.log_as:
            log(f"{self.log_as}: {self.target} is up to date" + (f" ({self.why})" if self.why else "") + "; skipping")
        return have

    def staging(self) -> contextlib.AbstractContextManager[Path]:
        """A staging folder beside the target (same file system, so publishing is a rename)."""
        return staging_dir(self.target.parent)

    def record(self, details: dict[str, Any] | None = None, *, write: bool = True) -> Manifest:
        """After publishing: hash the target (and companions that exist) into `outputs`, merge
        `details`, write the manifest beside the target. Returns the manifest."""
        self.wanted.outputs = {"sha256": sha256_file(self.target)}
        for key, path in self.companions.items():
            if Path(path).is_file():
                self.wanted.outputs[key] = sha256_file(path)
        if details:
            self.wanted.details.update(details)
        if write:
            write_manifest(self.target, self.wanted)
        return self.wanted
