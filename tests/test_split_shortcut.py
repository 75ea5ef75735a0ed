"""Split-shortcut quantization (Q-Diffusion): per-branch ranges for the skip concat that an
up-block resnet's conv_shortcut reads, and the ONNX rewrite conv(cat(a, b)) = conv_a(a) + conv_b(b)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from qdiff.api import calibrate
from qdiff.calib.recipe import PRESETS, Recipe
from qdiff.calib.shortcuts import find_split_layers
from qdiff.calib.table import CalibrationTable
from qdiff.core.errors import CalibrationError, QuantizationError
from qdiff.export.graph_index import module_name, weighted_nodes
from qdiff.export.onnx_export import example_inputs
from qdiff.export.qdq import insert_qdq
from qdiff.export.split_shortcut import split_concat_conv, split_shortcuts
from qdiff.export.validate import error_stats
from qdiff.models import PACKAGE_MODELS, load_model
from qdiff.calib.fake_quant import build_fake_quant_model
from qdiff.runtime.backends import OnnxRuntimeDenoiser, TorchDenoiser

from tests.conftest import compare_with_fake_quant, layerwise_fake_quant_errors, quantize_model

SHAPES_DDPM = PACKAGE_MODELS / "shapes-ddpm"


@pytest.fixture(scope="module")
def split_uncond(uncond_model_dir, tmp_path_factory, fast_recipe):
    return quantize_model(uncond_model_dir, tmp_path_factory.mktemp("split_uncond"), fast_recipe.with_overrides(split_shortcut=True))


@pytest.fixture(scope="module")
def split_cond(class_cond_model_dir, tmp_path_factory, fast_recipe):
    return quantize_model(class_cond_model_dir, tmp_path_factory.mktemp("split_cond"), fast_recipe.with_overrides(split_shortcut=True))


def _split_layers(table: CalibrationTable) -> dict[str, int]:
    return {name: r.split_channels for name, r in table.layers.items() if r.split_channels is not None}


def test_presets_split_and_bare_recipe_does_not():
    assert all(r.split_shortcut for r in PRESETS.values())
    assert Recipe().split_shortcut is False
    assert Recipe.from_json({"name": "old"}).split_shortcut is False


def test_split_points_found_on_tiny_and_shipped_models(uncond_model_dir):
    """Every up-block conv_shortcut is found, split at the deep feature map's channel count."""
    for path in (uncond_model_dir, SHAPES_DDPM):
        unet = load_model(path).unet
        found, conv1s = find_split_layers(unet, example_inputs(unet, batch=1, seed=0), conv1=True)
        # The conv1 split option: each such resnet's conv1 splits where its conv_shortcut does.
        assert conv1s == {name.replace(".conv_shortcut", ".conv1"): split for name, split in found.items()}
        expected = [n for n, m in unet.named_modules() if n.startswith("up_blocks.") and n.endswith("conv_shortcut")]
        assert sorted(found) == sorted(expected) and expected
        for name, split in found.items():
            block, j = int(name.split(".")[1]), int(name.split(".")[3])
            resnet = unet.up_blocks[block].resnets[j]
            deep = resnet.in_channels - split
            # Resnet j > 0 reads the previous resnet's output; resnet 0 the previous block's.
            if j > 0:
                assert split == unet.up_blocks[block].resnets[j - 1].out_channels, name
            assert 0 < deep < resnet.in_channels
    # A down-block conv_shortcut (fed by a strided conv, not a concat) is not a split target.
    assert not any(n.startswith("down_blocks") for n in found)


def test_fp32_rewrite_is_exact(split_uncond):
    bundle, onnx_path, table, _ = split_uncond
    splits = _split_layers(table)
    assert len(splits) == 4
    model = onnx.load(str(onnx_path))
    rewritten = split_shortcuts(model, splits)
    graph = gs.import_onnx(rewritten)
    for name in splits:
        ops = sorted((n.name.rsplit("/", 1)[1], n.op) for n in graph.nodes if module_name(n) == name)
        assert ops == [("ConvA", "Conv"), ("ConvB", "Conv"), ("SplitAdd", "Add")], ops
    # The Concat stays: the resnet's GroupNorm -> conv1 path still reads it.
    assert sum(n.op == "Concat" and n.name.startswith("/unet/up_blocks") for n in graph.nodes) >= len(splits)
    # graph_index maps both halves to the one module.
    halves = [wn.module for wn in weighted_nodes(graph) if wn.node.name.endswith(("/ConvA", "/ConvB"))]
    assert sorted(halves) == sorted([*splits, *splits])
    path = onnx_path.parent / "split_fp32.onnx"
    onnx.save(rewritten, str(path))
    base, split = OnnxRuntimeDenoiser(onnx_path, optimize=False), OnnxRuntimeDenoiser(path, optimize=False)
    for seed in range(2):
        inputs = example_inputs(bundle.unet, batch=2, seed=seed)
        stats = error_stats(split(inputs["sample"], inputs["timestep"]), base(inputs["sample"], inputs["timestep"]))
        assert stats.rel_l2 < 1e-6, str(stats)


