#!/usr/bin/env python3
"""Reassemble the evaluation models from the parts the GPU run packed, checking every hash.

Why: the evaluation models' fp16 weights (~18 MB and ~21 MB) are not committed, and the GPU
machine returns at most 16 MiB per file. `tools/train_eval_models.py --pack DIR` therefore
writes the model folders as one uncompressed tar cut into <= 15 MB parts plus a manifest
(`eval-models.manifest.json`: the sha256 of each part, of the whole tar and of every file in
it). This tool checks each part against the manifest (a damaged or missing part is refused by
name), checks the joined tar, extracts it with tarfile's "data" filter (no absolute paths, no
`..`, no links out), checks every extracted file, and only then moves each model folder into
place, so `.eval-models/` never holds a half-unpacked model.

    python tools/unpack_eval_models.py out/gpu-run            # -> .eval-models/scenes-ddpm, ...
    python tools/unpack_eval_models.py PARTS_DIR --dest DIR
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdiff.core.artifacts import sha256_file, write_json_atomic  # noqa: E402
from qdiff.core.errors import ArtifactMismatchError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / ".eval-models"
MANIFEST_NAME = "eval-models.manifest.json"
PART_BYTES = 15_000_000
PART_PATTERN = "eval-models.tar.part{:02d}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_models(folders: list[Path], dest: Path, part_bytes: int = PART_BYTES) -> Path:
    """Tar ``folders`` (each under its own name) into parts of <= ``part_bytes`` in ``dest``; returns the manifest."""
    files: dict[str, str] = {}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for folder in folders:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                name = f"{folder.name}/{path.relative_to(folder).as_posix()}"
                info = tar.gettarinfo(str(path), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0  # the tar's bytes depend on the files only
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
                files[name] = sha256_file(path)
    data = buffer.getvalue()
    dest.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, lo in enumerate(range(0, len(data), part_bytes)):
        chunk = data[lo : lo + part_bytes]
        name = PART_PATTERN.format(i)
        (dest / name).write_bytes(chunk)
        parts.append({"name": name, "bytes": len(chunk), "sha256": _sha256(chunk)})
    manifest = {"models": [f.name for f in folders], "tar_sha256": _sha256(data), "tar_bytes": len(data), "parts": parts, "files": files}
    write_json_atomic(dest / MANIFEST_NAME, manifest)
    return dest / MANIFEST_NAME


def _read_manifest(parts_dir: Path) -> dict[str, Any]:
    path = parts_dir / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactMismatchError(f"{path} is missing", hint="pass the folder that `train_eval_models.py --pack` wrote (parts and manifest)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest["parts"], manifest["files"], manifest["models"]  # noqa: B018 - the keys must exist
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactMismatchError(f"{path} is not an eval-models manifest ({type(exc).__name__}: {exc})") from exc
    return manifest


def _joined_parts(parts_dir: Path, manifest: dict[str, Any]) -> bytes:
    chunks = []
    for part in manifest["parts"]:
        path = parts_dir / part["name"]
        if not path.is_file():
            raise ArtifactMismatchError(f"part {part['name']} is missing from {parts_dir}", hint="copy every part the GPU run wrote")
        chunk = path.read_bytes()
        if len(chunk) != part["bytes"] or _sha256(chunk) != part["sha256"]:
            raise ArtifactMismatchError(
                f"part {part['name']} ({path}) does not match the manifest: {len(chunk)} bytes, sha256 {_sha256(chunk)[:16]}..., "
                f"expected {part['bytes']} bytes, sha256 {part['sha256'][:16]}...",
                hint="the part is damaged or from another run; copy it again",
            )
        chunks.append(chunk)
    data = b"".join(chunks)
    if _sha256(data) != manifest["tar_sha256"]:
        raise ArtifactMismatchError(f"the joined parts in {parts_dir} do not hash to the manifest's tar_sha256", hint="parts from different runs? copy them again")
    return data


def unpack(parts_dir: Path, dest: Path = DEFAULT_DEST, force: bool = False) -> list[Path]:
    """Check and extract the packed models into ``dest/<name>/``; returns the model folders."""
    parts_dir, dest = Path(parts_dir), Path(dest)
    manifest = _read_manifest(parts_dir)
    data = _joined_parts(parts_dir, manifest)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack.", dir=dest))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(staging, filter="data")
        extracted = {p.relative_to(staging).as_posix(): p for p in staging.rglob("*") if p.is_file()}
        if set(extracted) != set(manifest["files"]):
            raise ArtifactMismatchError(f"the tar's files differ from the manifest's: {sorted(set(extracted) ^ set(manifest['files']))[:5]}")
        bad = [name for name, path in extracted.items() if sha256_file(path) != manifest["files"][name]]
        if bad:
            raise ArtifactMismatchError(f"extracted files do not match the manifest: {bad[:5]}")
        folders = []
        for model in manifest["models"]:
            target = dest / model
            if target.exists():
                if not force:
                    raise ArtifactMismatchError(f"{target} already exists", hint="pass --force to replace it")
                shutil.rmtree(target)
            (staging / model).replace(target)
            folders.append(target)
        return folders
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("parts_dir", type=Path, help="folder with eval-models.tar.partNN and eval-models.manifest.json")
    p.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    p.add_argument("--force", action="store_true", help="replace model folders that already exist")
    args = p.parse_args(argv)
    try:
        folders = unpack(args.parts_dir, args.dest, force=args.force)
    except ArtifactMismatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for folder in folders:
        print(f"unpacked {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
