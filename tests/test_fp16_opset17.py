"""The opset-17 FP16 Q/DQ graph (`quantize --dtype fp16 --opset 17`): an FP16 graph TensorRT
8.6's parser takes, every Q/DQ pair an FP32 island (Cast to FLOAT -> Q/DQ with FP32 scales ->
Cast to FLOAT16; INT8 weight initializers -> DequantizeLinear -> Cast). Its structure, its
numerics under ONNX Runtime on the CPU against the opset-19 FP16 graph, the FP32 Q/DQ graph and
the FP16 fake-quant reference, and that given integers (reconstructed, W4) survive unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from qdiff.api import calibrate, export_model, quantize_int4_weight_only, quantize_onnx
from qdiff.calib.fake_quant import build_fake_quant_model
from qdiff.calib.quant_math import scale_from_amax
from qdiff.calib.reconstruct.artifact import LayerWeights, ReconstructedWeights
from qdiff.calib.recipe import Recipe
from qdiff.core.artifacts import read_manifest
from qdiff.core.errors import QuantizationError
from qdiff.export.fp16 import boundary_casts
from qdiff.export.onnx_export import example_inputs
from qdiff.export.qdq import insert_qdq_file
from qdiff.export.validate import error_stats
from qdiff.models import load_model
from qdiff.runtime.backends import TorchDenoiser
from tests.conftest import layerwise_fake_quant_errors, per_channel, save_pipeline, tiny_cond_unet, tiny_unet2d

CONFIGS = ["unet2d", "sd"]
LAYERS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _session(path):
    """Q/DQ as float simulation (TensorRT's arithmetic), never ORT's fused integer kernels."""
    import onnxruntime as ort

    from qdiff.runtime.backends import session_options

    return ort.InferenceSession(str(path), session_options(optimize=False), providers=["CPUExecutionProvider"])


def _run(session, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(["out_sample"], {n: inputs[n].float().numpy() for n in names})[0])


def _opset(path) -> int:
    return next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, fast_recipe):
    """Per (config, split): (bundle, table, FP32 export, {"fp32", "op19", "op17"}: path, op17 report).
    One calibration per config with split shortcut on; split off is the same table quantized
    with the recipe's split turned off (the pass reads the split from the recipe)."""
    made: dict = {}

    def make(config: str, split: bool):
        if config not in made:
            root = tmp_path_factory.mktemp(f"op17_{config}")
            unet = tiny_unet2d() if config == "unet2d" else tiny_cond_unet(config)
            model_dir = save_pipeline(unet, root / "model")
            exported = export_model(model_dir, root / "out")
            table = calibrate(model_dir, root / "out", fast_recipe.with_overrides(split_shortcut=True), random_conditioning=config != "unet2d", timestep_stats=False)
            made[config] = (load_model(model_dir), table, exported.onnx_path)
        bundle, table, fp32_path = made[config]
        key = (config, split)
        if key not in made:
            if split:
                results = {
                    "fp32": quantize_onnx(fp32_path, table.table_path),
                    "op19": quantize_onnx(fp32_path, table.table_path, dtype="fp16"),
                    "op17": quantize_onnx(fp32_path, table.table_path, dtype="fp16", opset=17),
                }
                made[key] = (bundle, table.table, fp32_path, {k: r.onnx_path for k, r in results.items()}, results["op17"].report)
            else:
                recipe = Recipe.from_json(table.table.recipe).with_overrides(split_shortcut=False)
                folder = fp32_path.parent / "nosplit"
                folder.mkdir()
                paths = {k: folder / f"{k}.onnx" for k in ("fp32", "op19", "op17")}
                insert_qdq_file(fp32_path, table.table, paths["fp32"], recipe)
                insert_qdq_file(fp32_path, table.table, paths["op19"], recipe, dtype="fp16", probe_size=16)
                report = insert_qdq_file(fp32_path, table.table, paths["op17"], recipe, dtype="fp16", probe_size=16, opset=17)
                made[key] = (bundle, table.table, fp32_path, paths, report)
        return made[key]

    return make


def _typed(path) -> gs.Graph:
    return gs.import_onnx(onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True))


