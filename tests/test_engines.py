"""The parts of the TensorRT engine stage that need no GPU: profiles, precision rules, the
manifest check, the inspector's join of engine layers with the graph, and the errors a CPU
machine gives. The GPU half is tests/test_tensorrt.py (run on the device machine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qdiff.engines.builder import check_precision, graph_facts
from qdiff.engines.compat import parse_tactic_sources, version_tuple
from qdiff.engines.inspector import graph_nodes, inspect, precision_of, to_markdown
from qdiff.engines.manifest import ENGINE_FILE, ENGINE_KIND, Platform, verify_engine
from qdiff.engines.profiles import ShapeRange, check_shapes, derive_profile, graph_inputs, parse_range, parse_shape_spec, profile_to_json
from qdiff.core.errors import EngineBuildError, EngineMismatchError, ProfileShapeError
from tests.conftest import quantize_model

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def uncond_graphs(uncond_model_dir, fast_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines-cpu")
    _, fp32, _, q = quantize_model(uncond_model_dir, out, fast_recipe)
    return fp32, q.onnx_path


@pytest.fixture(scope="module")
def sdxl_graph(bare_cond_unet_dir, tmp_path_factory):
    from qdiff.api import export_model

    return export_model(bare_cond_unet_dir, tmp_path_factory.mktemp("engines-sdxl"), check=False).onnx_path


# ----------------------------------------------------------------------------- profiles


def test_profile_is_derived_from_the_graphs_dynamic_axes(sdxl_graph):
    inputs = graph_inputs(sdxl_graph)
    assert [i.name for i in inputs] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    profile = derive_profile(inputs, batch=(1, 2, 4), height=(8, 16, 32), tokens=77)
    assert profile["sample"] == ShapeRange((1, 4, 8, 8), (2, 4, 16, 16), (4, 4, 32, 32))
    assert profile["encoder_hidden_states"] == ShapeRange((1, 77, 24), (2, 77, 24), (4, 77, 24))
    assert profile["time_ids"].max == (4, 6)
    override = dict([parse_shape_spec("sample=1x4x16x16:2x4x16x24:2x4x16x32")])
    assert derive_profile(inputs, batch=2, height=16, overrides=override)["sample"].opt == (2, 4, 16, 24)


def test_profile_errors_name_the_input(sdxl_graph):
    inputs = graph_inputs(sdxl_graph)
    with pytest.raises(ProfileShapeError, match="input 'sample' dimension 2 is dynamic"):
        derive_profile(inputs, batch=2)  # no size known
    with pytest.raises(ProfileShapeError, match="does not have"):
        derive_profile(inputs, batch=2, height=16, overrides={"latents": ShapeRange((1,), (1,), (1,))})
    with pytest.raises(ProfileShapeError, match="rank 3 but the graph's input has rank 4"):
        derive_profile(inputs, batch=2, height=16, overrides=dict([parse_shape_spec("sample=1x4x16")]))
    with pytest.raises(ProfileShapeError, match="min <= opt <= max"):
        parse_shape_spec("sample=2x4x16x16:1x4x16x16:4x4x16x16")
    with pytest.raises(ProfileShapeError, match="NAME="):
        parse_shape_spec("1x4x16x16")
    with pytest.raises(ProfileShapeError, match="three"):
        parse_range("1,2", "--batch")
    assert parse_range("1,2,4", "--batch") == (1, 2, 4) and parse_range("64", "--size") == (64, 64, 64)


def test_check_shapes_names_the_dimension_out_of_range():
    profile = {"sample": ShapeRange((1, 4, 8, 8), (2, 4, 16, 16), (4, 4, 32, 32)), "timestep": ShapeRange((1,), (2,), (4,))}
    check_shapes(profile, {"sample": (4, 4, 32, 8), "timestep": (4,)})
    with pytest.raises(ProfileShapeError, match=r"input 'sample' dimension 3 is 40, outside the engine's profile range \[8, 32\]"):
        check_shapes(profile, {"sample": (2, 4, 16, 40), "timestep": (2,)})
    with pytest.raises(ProfileShapeError, match="needs input"):
        check_shapes(profile, {"sample": (2, 4, 16, 16)})
    with pytest.raises(ProfileShapeError, match="rank"):
        check_shapes(profile, {"sample": (2, 4, 16), "timestep": (2,)})


# ----------------------------------------------------------------------------- precision rules


def test_precision_must_agree_with_the_graph(uncond_graphs):
    fp32, qdq = uncond_graphs
    f, q = graph_facts(fp32), graph_facts(qdq)
    assert f.qdq_nodes == 0 and q.qdq_nodes > 0 and q.weight_bits == 8
    assert q.unet_config["sample_size"] == 16  # kept from export for TensorRTUNet
    assert "FP16" in check_precision("fp16", f, fp32)
    assert "INT8" in check_precision("int8", q, qdq)
    with pytest.raises(EngineBuildError, match="no Q/DQ nodes"):
        check_precision("int8", f, fp32)
    with pytest.raises(EngineBuildError, match="QuantizeLinear/DequantizeLinear"):
        check_precision("fp16", q, qdq)
    with pytest.raises(EngineBuildError, match="not W4A8"):
        check_precision("w4a8", q, qdq)
    with pytest.raises(EngineBuildError, match="no INT4 DequantizeLinear"):
        check_precision("int4-weight-only", f, fp32)
    with pytest.raises(EngineBuildError, match="unknown precision"):
        check_precision("int3", f, fp32)


def test_compat_helpers():
    assert version_tuple("8.6.0") == (8, 6, 0) and version_tuple("10.3.0.post1") == (10, 3, 0)
    assert parse_tactic_sources("edge_mask_convolutions, jit_convolutions") == ("edge_mask_convolutions", "jit_convolutions")
    assert parse_tactic_sources("default") is None
    with pytest.raises(EngineBuildError, match="unknown tactic source"):
        parse_tactic_sources("cudnn,magic")


# ----------------------------------------------------------------------------- manifest


def _fake_engine(folder: Path, platform: Platform) -> Path:
    from qdiff.core.artifacts import Manifest, sha256_file, write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / ENGINE_FILE
    plan.write_bytes(b"not a real plan, but bytes with a hash")
    profile = {"sample": ShapeRange((1, 3, 16, 16), (2, 3, 16, 16), (2, 3, 16, 16))}
    write_manifest(plan, Manifest(kind=ENGINE_KIND, inputs={"onnx_sha256": "0" * 64, **platform.to_inputs()}, settings={"precision": "int8", "profile": profile_to_json(profile)}, outputs={"sha256": sha256_file(plan)}))
    return plan


def test_manifest_check_refuses_other_tensorrt_gpu_or_bytes(tmp_path):
    here = Platform("8.6.0", "NVIDIA H200", "9.0")
    plan = _fake_engine(tmp_path / "e", here)
    assert verify_engine(tmp_path / "e", here).profile["sample"].opt == (2, 3, 16, 16)
    with pytest.raises(EngineMismatchError, match=r"(?s)built with TensorRT 8.6.0, this is TensorRT 10.3.0.*hint: rebuild it: qdiff build"):
        verify_engine(plan, Platform("10.3.0", "NVIDIA H200", "9.0"))
    with pytest.raises(EngineMismatchError, match=r"built for NVIDIA H200 \(sm 9.0\), this GPU is NVIDIA A100"):
        verify_engine(plan, Platform("8.6.0", "NVIDIA A100-SXM4-80GB", "8.0"))
    plan.write_bytes(b"truncated")
    with pytest.raises(EngineMismatchError, match="bytes differ"):
        verify_engine(plan, here)
    with pytest.raises(EngineMismatchError, match="no engine at"):
        verify_engine(tmp_path / "nowhere", here)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / ENGINE_FILE).write_bytes(b"x")
    with pytest.raises(EngineMismatchError, match="has no manifest"):
        verify_engine(tmp_path / "bare", here)


# ----------------------------------------------------------------------------- inspector


def test_precision_strings_of_tensorrt_8_and_10():
    assert precision_of("Thirty-two wide channel vectorized row major Int8 format") == "INT8"
    assert precision_of("Channel major FP16 format where channel % 8 == 0") == "FP16"
    assert precision_of("Row major linear FP32 format") == "FP32"
    assert precision_of("Half") == "FP16" and precision_of("Float") == "FP32" and precision_of("Int8") == "INT8"


def test_graph_macs_match_the_calibration_tables_count(uncond_graphs, uncond_model_dir):
    """Two independent MAC counts (ONNX shape inference here, PyTorch hooks in calibration)."""
    from qdiff.calib.table import CalibrationTable

    fp32, qdq = uncond_graphs
    nodes = {n.name: n for n in graph_nodes(qdq, {"sample": (1, 3, 16, 16), "timestep": (1,)})}
    table = CalibrationTable.load(fp32.parent / "calibration.json")
    conv_in = nodes["/unet/conv_in/Conv"]
    assert conv_in.macs == 16 * 16 * 16 * 3 * 9 and not conv_in.quantized_in_graph  # the recipe keeps conv_in float
    by_module = {".".join(name.split("/")[2:-1]): node for name, node in nodes.items() if node.op == "Conv"}
    checked = 0
    for module, ranges in table.layers.items():
        if ranges.op == "Conv" and ranges.macs and not ranges.split_channels:
            assert by_module[module].macs == ranges.macs, module
            assert by_module[module].quantized_in_graph
            checked += 1
    assert checked > 10


def test_inspector_on_the_sd15_int8_engine_tensorrt_built_on_the_h200():
    """Real data: the engine inspector's JSON and per-layer profile of the SD 1.5 UNet's W8A8
    engine (TensorRT 8.6, H200; benchmarks/results), joined with that graph's skeleton (every
    node and shape, no weights; tools/onnx_skeleton.py)."""
    layers = json.loads((DATA / "h200-sd15-w8a8.layers.json").read_text(), strict=False)
    timings = json.loads((DATA / "h200-sd15-w8a8.profile.json").read_text())["timings_ms"]
    shapes = {"sample": (2, 4, 64, 64), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)}
    report = inspect(DATA / "sd15-w8a8.skeleton.onnx", layers, shapes, timings)
    s = report.summary()
    assert round(sum(n.macs for n in report.nodes) / 2 / 1e9) == 402  # SD 1.5: ~402 GMAC per sample
    assert s["convolutions"]["total"] == 110 and s["convolutions"]["int8"] == 108
    conv_in = next(n for n in report.nodes if n.node == "/unet/conv_in/Conv")
    assert conv_in.precision == "FP32" and "unquantized" in conv_in.reason  # float by the recipe; TF32 kernel
    assert s["matmuls"]["in_fused_blocks"] >= 240  # attention/FF inside Myelin blocks, by scope
    assert 0.5 < s["int8_mac_share"] < 0.6 and s["int8_mac_share_convolutions"] > 0.99
    assert s["standalone_quantize_layers"] == 102  # QuantizeLinear not fused into the GroupNorm/SiLU blocks
    kinds = s["profile_ms_by_kind"]
    assert max(kinds, key=kinds.get) == "fused block" and kinds["INT8"] > 1.0
    md = to_markdown(report)
    assert "INT8 share of conv/matmul MACs: **55." in md and "Slowest 25 layers" in md


def test_build_on_a_machine_without_tensorrt_says_so(uncond_graphs, tmp_path, capsys):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from qdiff.cli import main

    rc = main(["build", str(uncond_graphs[0]), "-o", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 1 and "TensorRT is not importable here" in err and "hint:" in err
    assert not (tmp_path / "e").exists()


def test_build_settings_refuse_bad_float_layers_before_tensorrt_is_imported(uncond_graphs, tmp_path):
    """A typo in --float-layers fails at once, on any machine, naming the choices."""
    from qdiff import api
    from qdiff.engines.builder import BuildSettings

    fp32, _ = uncond_graphs
    with pytest.raises(EngineBuildError, match="'bf16' are not supported") as info:
        api.build_engine(fp32, tmp_path / "e", precision="int8", float_layers="bf16")
    assert "fp16" in info.value.hint
    with pytest.raises(EngineBuildError, match="strongly typed"):
        BuildSettings(float_layers="fp16", strongly_typed=True)
    with pytest.raises(EngineBuildError, match="outside 0..5"):
        BuildSettings(optimization_level=7)
    assert BuildSettings(float_layers="fp16").to_json()["float_layers"] == "fp16"
    assert not (tmp_path / "e").exists()


def test_cli_build_takes_float_layers_and_quantize_takes_placement():
    from qdiff.cli import build_parser

    args = build_parser().parse_args(["build", "g.onnx", "-o", "e", "--precision", "int8", "--float-layers", "fp16"])
    assert args.float_layers == "fp16"
    args = build_parser().parse_args(["quantize", "g.onnx", "--calib", "t.json", "--placement", "conv-ff"])
    assert args.placement == "conv-ff"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "g.onnx", "--calib", "t.json", "--placement", "attention"])


def test_strongly_typed_needs_an_fp16_graph(uncond_graphs, tmp_path):
    """A strongly typed network (TensorRT >= 10) takes the graph's types: from qdiff's FP32 graphs
    it would build an FP32 engine, so they are refused, naming the float32 initializers found and
    the command that makes the FP16 graph. The check reads initializers, not only the inputs."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qdiff.engines.builder import check_strongly_typed

    fp32, qdq = uncond_graphs
    for path, remake in ((fp32, "qdiff export MODEL -o OUT --dtype fp16"), (qdq, "qdiff quantize FP16_GRAPH.onnx --calib TABLE --dtype fp16")):
        with pytest.raises(EngineBuildError, match="FP32 graph") as info:
            check_strongly_typed(graph_facts(path), path, "int8" if path == qdq else "fp16")
        facts = graph_facts(path)
        largest = max(facts.types.fp32_initializers, key=lambda kv: kv[1])[0]
        assert f"float32 initializers (100% of the float weight elements), e.g. {largest} (" in info.value.message
        assert remake in info.value.hint and "TensorRT 8.6" in info.value.hint
    check_strongly_typed(graph_facts(fp32), fp32, "fp32")  # an FP32 engine from an FP32 graph is what was asked

    def graph(path: Path, input_type: int, weight_dtype: Any, island: bool = False) -> Path:
        x = helper.make_tensor_value_info("sample", input_type, [1, 4])
        y = helper.make_tensor_value_info("out", input_type, [1, 4])
        inits = [numpy_helper.from_array(np.ones((4, 4), weight_dtype), "w")]
        nodes = [helper.make_node("MatMul", ["sample", "w"], ["out"])]
        if island:  # a small FP32 island (a tensor that would overflow FP16) stays allowed
            inits.append(numpy_helper.from_array(np.ones((2,), np.float32), "island_scale"))
        onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits)), str(path))
        return path

    half = graph(tmp_path / "half.onnx", TensorProto.FLOAT16, np.float16, island=True)
    facts = graph_facts(half)
    assert facts.float16_inputs and 0 < facts.types.fp32_weight_share < 0.2
    check_strongly_typed(facts, half)  # an FP16 graph with an FP32 island passes
    # FP16 inputs are not enough: FP32 weights behind them make it an FP32 graph.
    sneaky = graph(tmp_path / "sneaky.onnx", TensorProto.FLOAT16, np.float32)
    with pytest.raises(EngineBuildError, match=r"1 float32 initializers \(100% of the float weight elements\), e.g. w \(16\)"):
        check_strongly_typed(graph_facts(sneaky), sneaky)


