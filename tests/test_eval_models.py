"""The evaluation models' pieces: the scenes dataset, the dataset registry, the training tool's
CPU smoke run (loadable folders, pack/unpack with hash checks) and the model-properties tool."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from qdiff.core.errors import ArtifactMismatchError, EvaluationError
from qdiff.datasets import scenes
from qdiff.datasets.registry import DATASET_FILE, dataset_for, get_dataset, write_dataset_file
from qdiff.models import DEFAULT_RANDOM_CONFIG, PACKAGE_MODELS, load_model, materialize_random_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import eval_model_properties  # noqa: E402
import train_eval_models  # noqa: E402
import unpack_eval_models  # noqa: E402


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- scenes


def test_scenes_are_deterministic_per_index_and_independent_of_workers():
    a = scenes.make_sample(5, seed=3, split="train")
    b = scenes.make_sample(5, seed=3, split="train")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.image, scenes.make_sample(5, seed=3, split="test").image)
    assert not np.array_equal(a.image, scenes.make_sample(5, seed=4, split="train").image)
    serial = scenes.generate(16, seed=1, split="train", start=8, workers=1)
    pooled = scenes.generate(16, seed=1, split="train", start=8, workers=2)
    assert np.array_equal(serial[0], pooled[0]) and np.array_equal(serial[1], pooled[1])
    assert np.array_equal(serial[0][3], scenes.make_image(11, seed=1, split="train")[0])
    assert serial[1].tolist() == [i % 8 for i in range(8, 24)]


def test_scenes_hold_several_overlapping_textured_shapes():
    counts = set()
    for index in range(40):
        sample = scenes.make_sample(index)
        masks = sample.masks
        counts.add(len(masks))
        assert scenes.MIN_SHAPES <= len(masks) <= scenes.MAX_SHAPES
        assert all(m.sum() >= 4.0 for m in masks), "every shape covers a few pixels at least"
        shared = [(masks[i] * masks[j]).sum() for i in range(len(masks)) for j in range(i + 1, len(masks))]
        assert max(shared) >= 1.0, f"scene {index}: no two shapes overlap"
        # the last shape drawn is on top: where it fully covers, the pixels are its fill, which
        # differs from the background that shows where nothing covers
        top = masks[-1] > 0.99
        free = np.max(masks, axis=0) < 0.01
        assert top.sum() > 0 and free.sum() > 0
        background = sample.image[free].astype(np.float32)
        assert background.std(axis=0).max() > 1.0, "the background is textured, not flat"
    assert counts == {2, 3, 4}


# --------------------------------------------------------------------------- registry


def test_registry_resolves_both_datasets_and_old_folders_default_to_shapes(tmp_path):
    assert dataset_for(PACKAGE_MODELS / "shapes-ddpm").name == "shapes"
    assert dataset_for(PACKAGE_MODELS / "shapes-cond" / "unet").name == "shapes"
    folder = tmp_path / "model"
    folder.mkdir()
    write_dataset_file(folder, "scenes", seed=0)
    assert dataset_for(folder).name == "scenes" and dataset_for(folder / "unet").name == "scenes"
    spec = get_dataset("scenes")
    images, labels = spec.generate(3, seed=0, split="test")
    assert np.array_equal(images[1], scenes.make_image(1, seed=0, split="test")[0]) and labels.tolist() == [0, 1, 2]
    assert get_dataset("shapes").classifier_dir == PACKAGE_MODELS / "shape-classifier"
    with pytest.raises(EvaluationError, match="unknown dataset 'cifar'"):
        get_dataset("cifar")
    (folder / DATASET_FILE).write_text('{"name": "scenes"}')
    with pytest.raises(EvaluationError, match="dataset.json"):
        dataset_for(folder)


# --------------------------------------------------------------------------- training tool (CPU smoke)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A small random-weight UNet2DModel pipeline folder (the built-in fallback model's config)."""
    return materialize_random_model(DEFAULT_RANDOM_CONFIG, tmp_path_factory.mktemp("tiny") / "tiny-ddpm")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    out, models, pack = root / "out", root / "models", root / "pack"
    rc = train_eval_models.main(["--smoke", "--device", "cpu", "--out", str(out), "--models-dir", str(models), "--pack", str(pack)])
    assert rc == 0
    return {"out": out, "models": models, "pack": pack, "root": root}