@pytest.mark.parametrize("split", [False, True], ids=["nosplit", "split"])
@pytest.mark.parametrize("config", CONFIGS)
def test_opset17_graph_structure(graphs, config, split):
    """What TensorRT 8.6 parses and the brief asks: opset 17; no FP16 QuantizeLinear or
    DequantizeLinear anywhere; every activation Q reads a Cast to FLOAT of an FP16 tensor; every
    DQ (FP32 scale) feeds exactly one Cast to FLOAT16, which feeds only Conv/MatMul/Gemm; every
    weight DQ reads an INT8 initializer; as many pairs and quantized layers as the opset-19
    FP16 graph; FP16 layer weights; FP32 graph I/O with one Cast each; the checker passes."""
    _, table, _, paths, report = graphs(config, split)
    assert _opset(paths["op17"]) == 17 and _opset(paths["op19"]) == 19
    onnx.checker.check_model(str(paths["op17"]), full_check=True)
    graph = _typed(paths["op17"])
    qs = [n for n in graph.nodes if n.op == "QuantizeLinear"]
    dqs = [n for n in graph.nodes if n.op == "DequantizeLinear"]
    assert len(dqs) == report.qdq_pairs > 20
    assert len(dqs) == sum(n.op == "DequantizeLinear" for n in _typed(paths["op19"]).nodes)
    weight_dqs = [dq for dq in dqs if isinstance(dq.inputs[0], gs.Constant)]
    assert len(qs) + len(weight_dqs) == len(dqs) and len(weight_dqs) == len(report.quantized) + (len(table.split_layers(True, False)) if split else 0)
    for node in [*qs, *dqs]:
        assert node.inputs[1].values.dtype == np.float32, node.name  # FP32 scales
        assert all(t.dtype != np.float16 for t in [*node.inputs, *node.outputs] if isinstance(t, gs.Variable)), node.name
    for q in qs:
        (cast,) = q.inputs[0].inputs
        assert cast.op == "Cast" and cast.attrs["to"] == onnx.TensorProto.FLOAT and cast.inputs[0].dtype == np.float16, q.name
    for dq in weight_dqs:
        assert dq.inputs[0].values.dtype == np.int8 and "axis" in dq.attrs, dq.name
    for dq in dqs:
        assert dq.outputs[0].dtype == np.float32
        (cast,) = dq.outputs[0].outputs
        assert cast.op == "Cast" and cast.attrs["to"] == onnx.TensorProto.FLOAT16 and cast.outputs[0].dtype == np.float16, dq.name
        assert cast.outputs[0].outputs and {c.op for c in cast.outputs[0].outputs} <= {"Conv", "MatMul", "Gemm"}, dq.name
    float_weights = [n.inputs[1] for n in graph.nodes if n.op in LAYERS and isinstance(n.inputs[1], gs.Constant)]
    assert float_weights and all(w.values.dtype == np.float16 for w in float_weights)  # conv_in/out stay FP16 float layers
    model = onnx.load(str(paths["op17"]))
    casts = boundary_casts(model)
    assert casts == {name: 1 for name in casts}, casts
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*model.graph.input, *model.graph.output])
    assert any(n.name.endswith("/ConvA") for n in graph.nodes) == split
    assert (report.dtype, report.opset, report.qdq_dtype, report.fp32_islands) == ("fp16", 17, "fp32-islands", [])
    assert report.to_json()["opset"] == 17 and "opset 17: Q/DQ are FP32 islands" in report.summary()


def test_opset17_artifact_name_and_manifest(graphs):
    _, _, fp32_path, paths, _ = graphs("unet2d", True)
    assert paths["op17"].name == "denoiser.w8a8.fp16-op17.onnx" and paths["op19"].name == "denoiser.w8a8.fp16.onnx"
    manifest = read_manifest(paths["op17"])
    assert manifest.settings["dtype"] == "fp16" and manifest.settings["opset"] == 17 and manifest.settings["qdq_dtype"] == "fp32-islands"
    assert (manifest.details["dtype"], manifest.details["opset"], manifest.details["qdq_dtype"]) == ("fp16", 17, "fp32-islands")
    assert read_manifest(paths["op19"]).settings["opset"] == 19
    assert "opset" not in read_manifest(paths["fp32"]).settings  # the FP32 graph's settings (and cache) as before
    assert read_manifest(paths["fp32"]).details["opset"] == 17
    table_path = fp32_path.parent / "calibration.json"
    assert quantize_onnx(fp32_path, table_path, dtype="fp16", opset=17).reused
    assert not quantize_onnx(fp32_path, table_path, paths["op17"].parent / "explicit.onnx", dtype="fp16", opset=17).reused