def test_rewrite_refuses_a_conv_not_fed_by_a_concat(split_uncond):
    _, onnx_path, _, _ = split_uncond
    graph = gs.import_onnx(onnx.load(str(onnx_path)))
    wn = next(wn for wn in weighted_nodes(graph) if wn.module == "down_blocks.1.resnets.0.conv_shortcut")
    with pytest.raises(QuantizationError, match="down_blocks.1.resnets.0.conv_shortcut.*not produced by a Concat"):
        split_concat_conv(graph, wn.node, 8, wn.module)


def test_rewrite_refuses_a_wrong_split_point(split_uncond):
    _, onnx_path, table, _ = split_uncond
    broken = CalibrationTable.from_json(table.to_json())
    name = sorted(_split_layers(broken))[0]
    broken.layers[name].split_channels -= 1
    with pytest.raises(QuantizationError, match=f"{name.replace('.', '[.]')}.*channels"):
        insert_qdq(onnx.load(str(onnx_path)), broken)


def test_split_qdq_graph_equals_fake_quant_reference(split_uncond):
    """Same criterion as test_qdq's: every layer (the split ones cut from their two branches to
    their Add) at float32 round-off, the whole model within the quantization error."""
    bundle, _, table, q = split_uncond
    layers = layerwise_fake_quant_errors(bundle, table, q.onnx_path)
    assert len(layers) == q.report.to_json()["quantized_layers"] and set(_split_layers(table)) <= set(layers)
    assert max(layers.values()) < 1e-5, max(layers.items(), key=lambda kv: kv[1])
    results = compare_with_fake_quant(bundle, table, q.onnx_path, range(1, 6))
    for qdq_vs_ref, fp32_vs_ref in results:
        assert qdq_vs_ref.rel_l2 < 2 * fp32_vs_ref.rel_l2, (str(qdq_vs_ref), str(fp32_vs_ref))
        assert fp32_vs_ref.rel_l2 > 1e-3


@pytest.mark.parametrize("which", ["split_uncond", "split_cond"])
def test_split_layers_alone_equal_fake_quant_reference(which, request, tmp_path):
    """Only the split layers quantized: no other INT8 rounding point for a float32 round-off
    flip to propagate through (on the tiny cross-attention model even the unsplit whole-model
    graph flips on 2 of 5 seeds). Four chained split layers can still flip one value now and
    then (how often depends on the CPU's float kernels), so: each split layer cut out agrees at
    round-off, and no seed disagrees by more than half the quantization error (a flip measured
    here on an AVX-512 Xeon: 0.16 of it)."""
    bundle, onnx_path, table, _ = request.getfixturevalue(which)
    recipe = Recipe.from_json(table.recipe)
    splits = _split_layers(table)
    recipe = recipe.with_overrides(exclude=tuple(sorted(set(table.layers) - set(splits))) + recipe.exclude)
    model, report = insert_qdq(onnx.load(str(onnx_path)), table, recipe)
    assert sorted(d.module for d in report.quantized) == sorted(splits)
    assert report.qdq_pairs == 4 * len(splits)
    path = tmp_path / "split_only.onnx"
    onnx.save(model, str(path))
    reference = TorchDenoiser(build_fake_quant_model(bundle.unet, table, recipe))
    layers = layerwise_fake_quant_errors(bundle, table, path, recipe=recipe)
    assert sorted(layers) == sorted(splits) and max(layers.values()) < 1e-5, layers
    session, fp32 = OnnxRuntimeDenoiser(path, optimize=False), TorchDenoiser(bundle.unet)
    for seed in range(1, 5):
        inputs = example_inputs(bundle.unet, batch=2, seed=seed, tokens=3)
        sample, t = inputs.pop("sample"), inputs.pop("timestep")
        ref = reference(sample, t, **inputs)
        qdq_err, quant_err = error_stats(session(sample, t, **inputs), ref).rel_l2, error_stats(fp32(sample, t, **inputs), ref).rel_l2
        assert quant_err > 1e-3 and qdq_err < 0.5 * quant_err, (seed, qdq_err, quant_err)


