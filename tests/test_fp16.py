"""FP16 graphs (issue 12 parts 1-2): the FP16 export, the FP16 Q/DQ graph and the FP16 INT4
weight-only graph, their structure (what a strongly typed TensorRT build reads) and their
numerics under ONNX Runtime on the CPU against PyTorch references."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from qdiff.api import calibrate, export_model, quantize_int4_weight_only, quantize_onnx
from qdiff.calib.fake_quant import build_fake_quant_model
from qdiff.core.errors import QuantizationError
from qdiff.export.fp16 import boundary_casts, convert_to_fp16
from qdiff.export.onnx_export import example_inputs
from qdiff.export.qdq import insert_qdq_file
from qdiff.export.validate import error_stats
from qdiff.models import load_model
from qdiff.runtime.backends import TorchDenoiser
from tests.conftest import layerwise_fake_quant_errors, save_pipeline, tiny_cond_unet, tiny_unet2d

CONFIGS = ["unet2d", "sd", "sd2", "sdxl"]


def _qdq_session(path):
    """Q/DQ as float simulation (TensorRT's arithmetic), never ORT's fused integer kernels."""
    import onnxruntime as ort

    from qdiff.runtime.backends import session_options

    return ort.InferenceSession(str(path), session_options(optimize=False), providers=["CPUExecutionProvider"])


def _run(session, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(["out_sample"], {n: inputs[n].float().numpy() for n in names})[0])


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, fast_recipe):
    """Per config: (bundle, table, FP32 export, FP32 Q/DQ result, FP16 Q/DQ result), split shortcut on."""
    recipe = fast_recipe.with_overrides(split_shortcut=True)
    made = {}

    def make(config: str):
        if config not in made:
            root = tmp_path_factory.mktemp(f"fp16_{config}")
            unet = tiny_unet2d() if config == "unet2d" else tiny_cond_unet(config)
            model_dir = save_pipeline(unet, root / "model")
            exported = export_model(model_dir, root / "out")
            table = calibrate(model_dir, root / "out", recipe, random_conditioning=config != "unet2d", timestep_stats=False)
            q32 = quantize_onnx(exported.onnx_path, table.table_path)
            q16 = quantize_onnx(exported.onnx_path, table.table_path, dtype="fp16")
            made[config] = (load_model(model_dir), table.table, exported.onnx_path, q32, q16)
        return made[config]

    return make


def _typed(path) -> gs.Graph:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    return gs.import_onnx(model)


@pytest.mark.parametrize("config", CONFIGS)
def test_fp16_qdq_graph_structure(graphs, config):
    """What TensorRT >= 10 strongly typed needs: opset >= 19, FP16 scales, FP16 DQ outputs
    straight into Conv/MatMul/Gemm, one Cast per graph input and output, no FP32 island on a
    model that does not overflow, split-shortcut convolutions present."""
    _, table, _, q32, q16 = graphs(config)
    assert q16.onnx_path.name == "denoiser.w8a8.fp16.onnx" and q32.onnx_path.name == "denoiser.w8a8.onnx"
    model = onnx.load(str(q16.onnx_path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    graph = _typed(q16.onnx_path)
    dqs = [n for n in graph.nodes if n.op == "DequantizeLinear"]
    assert len(dqs) == q16.report.qdq_pairs > 20
    for dq in dqs:
        assert dq.inputs[1].values.dtype == np.float16, dq.name
        assert dq.outputs[0].dtype == np.float16, dq.name
        assert {c.op for c in dq.outputs[0].outputs} <= {"Conv", "MatMul", "Gemm"}, dq.name
    weights = [n.inputs[1] for n in graph.nodes if n.op in ("Conv", "MatMul", "Gemm") and isinstance(n.inputs[1], gs.Constant)]
    assert all(w.values.dtype == np.float16 for w in weights)  # float layers (conv_in/out) are FP16 too
    casts = boundary_casts(model)
    assert casts == {name: 1 for name in casts}, casts
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in [*model.graph.input, *model.graph.output])
    assert q16.report.fp32_islands == [] and q16.report.dtype == "fp16"
    assert "0 node(s) kept in FP32" in q16.report.summary()
    assert q16.report.to_json()["quantized_layers"] == q32.report.to_json()["quantized_layers"]
    assert table.split_layers(True, False) and any(n.name.endswith("/ConvA") for n in graph.nodes)


@pytest.mark.parametrize("config", CONFIGS)
def test_fp16_qdq_matches_fp16_fake_quant_and_fp32_qdq(graphs, config):
    """The FP16 Q/DQ graph computes the FP16 fake-quant model of the same table.

    Not bit-close, for a measured reason: FP16 rounding of an activation moves a few percent of
    the values that sit near an INT8 rounding boundary one INT8 step, and these tiny random
    models amplify each such flip (the FP32 test in test_qdq.py sees single flips reach 3e-2).
    The same FP16 rounding done by PyTorch moves the fake-quant reference itself from its FP32
    twin by ~5e-2 (ref16 vs ref32), so that is the scale: the graph must sit no farther from
    its reference than FP16 moves the reference, and within the same distance of the FP32
    Q/DQ graph. A wrong scale, a misplaced Q/DQ or a lost split would show far above it
    (the quantization error itself, q vs FP32 model, is 5-10e-2; a dropped layer gives ~1)."""
    bundle, table, _, q32, q16 = graphs(config)
    ref16 = TorchDenoiser(build_fake_quant_model(bundle.unet, table, dtype=torch.float16))
    ref32 = TorchDenoiser(build_fake_quant_model(bundle.unet, table))
    s16, s32 = _qdq_session(q16.onnx_path), _qdq_session(q32.onnx_path)
    rows = []
    for seed in range(1, 4):
        inputs = example_inputs(bundle.unet, batch=2, seed=seed, tokens=3)
        sample, t = inputs["sample"], inputs["timestep"]
        cond = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
        out16, out32 = _run(s16, inputs), _run(s32, inputs)
        r16 = ref16(sample.half(), t, **{k: v.half() for k, v in cond.items()}).float()
        r32 = ref32(sample, t, **cond)
        fp32 = TorchDenoiser(bundle.unet)(sample, t, **cond)
        stats = error_stats(out16, r16)
        assert stats.nonfinite == 0
        rows.append((stats.rel_l2, error_stats(r16, r32).rel_l2, error_stats(out16, out32).rel_l2, error_stats(out16, fp32).rel_l2, error_stats(out32, fp32).rel_l2))
    q16_ref16, ref16_ref32, q16_q32, q16_fp32, q32_fp32 = (float(np.mean(c)) for c in zip(*rows))
    assert q16_ref16 < 1.5 * ref16_ref32 and q16_ref16 < 0.1, rows
    assert q16_q32 < 1.5 * ref16_ref32 and q16_q32 < 0.1, rows
    assert q16_fp32 < 2 * q32_fp32, rows  # FP16 adds at most as much error as INT8 already has
    assert ref16_ref32 > 1e-3  # the FP16 reference is really FP16


def test_fp16_export_is_its_own_artifact_and_matches_pytorch(uncond_model_dir, tmp_path):
    fp32 = export_model(uncond_model_dir, tmp_path)
    fp16 = export_model(uncond_model_dir, tmp_path, dtype="fp16")
    assert fp16.onnx_path.name == "denoiser.fp16.onnx" and not fp16.reused  # never the cached FP32 graph
    assert fp32.onnx_path.is_file() and export_model(uncond_model_dir, tmp_path, dtype="fp16").reused
    from qdiff.core.artifacts import read_manifest

    manifest = read_manifest(fp16.onnx_path)
    assert manifest.settings["dtype"] == "fp16" and manifest.details["fp32_islands"] == []
    assert read_manifest(fp32.onnx_path).settings["dtype"] == "fp32"
    assert len(fp16.validation) == 2 and all(v["ok"] and 1e-5 < v["rel_l2"] < 1e-2 for v in fp16.validation), fp16.validation
    model = onnx.load(str(fp16.onnx_path))
    inits = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and np.prod(t.dims) > 16]
    assert inits and all(t.data_type == onnx.TensorProto.FLOAT16 for t in inits)
    assert set(boundary_casts(model).values()) == {1}


@pytest.mark.parametrize("opset", [19, 17], ids=["op19", "op17"])
@pytest.mark.parametrize("where", ["activation", "initializer"])
def test_injected_overflow_makes_an_fp32_island(graphs, tmp_path, where, opset):
    """Scale one convolution's weight (a resnet's conv1, whose output the next GroupNorm brings
    back into range) so its output passes the FP16 limit on the probe inputs
    (or put 1e5 in its bias, above FP16's 65504): that Conv and the readers of its output stay
    FP32 behind Casts, the report names them, and the graph still runs finite."""
    _, table, fp32_path, _, _ = graphs("unet2d")
    model = onnx.load(str(fp32_path))
    graph = gs.import_onnx(model)
    victim = next(n for n in graph.nodes if n.name == "/unet/mid_block/resnets.0/conv1/Conv")
    if where == "activation":
        victim.inputs[1].values = victim.inputs[1].values * np.float32(1e5)
    else:
        bias = victim.inputs[2].values.copy()
        bias[0] = 1e5
        victim.inputs[2].values = bias
    src = tmp_path / "injected.onnx"
    onnx.save(gs.export_onnx(graph), str(src))
    report = insert_qdq_file(src, table, tmp_path / "injected.fp16.onnx", dtype="fp16", probe_size=16, opset=opset)  # 17: FP32 Q/DQ islands, the island layer without Casts
    islands = {i["node"]: i for i in report.fp32_islands}
    assert victim.name in islands, report.fp32_islands
    expected = "> 16384 on the probe inputs" if where == "activation" else "> FP16 max 65504"
    assert expected in islands[victim.name]["reason"]
    assert "/unet/mid_block/resnets.0/Add" in islands  # the time-embedding Add reads the big output
    assert len(islands) < 0.1 * len(graph.nodes)  # an exception, not the graph
    assert victim.name in report.summary()
    out = gs.import_onnx(onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "injected.fp16.onnx"))))
    conv = next(n for n in out.nodes if n.name == victim.name)
    assert conv.inputs[1].inputs[0].op == "DequantizeLinear" and conv.inputs[1].inputs[0].inputs[1].values.dtype == np.float32
    act_dq = conv.inputs[0].inputs[0]
    assert act_dq.op == "DequantizeLinear" and act_dq.outputs[0].dtype == np.float32
    assert act_dq.inputs[0].inputs[0].inputs[0].inputs[0].op == "Cast"  # Q reads a Cast to FP32
    assert all(c.op == "Cast" for c in conv.outputs[0].outputs if c.name not in islands)
    inputs = example_inputs(tiny_unet2d(), batch=1, seed=0)
    assert torch.isfinite(_run(_qdq_session(tmp_path / "injected.fp16.onnx"), inputs)).all()


def test_fp16_quantize_refuses_an_fp16_graph(graphs, tmp_path):
    bundle, _, fp32_path, q32, _ = graphs("unet2d")
    fp16 = export_model(bundle.path, tmp_path, dtype="fp16", check=False)
    table_path = fp32_path.parent / "calibration.json"
    with pytest.raises(QuantizationError, match=r"denoiser\.fp16\.onnx is already an FP16 graph"):
        quantize_onnx(fp16.onnx_path, table_path, tmp_path / "x.onnx", dtype="fp16")
    # ... and the FP32 Q/DQ pass refuses it too, before writing anything
    with pytest.raises(QuantizationError, match=r"denoiser\.fp16\.onnx is an FP16 graph.*FP32 export"):
        quantize_onnx(fp16.onnx_path, table_path, tmp_path / "y.onnx")
    assert not (tmp_path / "y.onnx").exists()


def test_int4_weight_only_fp16_graph(graphs):
    """FP16 INT4 weight-only graph: opset 21, FP16 block scales, each DQ gives FP16 straight
    into its MatMul/Gemm, one Cast per I/O; numerics within FP16 round-off of the FP32 INT4
    graph (no activation quantization here, so no INT8 rounding flips: a tight tolerance)."""
    bundle, _, fp32_path, _, _ = graphs("sd")
    w32 = quantize_int4_weight_only(fp32_path, block_size=8)
    w16 = quantize_int4_weight_only(fp32_path, block_size=8, dtype="fp16")
    assert w16.onnx_path.name == "denoiser.int4wo.fp16.onnx" and w16.report.dtype == "fp16"
    model = onnx.load(str(w16.onnx_path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
    graph = _typed(w16.onnx_path)
    dqs = [n for n in graph.nodes if n.op == "DequantizeLinear"]
    assert len(dqs) == len(w16.report.converted) > 10
    for dq in dqs:
        assert dq.inputs[1].values.dtype == np.float16 and dq.outputs[0].dtype == np.float16
        assert {c.op for c in dq.outputs[0].outputs} <= {"MatMul", "Gemm"}
    assert set(boundary_casts(model).values()) == {1}
    s16, s32 = _qdq_session(w16.onnx_path), _qdq_session(w32.onnx_path)
    for seed in (1, 2):
        inputs = example_inputs(bundle.unet, batch=2, seed=seed, tokens=3)
        stats = error_stats(_run(s16, inputs), _run(s32, inputs))
        assert stats.nonfinite == 0 and stats.rel_l2 < 1e-2, str(stats)


def test_cli_dtype_flags_default_to_fp32():
    from qdiff.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["export", "m", "-o", "o"]).dtype == "fp32"
    assert parser.parse_args(["quantize", "g.onnx", "--calib", "t.json", "--dtype", "fp16"]).dtype == "fp16"
    sub = parser._subparsers._group_actions[0].choices
    for command in ("export", "quantize"):
        assert "(default: fp32)" in " ".join(sub[command].format_help().split())


@pytest.mark.parametrize("config", CONFIGS)
def test_fp16_qdq_layers_equal_the_fp16_fake_quant_reference(graphs, config):
    """The tight form of the check above: every quantized layer of the FP16 Q/DQ graph (split
    ones from their branches to their Add), cut out and fed the very FP16 tensor its FP16
    fake-quant twin sees, computes the same function at FP16 round-off. No flip can propagate,
    so what is left is FP16 rounding of the layer's own output and accumulation order."""
    bundle, table, _, _, q16 = graphs(config)
    layers = layerwise_fake_quant_errors(bundle, table, q16.onnx_path, dtype=torch.float16)
    assert len(layers) == q16.report.to_json()["quantized_layers"]
    worst = max(layers, key=layers.get)
    print(f"{config}: {len(layers)} layers, worst {worst} rel-L2 {layers[worst]:.2e}")
    assert layers[worst] < 2e-3, (worst, layers[worst])


@pytest.mark.slow  # ~50 s and ~8 GB of memory on 2 cores
def test_conversion_of_a_graph_above_2_gib():
    """SD 1.5's FP32 graph is 3.4 GB: above protobuf's 2 GiB, where even ByteSize() raises. The
    conversion must copy the model without serializing it (seen on the H200: EncodeError)."""
    from onnx import TensorProto, helper, numpy_helper

    n = 16384
    weights = [numpy_helper.from_array(np.full((n, n), 0.01, np.float32), f"w{i}") for i in range(2)]  # 2 x 1 GiB
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["y"])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], weights)
    out = convert_to_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [i.data_type for i in out.graph.initializer] == [TensorProto.FLOAT16] * 2
    assert float(numpy_helper.to_array(out.graph.initializer[0]).reshape(-1)[0]) == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize("config", ["unet2d", "sd"])