@pytest.mark.parametrize("split", [False, True], ids=["nosplit", "split"])
@pytest.mark.parametrize("config", CONFIGS)
def test_opset17_matches_opset19_and_fp32_qdq(graphs, config, split):
    """The opset-17 graph computes what the opset-19 FP16 graph computes, up to the FP16-rounding
    scale of these tiny models.

    Both round every activation to FP16 before the quantizer; they differ where an activation
    sits near an INT8 rounding boundary: the opset-19 graph divides by an FP16 scale in FP16
    (ORT's FP16 QuantizeLinear), the opset-17 graph by the FP32 scale in FP32, so a few percent
    of near-boundary values land one INT8 step apart, and these tiny random models amplify each
    flip (test_fp16.py: single flips reach 3e-2). The scale of that is how far FP16 rounding
    moves the FP16 fake-quant reference from its FP32 twin (ref16 vs ref32, ~5e-2): measured,
    op17 vs op19 and op17 vs the FP32 Q/DQ graph are both ~5e-2. Asserted: each below 1.5x that
    scale and below 0.1, and op17 no farther from the FP32 model than 2x the FP32 Q/DQ graph. A
    dropped Cast or pair, a wrong scale or a lost split shows far above (a dropped layer ~1).
    The layer-level equality test below is the tight check."""
    bundle, table, _, paths, _ = graphs(config, split)
    recipe = Recipe.from_json(table.recipe).with_overrides(split_shortcut=split)
    ref16 = TorchDenoiser(build_fake_quant_model(bundle.unet, table, recipe, dtype=torch.float16))
    ref32 = TorchDenoiser(build_fake_quant_model(bundle.unet, table, recipe))
    s17, s19, s32 = (_session(paths[k]) for k in ("op17", "op19", "fp32"))
    rows = []
    for seed in range(1, 4):
        inputs = example_inputs(bundle.unet, batch=2, seed=seed, tokens=3)
        sample, t = inputs["sample"], inputs["timestep"]
        cond = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
        o17, o19, o32 = _run(s17, inputs), _run(s19, inputs), _run(s32, inputs)
        assert error_stats(o17, o19).nonfinite == 0
        r16 = ref16(sample.half(), t, **{k: v.half() for k, v in cond.items()}).float()
        r32 = ref32(sample, t, **cond)
        fp32 = TorchDenoiser(bundle.unet)(sample, t, **cond)
        rows.append((error_stats(o17, o19).rel_l2, error_stats(o17, o32).rel_l2, error_stats(r16, r32).rel_l2, error_stats(o17, fp32).rel_l2, error_stats(o32, fp32).rel_l2))
    op17_op19, op17_q32, ref16_ref32, op17_fp32, q32_fp32 = (float(np.mean(c)) for c in zip(*rows))
    print(f"{config} split={split}: op17-op19 {op17_op19:.3g} op17-q32 {op17_q32:.3g} ref16-ref32 {ref16_ref32:.3g} op17-fp32 {op17_fp32:.3g} q32-fp32 {q32_fp32:.3g}")
    assert op17_op19 < 1.5 * ref16_ref32 and op17_op19 < 0.1, rows
    assert op17_q32 < 1.5 * ref16_ref32 and op17_q32 < 0.1, rows
    assert op17_fp32 < 2 * q32_fp32, rows
    assert ref16_ref32 > 1e-3  # the scale is really FP16 rounding


@pytest.mark.parametrize("split", [False, True], ids=["nosplit", "split"])
@pytest.mark.parametrize("config", CONFIGS)
def test_opset17_layers_equal_the_fake_quant_reference(graphs, config, split):
    """The tight form: every quantized layer of the opset-17 graph (split ones from their two
    branches to their Add), cut out at the FP16 tensor before its Casts, against the FP32
    fake-quant layer fed that same FP16-rounded tensor. Both quantize the same values with the
    same FP32 scales in FP32, and the weights' integers come from the FP32 weights on both
    sides, so they pick the same integers; what is left is the FP16 rounding of the dequantized
    values and of the layer's output: measured worst 3.5e-4 (FP16's 2^-11 step, averaged),
    asserted below 1e-3. A single flipped weight integer already gives ~2e-3 on these 16-channel
    layers (measured while the integers were still rounded from the FP16 weights), and a wrong
    scale, axis or lost split branch shows far above.

    (Against the FP16 reference, which quantizes with FP16 scales in FP16 as the opset-19 graph
    does, the layers sit 4-5e-3 apart: a few near-boundary values one INT8 step apart.)"""
    bundle, table, _, paths, report = graphs(config, split)
    recipe = Recipe.from_json(table.recipe).with_overrides(split_shortcut=split)
    layers = layerwise_fake_quant_errors(bundle, table, paths["op17"], recipe=recipe, round_inputs=torch.float16)
    assert len(layers) == len(report.quantized)
    worst = max(layers, key=layers.get)
    print(f"{config} split={split}: {len(layers)} layers, worst {worst} rel-L2 {layers[worst]:.2e}")
    assert layers[worst] < 1e-3, (worst, layers[worst])
    assert 1e-5 < float(np.median(list(layers.values())))  # the layers really run in FP16