def test_split_graph_placement_and_coverage(split_cond):
    _, _, table, q = split_cond
    splits = _split_layers(table)
    report = q.report.to_json()
    assert report["quantized_layers"] == len(table.layers)  # one module, counted once
    graph = gs.import_onnx(onnx.load(str(q.onnx_path)))
    branch_convs = [n for n in graph.nodes if n.op == "Conv" and n.name.endswith(("/ConvA", "/ConvB"))]
    assert sorted(module_name(n) for n in branch_convs) == sorted([*splits, *splits])
    for conv in branch_convs:
        act_dq, w_dq = (conv.inputs[i].inputs[0] for i in range(2))
        assert act_dq.op == w_dq.op == "DequantizeLinear"
        assert act_dq.inputs[1].values.ndim == 0 and w_dq.attrs["axis"] == 0
        assert (conv.name.endswith("ConvA")) == (len(conv.inputs) == 3)  # bias once, on branch a


def test_split_off_graph_is_unchanged(split_uncond):
    """A split table quantized with split_shortcut=False gives exactly the unsplit graph."""
    _, onnx_path, table, _ = split_uncond
    model = onnx.load(str(onnx_path))
    recipe_off = Recipe.from_json(table.recipe).with_overrides(split_shortcut=False)
    plain = CalibrationTable.from_json(table.to_json())
    for r in plain.layers.values():
        r.shortcut_a = r.shortcut_b = r.weight_a = r.weight_b = r.split_channels = None
    a, _ = insert_qdq(model, table, recipe_off)
    b, _ = insert_qdq(model, plain, recipe_off)
    assert a.SerializeToString() == b.SerializeToString()
    assert not any(n.name.endswith("/ConvA") for n in a.graph.node)


def test_table_split_fields_are_strict(split_uncond):
    _, _, table, _ = split_uncond
    obj = table.to_json()
    name = sorted(_split_layers(table))[0]
    CalibrationTable.from_json(obj)  # round trip
    for key in ("shortcut_b", "weight_a", "split_channels"):
        broken = {**obj, "layers": {**obj["layers"], name: {k: v for k, v in obj["layers"][name].items() if k != key}}}
        with pytest.raises(CalibrationError, match="split-shortcut entry needs all"):
            CalibrationTable.from_json(broken)
    bad_len = {**obj, "layers": {**obj["layers"], name: {**obj["layers"][name], "weight_b": obj["layers"][name]["weight_b"][:-1]}}}
    with pytest.raises(CalibrationError, match="same number of output channels"):
        CalibrationTable.from_json(bad_len)
    nan = {**obj, "layers": {**obj["layers"], name: {**obj["layers"][name], "weight_a": [float("nan")] * len(obj["layers"][name]["weight_a"])}}}
    with pytest.raises(CalibrationError, match="weight_a"):
        CalibrationTable.from_json(nan)
    with pytest.raises(CalibrationError, match="split_channels"):
        CalibrationTable.from_json({**obj, "layers": {**obj["layers"], name: {**obj["layers"][name], "split_channels": 0}}})


def test_branch_ranges_differ_on_trained_model(tmp_path):
    """On the trained shapes-ddpm model the deep and skip branches have different ranges."""
    recipe = Recipe(name="w8a8", split_shortcut=True, num_timesteps=4, samples_per_timestep=4, calibration_steps=12, batch_size=4)
    table = calibrate(SHAPES_DDPM, tmp_path, recipe).table
    splits = _split_layers(table)
    assert len(splits) == 6
    ratios = {}
    for name in splits:
        r = table.layers[name]
        assert r.input == pytest.approx(max(r.shortcut_a, r.shortcut_b))  # max calibrator: the union
        ratios[name] = max(r.shortcut_a, r.shortcut_b) / min(r.shortcut_a, r.shortcut_b)
        # Per-branch weight ranges never exceed the whole layer's, and reach it on one branch.
        assert np.allclose(np.maximum(r.weight_a, r.weight_b), r.weight)
    print("branch range ratios:", {k: round(v, 2) for k, v in ratios.items()})
    assert max(ratios.values()) > 1.5, ratios  # 2.4-2.7 on up_blocks.2 with more calibration data