def test_tensor_maxima_equal_a_run_with_every_tensor_as_output(graphs, config):
    """The overflow probe reduces each tensor to its max |x| inside the graph (so SD 1.5 fits
    in memory); it must give exactly the maxima of a run that returns every tensor."""
    import onnxruntime as ort

    from qdiff.export.fp16 import _float_tensors, probe_feeds, tensor_maxima

    _, _, fp32_path, _, _ = graphs(config)
    model = onnx.load(str(fp32_path))
    feeds = probe_feeds(model, size=16, tokens=7, count=2)
    got = tensor_maxima(fp32_path, feeds)
    names = _float_tensors(model)
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names if n not in existing)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    expected: dict[str, float] = {}
    for feed in feeds:
        for name, value in zip(outputs, session.run(outputs, {k: v for k, v in feed.items() if k in wanted})):
            if name in names:
                expected[name] = max(expected.get(name, 0.0), float(np.abs(value).max()))
    assert set(got) == set(names) and len(names) > 100
    assert all(got[n] == expected[n] for n in names), [n for n in names if got[n] != expected[n]][:5]


def test_tensor_maxima_does_not_hold_every_activation(tmp_path):
    """The probe must free each tensor once its max |x| is taken: on a chain of 60 ops with
    16 MB outputs, holding them all would cost ~1 GB (SD 1.5: over 24 GB); measured ~0.1 GB."""
    import subprocess
    import sys

    code = f"""
import resource, numpy as np, onnx
from onnx import helper, TensorProto
from qdiff.export.fp16 import tensor_maxima
n = 4 * 2**20
nodes = [helper.make_node("Sin", ["x" if i == 0 else f"t{{i - 1}}"], [f"t{{i}}" if i < 59 else "y"]) for i in range(60)]
g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])])
path = {str(tmp_path / "chain.onnx")!r}
onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
small = {str(tmp_path / "small.onnx")!r}
g.input[0].type.tensor_type.shape.dim[0].dim_value = g.output[0].type.tensor_type.shape.dim[0].dim_value = 8
onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), small)
tensor_maxima(small, [{{"x": np.ones(8, np.float32)}}])  # warm-up on a tiny twin: libraries loaded before the baseline
x = np.linspace(-1, 1, n, dtype=np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
maxima = tensor_maxima(path, [{{"x": x}}])
assert len(maxima) == 60 and abs(maxima["t0"] - np.sin(1.0)) < 1e-6
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mib = float(done.stdout.strip().splitlines()[-1])
    print(f"probe peak RSS growth: {grown_mib:.0f} MiB (all 60 tensors: 960 MiB)")
    assert grown_mib < 400


def test_tensor_maxima_of_one_graph_and_feeds_are_computed_once(graphs, monkeypatch):
    """Both FP16 Q/DQ passes of a graph probe it with the same inputs: the second reuses the
    first's maxima, and other feeds or a rewritten file are probed again."""
    import onnxruntime as ort

    from qdiff.export import fp16

    _, _, fp32_path, _, _ = graphs("unet2d")
    feeds = fp16.probe_feeds(onnx.load(str(fp32_path)), size=16, count=1)
    sessions = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: sessions.append(1) or real(*a, **k))
    fp16._MAXIMA_CACHE.clear()
    first = fp16.tensor_maxima(fp32_path, feeds)
    assert fp16.tensor_maxima(fp32_path, feeds) == first and len(sessions) == 1
    other = fp16.probe_feeds(onnx.load(str(fp32_path)), size=16, count=1, seed=1)
    assert fp16.tensor_maxima(fp32_path, other) != first and len(sessions) == 2