# ----------------------------------------------------------------------------- inspector: both JSON schemas


def _small_qdq_graph(path: Path) -> Path:
    """The graph tests/data/inspector-*.layers.json describe: x -> Q/DQ -> conv1 (weight via DQ)
    -> relu -> conv2 (float) -> out, FP16."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h = lambda name, a: numpy_helper.from_array(np.asarray(a, dtype=np.float16), name)  # noqa: E731
    inits = [
        h("x_scale", 0.02), numpy_helper.from_array(np.int8(0), "x_zp"),
        numpy_helper.from_array(np.ones((8, 4, 3, 3), np.int8), "w1_q"), h("w1_scale", np.full(8, 0.01)), numpy_helper.from_array(np.zeros(8, np.int8), "w1_zp"),
        h("w2", np.zeros((4, 8, 3, 3))),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w1_q", "w1_scale", "w1_zp"], ["w1"], name="dq_w", axis=0),
        helper.make_node("Conv", ["x_dq", "w1"], ["c1"], name="/conv1/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="/relu/Relu"),
        helper.make_node("Conv", ["r1", "w2"], ["out"], name="/conv2/Conv", pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT16, [1, 4, 8, 8])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 19)])
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("schema", ["trt86", "trt10"])
def test_inspector_reads_the_86_and_the_10_11_json_schema(schema, tmp_path):
    """TensorRT 8.6 writes one "Format/Datatype" string per tensor and "Bindings"; 10.x/11.x write
    "Format" + "Datatype" and "I/O Tensors". The same engine gives the same precisions in both."""
    graph = _small_qdq_graph(tmp_path / "g.onnx")
    info = json.loads((DATA / f"inspector-{schema}.layers.json").read_text())
    report = inspect(graph, info, {"x": (1, 4, 8, 8)})
    by_node = {n.node: n for n in report.nodes}
    assert by_node["/conv1/Conv"].precision == "INT8" and by_node["/conv1/Conv"].quantized_in_graph
    assert by_node["/conv2/Conv"].precision == "FP16" and "unquantized" in by_node["/conv2/Conv"].reason
    assert [lay.inputs for lay in report.layers] == [["FP16"], ["FP16"], ["INT8"], ["FP16"]]
    assert [lay.outputs for lay in report.layers] == [["FP16"], ["INT8"], ["FP16"], ["FP16"]]
    s = report.summary()
    assert s["convolutions"] == {"total": 2, "int8": 1, "fp16": 1, "fp32": 0, "in_fused_blocks": 0}
    assert s["int8_mac_share"] == 0.5  # two convs of equal MACs
    assert s["standalone_quantize_layers"] == 1 and s["reformat_layers"] == 2
    if schema == "trt10":
        assert s["io"] == {"x": "FP16", "out": "FP16"}
        assert "engine I/O: x (input, FP16), out (output, FP16)" in to_markdown(report)
    else:
        assert s["io"] == {"x": "?", "out": "?"}  # 8.6's Bindings are names only


def test_precision_strings_of_the_separate_datatype_field():
    from qdiff.engines.inspector import tensor_precision

    assert tensor_precision({"Format": "Channel major", "Datatype": "Int8"}) == "INT8"
    assert tensor_precision({"Format": "Row major linear", "DataType": "BFloat16"}) == "BF16"
    assert tensor_precision({"Format/Datatype": "Row major linear FP32"}) == "FP32"
    assert tensor_precision({"Format/Datatype": "N/A due to dynamic shapes"}) == "?"
    assert precision_of("BFloat16") == "BF16" and precision_of("FP8") == "FP8"


def test_out_of_memory_in_tactic_timing_says_so_and_names_the_profile_max():
    """TensorRT 8.6's words when the GPU's memory ran out during tactic timing (SD 1.5 INT8 beside
    torch work on the H200, 2026-12-03) end in "could not find any implementation", which reads
    like a missing kernel. The build error must say it was memory and name the largest shape, also
    when the out-of-memory line is not among the last ones and precision pinning is on."""
    from types import SimpleNamespace

    from qdiff.core.errors import EngineBuildError
    from qdiff.engines.builder import BuildSettings, Configured, build_plan

    seen = ["2: [virtualMemoryBuffer.cpp::resizePhysical::145] Error Code 2: OutOfMemory (no further information)"]
    seen += [f"10: [optimizer.cpp::computeCosts::3873] Error Code 10: Internal Error (Could not find any implementation for node {{ForeignNode[{i}]}}.)" for i in range(6)]
    builder = SimpleNamespace(build_serialized_network=lambda network, config: None)
    logger = SimpleNamespace(errors=seen)
    profile = {"sample": ShapeRange((1, 4, 64, 64), (2, 4, 64, 64), (8, 4, 128, 128))}
    # with --float-layers pinned, "could not find any implementation" alone means a missing FP16 kernel; here memory ran out first
    configured = Configured(config=None, timing_cache=None, timing_cache_path=None, optimization_level=1, tactic_sources_dropped=(), pinned=SimpleNamespace())
    with pytest.raises(EngineBuildError) as failed:
        build_plan(builder, SimpleNamespace(network=None), configured, logger, BuildSettings(precision="int8", profile=profile), tensorrt="8.6.0")
    assert "Could not find any implementation" in failed.value.message  # the last five lines, as TensorRT gave them
    assert "ran out of GPU memory" in failed.value.hint and "sample 8x4x128x128" in failed.value.hint and "--batch" in failed.value.hint