@pytest.mark.slow
def test_split_on_and_off_on_trained_model(tmp_path):
    from qdiff.api import run

    settings = dict(steps=20, num_images=4, samples_per_timestep=16, num_timesteps=10, calibration_steps=50, batch_size=16)
    psnr = {}
    for split in (True, False):
        result = run(SHAPES_DDPM, tmp_path, split_shortcut=split, **settings)
        assert result.report["recipe"]["split_shortcut"] is split
        psnr[split] = result.report["summary"]["mean PSNR (dB)"]
    print("mean PSNR split on/off:", psnr)
    assert psnr[True] > 24 and psnr[False] > 24, psnr


# ----------------------------------------------------------------------------- conv1 split
# The up-block resnets' conv1 sees the same concat after GroupNorm + SiLU (no Concat node feeds
# it), so the export slices its input: Slice[:, :Ca] / Slice[:, Ca:] -> per-branch Q/DQ -> two
# Convs -> Add. Recipe `split_conv1`, off by default.


@pytest.fixture(scope="module")
def conv1_uncond(uncond_model_dir, tmp_path_factory, fast_recipe):
    return quantize_model(uncond_model_dir, tmp_path_factory.mktemp("conv1_uncond"), fast_recipe.with_overrides(split_shortcut=True, split_conv1=True))


def _conv1_layers(table: CalibrationTable) -> dict[str, int]:
    return {name: r.split_channels for name, r in table.layers.items() if r.split_kind == "conv1"}


def test_conv1_split_is_off_by_default_and_reaches_the_recipe_from_the_cli():
    from qdiff.cli import _recipe_overrides, build_parser

    assert Recipe().split_conv1 is False and not any(r.split_conv1 for r in PRESETS.values())
    assert Recipe.from_json({"name": "old", "split_shortcut": True}).split_conv1 is False
    assert Recipe.from_json(Recipe(split_conv1=True).to_json()).split_conv1 is True
    for flag, value in (("--split-conv1", True), ("--no-split-conv1", False)):
        for command in (["calibrate", "m", "-o", "o"], ["run"]):
            assert _recipe_overrides(build_parser().parse_args([*command, flag]))["split_conv1"] is value
    assert "split_conv1" not in _recipe_overrides(build_parser().parse_args(["run"]))


def test_table_has_conv1_branches_only_when_on(split_uncond, conv1_uncond):
    """Flag on: every conv1 of a split resnet gets branch ranges (split_kind "conv1"), and every
    other entry is exactly the flag-off table's (same seeds, max calibrator)."""
    _, _, off, _ = split_uncond
    _, _, on, _ = conv1_uncond
    assert not _conv1_layers(off) and "split_conv1_layers" not in off.provenance
    conv1s = _conv1_layers(on)
    assert conv1s == {name.replace(".conv_shortcut", ".conv1"): s for name, s in _split_layers(off).items()}
    assert on.provenance["split_conv1_layers"] == conv1s and on.provenance["split_shortcut_layers"] == off.provenance["split_shortcut_layers"]
    assert set(on.layers) == set(off.layers)
    for name, r in on.layers.items():
        if name in conv1s:
            assert r.input == pytest.approx(max(r.shortcut_a, r.shortcut_b))  # max: the union of the branches
            assert np.allclose(np.maximum(r.weight_a, r.weight_b), r.weight)
            assert (r.input, r.weight) == (off.layers[name].input, off.layers[name].weight)
        else:
            assert r.to_json() == off.layers[name].to_json(), name
    # Round trip; a split_kind is refused without the split fields or with an unknown value.
    obj = on.to_json()
    assert CalibrationTable.from_json(obj).to_json() == obj
    name = sorted(conv1s)[0]
    with pytest.raises(CalibrationError, match="split_kind"):
        CalibrationTable.from_json({**obj, "layers": {**obj["layers"], name: {**obj["layers"][name], "split_kind": "conv2"}}})
    plain = {k: v for k, v in obj["layers"]["down_blocks.0.resnets.0.conv1"].items()}
    with pytest.raises(CalibrationError, match="split_kind"):
        CalibrationTable.from_json({**obj, "layers": {**obj["layers"], "down_blocks.0.resnets.0.conv1": {**plain, "split_kind": "conv1"}}})


def test_conv1_flag_off_graph_is_unchanged(split_uncond, conv1_uncond):
    """A conv1-split table quantized with split_conv1=False gives byte for byte the graph of a
    table calibrated without it."""
    _, onnx_path, off, _ = split_uncond
    _, _, on, _ = conv1_uncond
    model = onnx.load(str(onnx_path))
    recipe_off = Recipe.from_json(on.recipe).with_overrides(split_conv1=False)
    a, _ = insert_qdq(model, on, recipe_off)
    b, _ = insert_qdq(model, off)
    assert a.SerializeToString() == b.SerializeToString()
    assert not any(n.op_type == "Slice" and "/conv1/" in n.name for n in a.graph.node)