def _int8_weights(path) -> dict[str, tuple[np.ndarray, str, int]]:
    """{DequantizeLinear name: (INT8 integers, layer op, axis)} of every weight pair."""
    graph = gs.import_onnx(onnx.load(str(path)))
    out = {}
    for dq in graph.nodes:
        if dq.op == "DequantizeLinear" and isinstance(dq.inputs[0], gs.Constant):
            (cast,) = dq.outputs[0].outputs
            out[dq.name] = (dq.inputs[0].values, cast.outputs[0].outputs[0].op, dq.attrs["axis"])
    return out


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    """A W4A8 table (split on) on the unconditional tiny UNet, and a synthetic reconstruction of
    it: round-to-nearest integers moved by random +-1 steps (kept on the W4 grid), with the
    table's scales, so its integers differ from anything rounding the float weights gives."""
    root = tmp_path_factory.mktemp("op17_w4")
    model_dir = save_pipeline(tiny_unet2d(), root / "model")
    exported = export_model(model_dir, root / "out")
    recipe = Recipe(name="w4a8", weight_bits=4, split_shortcut=True, num_timesteps=4, samples_per_timestep=4, calibration_steps=8, batch_size=4)
    calibrated = calibrate(model_dir, root / "out", recipe, timestep_stats=False)
    table, unet = calibrated.table, load_model(model_dir).unet
    rng = np.random.default_rng(0)
    weights = ReconstructedWeights(table.model_sha256, 4, "synthetic")
    for name, ranges in table.layers.items():
        if recipe.is_excluded(name) is not None or ranges.weight is None:
            continue
        module = unet.get_submodule(name)
        w = module.weight.detach().numpy()
        axis = 1 if isinstance(module, torch.nn.ConvTranspose2d) else 0
        split = ranges.split_channels if name in table.split_layers(True, False) else None
        parts = [("", w, ranges.weight)] if split is None else [("_a", w[:, :split], ranges.weight_a), ("_b", w[:, split:], ranges.weight_b)]
        lw = LayerWeights()
        for role, part, amax in parts:
            scale = np.asarray(scale_from_amax(amax, 7), dtype=np.float32)
            q = np.clip(np.rint(part / per_channel(scale, part.ndim, axis)) + rng.integers(-1, 2, size=part.shape), -8, 7).astype(np.int8)
            lw.parts[role] = (q, scale)
        weights.layers[name] = lw
    weights_path = root / "synthetic.safetensors"
    weights.save(weights_path)
    return exported.onnx_path, calibrated.table_path, weights_path, ReconstructedWeights.load(weights_path)


def test_reconstructed_w4_integers_carry_through_unchanged(w4):
    """`reconstruction=` at opset 17: every INT8 weight initializer holds exactly the
    reconstruction's integers (in the graph's layout), all on the W4 grid; without it, the W4
    round-to-nearest integers are exactly the FP32 Q/DQ graph's rint(w / s): they are rounded
    from the FP32 weights, not from the FP16 copy (whose rounding moves a few across a
    boundary)."""
    fp32_path, table_path, weights_path, weights = w4
    q = quantize_onnx(fp32_path, table_path, dtype="fp16", opset=17, reconstruction=weights_path)
    assert q.onnx_path.name == "denoiser.w4a8-synthetic.fp16-op17.onnx"
    found = _int8_weights(q.onnx_path)
    assert len(found) == sum(len(lw.parts) for lw in weights.layers.values())
    for name, lw in weights.layers.items():
        for role, (expected, _) in lw.parts.items():
            got, op, _ = found[f"{name}/weight_quantizer{role}/DequantizeLinear"]
            if op == "MatMul":
                got = got.T  # the exporter stores a Linear's weight transposed
            np.testing.assert_array_equal(got, expected, err_msg=f"{name}{role}")
    # round-to-nearest W4: on the grid, and the FP32 graph's integers
    rtn = _int8_weights(quantize_onnx(fp32_path, table_path, dtype="fp16", opset=17).onnx_path)
    fp32 = gs.import_onnx(onnx.load(str(quantize_onnx(fp32_path, table_path).onnx_path)))
    total = 0
    for node in fp32.nodes:
        if node.op == "QuantizeLinear" and isinstance(node.inputs[0], gs.Constant):
            w, s = node.inputs[0].values, node.inputs[1].values
            expected = np.clip(np.rint(w / per_channel(s, w.ndim, node.attrs["axis"])), -128, 127)
            got = rtn[node.name.replace("/QuantizeLinear", "/DequantizeLinear")][0]
            assert got.min() >= -8 and got.max() <= 7, node.name
            np.testing.assert_array_equal(got, expected, err_msg=node.name)
            total += got.size
    assert total > 1000