@pytest.mark.slow  # ~30 s alone on 2 cores, minutes on a busy machine
def test_smoke_run_writes_loadable_models_in_the_cifar_layout(smoke, tmp_path):
    metrics = json.loads((smoke["out"] / "metrics.json").read_text())
    assert metrics["status"] == "done"
    ddpm = load_model(smoke["models"] / "scenes-ddpm")
    cond = load_model(smoke["models"] / "scenes-cond")
    assert not ddpm.is_conditional and cond.is_conditional
    assert dataset_for(ddpm).name == dataset_for(cond).name == "scenes"
    for bundle, kind in ((ddpm, "ddpm"), (cond, "cond")):
        config = bundle.unet.config
        assert len(config.block_out_channels) == 4 and config.layers_per_block == 2
        weights = bundle.unet_dir / "diffusion_pytorch_model.safetensors"
        assert metrics[kind]["sha256"]["unet/diffusion_pytorch_model.safetensors"] == _sha(weights)
        assert metrics[kind]["model_sha256"] == bundle.model_sha256
        assert np.isfinite(metrics[kind]["eval"]["shape_fd"])
    blocks = [m for m in cond.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(b.attn2 is not None and b.ff is not None for b in blocks)
    assert tuple(cond.class_embeddings.shape) == (9, 4, train_eval_models.CROSS_ATTENTION_DIM)
    assert (smoke["out"] / "scene-classifier" / "classifier.safetensors").is_file()
    assert (smoke["out"] / "samples_cond.png").is_file() and (smoke["out"] / "loss_curves.png").is_file()
    unpacked = unpack_eval_models.unpack(smoke["pack"], tmp_path / "unpacked")  # what the tool's --pack wrote
    assert [f.name for f in unpacked] == ["scenes-ddpm", "scenes-cond"]
    assert load_model(unpacked[1]).model_sha256 == cond.model_sha256
    check_properties(smoke["models"] / "scenes-cond", tmp_path / "properties")


def test_pack_and_unpack_round_trip_and_a_corrupted_part_is_refused(tiny, tmp_path):
    second = tmp_path / "second"
    shutil.copytree(tiny, second)
    write_dataset_file(second, "scenes")
    folders = [tiny, second]
    parts = tmp_path / "parts"
    manifest = json.loads(unpack_eval_models.pack_models(folders, parts, part_bytes=1_000_000).read_text())
    assert len(manifest["parts"]) > 2
    restored = unpack_eval_models.unpack(parts, tmp_path / "dest")
    for original, copy in zip(folders, restored):
        files = sorted(p.relative_to(original) for p in original.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file())
        assert all(_sha(original / f) == _sha(copy / f) for f in files)
        assert load_model(copy).model_sha256 == load_model(original).model_sha256
    with pytest.raises(ArtifactMismatchError, match="already exists"):
        unpack_eval_models.unpack(parts, tmp_path / "dest")
    bad = tmp_path / "bad"
    shutil.copytree(parts, bad)
    victim = bad / manifest["parts"][1]["name"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatchError, match=manifest["parts"][1]["name"]):
        unpack_eval_models.unpack(bad, tmp_path / "never")
    assert not (tmp_path / "never" / tiny.name).exists()
    assert unpack_eval_models.main([str(bad), "--dest", str(tmp_path / "never")]) == 1


def check_properties(folder: Path, out: Path) -> dict:
    """The tool's result for ``folder``: one ratio per up-block resnet's concat of the real UNet."""
    assert eval_model_properties.main([str(folder), "--out", str(out), "--samples", "2", "--steps", "3"]) == 0
    result = json.loads((out / "properties.json").read_text())
    unet = load_model(folder).unet
    up_resnets = [f"up_blocks.{i}.resnets.{j}.conv_shortcut" for i, b in enumerate(unet.up_blocks) for j in range(len(b.resnets))]
    concat = result["concat"]["layers"]
    assert sorted(c["layer"] for c in concat) == sorted(up_resnets)
    assert all(np.isfinite(c["ratio"]) and c["ratio"] >= 1.0 for c in concat)
    assert all(c["ratio"] == pytest.approx(max(c["deep_amax"], c["skip_amax"]) / min(c["deep_amax"], c["skip_amax"])) for c in concat)
    spread = result["timestep_spread"]
    assert spread["summary"]["count"] == len(spread["layers"]) > len(concat)
    assert all(s["spread"] >= 1.0 for s in spread["layers"])
    assert len(result["timesteps"]) == 3
    assert "Skip-concat" in (out / "properties.md").read_text()
    return result


def test_properties_give_one_ratio_per_skip_concat_of_the_real_unet(tiny, tmp_path):
    result = check_properties(tiny, tmp_path / "tiny")
    assert result["dataset"] == "shapes" and len(result["concat"]["layers"]) == 6


def test_probe_variants_time_each_speed_setting_and_train_nothing(tmp_path, capsys):
    """`--probe-variants eager channels-last`: each variant probes both models (steps/s > 0, the
    channels_last one really trains in NHWC: the worker says so), the table lands in metrics.json,
    and a probe writes no model folder."""
    out, models = tmp_path / "out", tmp_path / "models"
    rc = train_eval_models.main(["--smoke", "--device", "cpu", "--out", str(out), "--models-dir", str(models), "--probe-variants", "eager", "channels-last", "--probe-steps", "2"])
    assert rc == 0
    table = json.loads((out / "metrics.json").read_text())["probe_variants"]["variants"]
    assert set(table) == {"eager", "channels-last"}
    assert all(rate > 0 for row in table.values() for rate in row["it_s"].values()) and all(set(row["it_s"]) == {"ddpm", "cond"} for row in table.values())
    printed = capsys.readouterr().out
    assert printed.count("on cpu, channels_last") == 2 and "probe-variants: channels-last" in printed
    assert not models.exists() or not any(models.iterdir())


def test_channels_last_training_saves_models_that_load_like_the_nchw_ones(tmp_path):
    """`--channels-last` (NHWC parameters and inputs) goes through training, EMA, saving (safetensors
    wants contiguous tensors), the reload check and qdiff's loader; the saved weights are ordinary
    contiguous NCHW tensors of the same shapes as an NCHW run's."""
    import torch

    runs = {}
    for name, extra in (("nchw", []), ("nhwc", ["--channels-last"])):
        out, models = tmp_path / name / "out", tmp_path / name / "models"
        assert train_eval_models.main(["--smoke", "--device", "cpu", "--out", str(out), "--models-dir", str(models), "--eval-n", "0", *extra]) == 0
        runs[name] = {k: v for k, v in load_model(models / "scenes-ddpm").unet.state_dict().items()}
    assert runs["nchw"].keys() == runs["nhwc"].keys()
    for key, value in runs["nhwc"].items():
        assert value.shape == runs["nchw"][key].shape and value.is_contiguous(), key
    close = [torch.allclose(runs["nchw"][k].float(), runs["nhwc"][k].float(), atol=5e-2) for k in runs["nchw"]]
    assert sum(close) >= 0.9 * len(close)  # the same training in another layout: the same weights up to rounding order


def test_the_reproduce_line_names_every_option_that_changes_the_weights():
    """metrics.json's `reproduce` is what a later run passes back to get the same bits: it must name
    --compile / --channels-last (other kernels, other rounding) and changed training settings, and
    parse back to the same settings."""
    args = train_eval_models.parse_args(["--out", "o", "--compile", "--parallel", "--lr", "3e-4", "--seed", "2"])
    line = train_eval_models.reproduce_flags(args, {"ddpm": 12000, "cond": 9000})
    assert "--compile" in line and "--channels-last" not in line and "--parallel" not in line
    back = train_eval_models.parse_args(["--out", "o", *line.split()])
    assert back.steps == "ddpm=12000,cond=9000"
    for name in ("seed", "width", "train_size", "batch_size", "lr", "compile", "channels_last", "warmup_steps"):
        assert getattr(back, name) == getattr(args, name), name
    plain = train_eval_models.reproduce_flags(train_eval_models.parse_args(["--out", "o"]), {"ddpm": 10, "cond": 20})
    assert plain == "--steps ddpm=10,cond=20 --seed 0 --width 64 --train-size 100000 --batch-size 256"
    warn = train_eval_models.parse_args(["--out", "o", "--nondeterministic-ok"])  # warn mode: not bit-for-bit, and said so
    line = train_eval_models.reproduce_flags(warn, {"ddpm": 10, "cond": 20})
    assert line.endswith("--determinism warn") and train_eval_models.parse_args(["--out", "o", *line.split()]).determinism == "warn"


def test_expect_compares_the_weights_with_an_earlier_runs_hashes(capsys):
    """`--expect METRICS_JSON`: IDENTICAL only when every fp16 file hashes the same; a changed file
    is named, and differing options are shown (other options, other weights by design)."""
    run = {"reproduce": "--steps ddpm=10,cond=20", "ddpm": {"sha256": {"unet/w.safetensors": "a" * 64}},
           "cond": {"sha256": {"unet/w.safetensors": "b" * 64, "conditioning/c.safetensors": "c" * 64}}}
    same = train_eval_models.compare_with_expected(run, json.loads(json.dumps(run)), "earlier.json")
    assert same["verdict"] == "IDENTICAL" and len(same["files"]) == 3
    other = json.loads(json.dumps(run))
    other["cond"]["sha256"]["unet/w.safetensors"] = "d" * 64
    other["reproduce"] = "--steps ddpm=10,cond=20 --compile"
    differs = train_eval_models.compare_with_expected(run, other, "earlier.json")
    assert differs["verdict"] == "DIFFERENT" and not differs["files"]["scenes-cond/unet/w.safetensors"]["same"]
    assert differs["files"]["scenes-ddpm/unet/w.safetensors"]["same"]
    printed = capsys.readouterr().out
    assert "reproduction: DIFFERENT to earlier.json (2/3 files)" in printed and "<- differs" in printed and "options differ" in printed
    assert train_eval_models.compare_with_expected({}, run, "x")["verdict"] == "DIFFERENT"  # nothing trained is not a reproduction
    fewer = json.loads(json.dumps(run))
    del fewer["cond"]["sha256"]["conditioning/c.safetensors"]  # a file the earlier run had and this one lacks
    assert train_eval_models.compare_with_expected(fewer, run, "x")["files"]["scenes-cond/conditioning/c.safetensors"]["same"] is False