def test_conv1_fp32_sliced_rewrite_is_exact(conv1_uncond):
    bundle, onnx_path, table, _ = conv1_uncond
    conv1s = _conv1_layers(table)
    shortcuts = {n: s for n, s in _split_layers(table).items() if n not in conv1s}
    model = onnx.load(str(onnx_path))
    rewritten = split_shortcuts(model, shortcuts, sliced=conv1s)
    onnx.checker.check_model(rewritten)
    graph = gs.import_onnx(rewritten)
    for name, split in conv1s.items():
        nodes = {n.name.rsplit("/", 1)[1]: n for n in graph.nodes if module_name(n) == name}
        assert sorted((k, n.op) for k, n in nodes.items()) == [("ConvA", "Conv"), ("ConvB", "Conv"), ("SliceA", "Slice"), ("SliceB", "Slice"), ("SplitAdd", "Add")]
        assert nodes["SliceA"].inputs[0] is nodes["SliceB"].inputs[0]  # the post-SiLU tensor, sliced twice
        assert [int(nodes[k].inputs[i].values[0]) for k in ("SliceA", "SliceB") for i in (1, 2)] == [0, split, split, nodes["ConvB"].inputs[1].values.shape[1] + split]
        assert nodes["ConvA"].inputs[0] is nodes["SliceA"].outputs[0] and len(nodes["ConvA"].inputs) == 3 and len(nodes["ConvB"].inputs) == 2
    path = onnx_path.parent / "conv1_fp32.onnx"
    onnx.save(rewritten, str(path))
    base, split = OnnxRuntimeDenoiser(onnx_path, optimize=False), OnnxRuntimeDenoiser(path, optimize=False)
    for seed in range(2):
        inputs = example_inputs(bundle.unet, batch=2, seed=seed)
        stats = error_stats(split(inputs["sample"], inputs["timestep"]), base(inputs["sample"], inputs["timestep"]))
        assert stats.rel_l2 < 1e-6, str(stats)


def test_conv1_split_qdq_placement(conv1_uncond):
    _, _, table, q = conv1_uncond
    conv1s = _conv1_layers(table)
    assert q.report.to_json()["quantized_layers"] == len(table.layers)
    graph = gs.import_onnx(onnx.load(str(q.onnx_path)))
    for name in conv1s:
        r = table.layers[name]
        convs = {n.name.rsplit("/", 1)[1]: n for n in graph.nodes if module_name(n) == name and n.op == "Conv"}
        assert sorted(convs) == ["ConvA", "ConvB"]
        for branch, conv in (("a", convs["ConvA"]), ("b", convs["ConvB"])):
            act_dq, w_dq = (conv.inputs[i].inputs[0] for i in range(2))
            assert act_dq.op == w_dq.op == "DequantizeLinear" and w_dq.attrs["axis"] == 0
            quant = act_dq.inputs[0].inputs[0]
            assert quant.op == "QuantizeLinear" and quant.inputs[0].inputs[0].op == "Slice"
            assert float(act_dq.inputs[1].values) == pytest.approx(getattr(r, f"shortcut_{branch}") / 127)
        assert len(convs["ConvA"].inputs) == 3 and len(convs["ConvB"].inputs) == 2  # bias once


def test_conv1_split_layers_equal_fake_quant_reference(conv1_uncond):
    """Each split conv1 of the Q/DQ graph (Slice -> Q/DQ -> two Convs -> Add), cut out and fed
    the very tensor its fake-quant twin sees, computes the same function at float32 round-off.
    (Fed by the whole model instead, ORT's and PyTorch's GroupNorm differ by ~3e-6 before the
    quantizer and flip an INT8 rounding now and then; hence the layer-level check, and only the
    quantization-error bound for the whole model.)"""
    bundle, _, table, q = conv1_uncond
    conv1s = _conv1_layers(table)
    layers = layerwise_fake_quant_errors(bundle, table, q.onnx_path)  # conv1s cut from SliceA's input to SplitAdd
    assert set(conv1s) <= set(layers) and max(layers.values()) < 1e-5
    assert all(layers[name] < 1e-6 for name in conv1s), {name: layers[name] for name in conv1s}
    results = compare_with_fake_quant(bundle, table, q.onnx_path, range(1, 6))
    for qdq_vs_ref, fp32_vs_ref in results:
        assert qdq_vs_ref.rel_l2 < 2 * fp32_vs_ref.rel_l2 and fp32_vs_ref.rel_l2 > 1e-3