def test_opset_errors(graphs, tmp_path):
    """Clear errors: INT4 weight-only has no opset-17 form; FP16 Q/DQ takes opset 17 or 19 only;
    an FP32 Q/DQ graph keeps its export's opset. Nothing is written."""
    _, _, fp32_path, _, _ = graphs("unet2d", True)
    table_path = fp32_path.parent / "calibration.json"
    for dtype in ("fp16", "fp32"):
        with pytest.raises(QuantizationError, match=r"INT4 weight-only graphs are written at opset 21.*opset 17 cannot hold them") as err:
            quantize_int4_weight_only(fp32_path, tmp_path / "int4.onnx", dtype=dtype, opset=17)
        assert "--opset 17" in err.value.hint
    for opset in (16, 18, 20, 21):
        with pytest.raises(QuantizationError, match=rf"opset 19 \(FP16 Q/DQ\) or 17 \(FP32 Q/DQ islands\); not opset {opset}") as err:
            quantize_onnx(fp32_path, table_path, tmp_path / "x.onnx", dtype="fp16", opset=opset)
        assert "TensorRT 8.6" in err.value.hint
    with pytest.raises(QuantizationError, match="applies to --dtype fp16 only"):
        quantize_onnx(fp32_path, table_path, tmp_path / "y.onnx", opset=17)
    assert not list(tmp_path.iterdir())


def test_cli_passes_the_opset(monkeypatch, tmp_path):
    from qdiff import api, cli

    seen = {}

    def fake(name):
        def record(*args, **kwargs):
            seen[name] = kwargs
            from types import SimpleNamespace

            return SimpleNamespace(onnx_path=tmp_path / "g.onnx")

        return record

    monkeypatch.setattr(api, "quantize_onnx", fake("qdq"))
    monkeypatch.setattr(api, "quantize_int4_weight_only", fake("int4"))
    assert cli.main(["quantize", "g.onnx", "--calib", "t.json", "--dtype", "fp16", "--opset", "17"]) == 0
    assert seen["qdq"]["opset"] == 17 and seen["qdq"]["dtype"] == "fp16"
    assert cli.main(["quantize", "g.onnx", "--int4-weight-only", "--opset", "17"]) == 0
    assert seen["int4"]["opset"] == 17  # refused by the API, which names the reason
    assert cli.build_parser().parse_args(["quantize", "g.onnx", "--calib", "t.json"]).opset is None


def test_tensorrt_8_parser_is_spared_fp16_scales(graphs):
    """TensorRT < 10's ONNX parser reads Q/DQ scales as float32 whatever their type: the builder
    must refuse the opset-19 FP16 Q/DQ graph before parsing (naming a node and its scale), for
    8.x only, and pass the opset-17 graph (FP32 islands) and the FP32 Q/DQ graph."""
    from qdiff.core.errors import EngineBuildError
    from qdiff.engines.builder import check_parser_reads_scales, graph_facts

    _, _, _, paths, _ = graphs("sd", True)
    facts = {k: graph_facts(p) for k, p in paths.items()}
    n_qdq = sum(1 for n in onnx.load(str(paths["op19"])).graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    assert len(facts["op19"].fp16_scale_qdq) == n_qdq > 0  # every scale of the opset-19 graph is FP16
    assert facts["op17"].fp16_scale_qdq == () and facts["fp32"].fp16_scale_qdq == ()
    with pytest.raises(EngineBuildError, match=r"Q/DQ nodes with FLOAT16 scales \(first: node '.+', scale '.+'\)") as err:
        check_parser_reads_scales(facts["op19"], paths["op19"], major=8)
    assert str(n_qdq) in err.value.message and "without --dtype fp16" in err.value.hint
    check_parser_reads_scales(facts["op19"], paths["op19"], major=10)
    check_parser_reads_scales(facts["op17"], paths["op17"], major=8)
    check_parser_reads_scales(facts["fp32"], paths["fp32"], major=8)
