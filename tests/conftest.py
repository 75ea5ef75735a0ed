"""Tiny diffusers models, built with seeded random weights and saved as real model folders.

Sizes are the smallest that still exercise every structure the exporter and the Q/DQ pass meet
in full-size models: down/up blocks with skip concats, attention, cross-attention, linear and
convolutional projections, per-block head counts, SDXL-style added conditions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("QDIFF_QUIET", "1")
torch.set_num_threads(2)


def tiny_unet2d(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8,
    ).eval()


def tiny_cond_unet(style: str = "sd", seed: int = 0):
    """SD 1.x ('sd'), SD 2.x ('sd2': linear projections, per-block head counts) or SDXL ('sdxl')."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, norm_num_groups=8, attention_head_dim=4,
    )
    if style == "sd2":
        kwargs.update(use_linear_projection=True, attention_head_dim=(2, 4))
    if style == "sdxl":
        kwargs.update(
            use_linear_projection=True, attention_head_dim=(2, 4), addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8, transformer_layers_per_block=(1, 1),
        )
    return UNet2DConditionModel(**kwargs).eval()


def save_pipeline(unet, folder: Path, *, class_embeddings: torch.Tensor | None = None) -> Path:
    from diffusers import DDPMScheduler

    unet.save_pretrained(folder / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder / "scheduler")
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", type(unet).__name__], "scheduler": ["diffusers", "DDPMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    if class_embeddings is not None:
        from safetensors.torch import save_file

        (folder / "conditioning").mkdir()
        save_file({"embeddings": class_embeddings.contiguous()}, str(folder / "conditioning" / "class_embeddings.safetensors"))
        names = [f"class{i}" for i in range(class_embeddings.shape[0] - 1)]
        (folder / "conditioning" / "classes.json").write_text(json.dumps({"class_names": names, "null_class_index": len(names)}))
    return folder


@pytest.fixture(scope="session")
def uncond_model_dir(tmp_path_factory) -> Path:
    return save_pipeline(tiny_unet2d(), tmp_path_factory.mktemp("uncond"))


@pytest.fixture(scope="session")
def class_cond_model_dir(tmp_path_factory) -> Path:
    unet = tiny_cond_unet("sd")
    emb = torch.randn(4, 1, 24, generator=torch.Generator().manual_seed(1))  # 3 classes + null
    return save_pipeline(unet, tmp_path_factory.mktemp("classcond"), class_embeddings=emb)


@pytest.fixture(scope="session")
def bare_cond_unet_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bare")
    tiny_cond_unet("sdxl").save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def fast_recipe():
    from qdiff.calib.recipe import Recipe

    return Recipe(name="w8a8", num_timesteps=4, samples_per_timestep=4, calibration_steps=8, batch_size=4)


def per_channel(scale, ndim: int, axis: int):
    """`scale` (one value per channel along `axis`, or a scalar) shaped to broadcast against a
    weight of `ndim` dimensions: `w / per_channel(s, w.ndim, axis)` is the weight in grid steps."""
    import numpy as np

    scale = np.asarray(scale)
    shape = [1] * ndim
    if scale.ndim:
        shape[axis] = -1
    return scale.reshape(shape)


def quantize_model(model_dir: Path, out: Path, recipe):
    """Export, calibrate and quantize `model_dir` into `out`: (bundle, fp32 onnx, table, result)."""
    from qdiff.api import calibrate, export_model, quantize_onnx
    from qdiff.models import load_model

    exported = export_model(model_dir, out)
    table = calibrate(model_dir, out, recipe)
    q = quantize_onnx(exported.onnx_path, table.table_path)
    return load_model(model_dir), exported.onnx_path, table.table, q


def compare_with_fake_quant(bundle, table, qdq_path, seeds):
    """(Q/DQ graph under ORT vs fake-quant reference, FP32 vs fake-quant reference) per seed."""
    from qdiff.calib.fake_quant import build_fake_quant_model
    from qdiff.export.onnx_export import example_inputs
    from qdiff.export.validate import error_stats
    from qdiff.runtime.backends import OnnxRuntimeDenoiser, TorchDenoiser

    reference = TorchDenoiser(build_fake_quant_model(bundle.unet, table))
    session = OnnxRuntimeDenoiser(qdq_path, optimize=False)
    results = []
    for seed in seeds:
        inputs = example_inputs(bundle.unet, batch=2, seed=seed, tokens=3)
        sample, t = inputs.pop("sample"), inputs.pop("timestep")
        ref = reference(sample, t, **inputs)
        results.append((error_stats(session(sample, t, **inputs), ref), error_stats(TorchDenoiser(bundle.unet)(sample, t, **inputs), ref)))
    return results


def layerwise_fake_quant_errors(
    bundle, table, qdq_path, *, recipe=None, seed: int = 3, arithmetic: str = "exact", dtype: torch.dtype = torch.float32, weights=None, round_inputs: torch.dtype | None = None
) -> dict[str, float]:
    """Each quantized layer of the Q/DQ graph, cut out (its input tensor -> its Conv/MatMul/Gemm
    output) and fed the very tensor its fake-quant twin sees: relative L2 per module.

    This is the CPU-independent form of "the graph and the reference compute the same function".
    Fed by the whole model instead, ORT's and PyTorch's float ops (GroupNorm, attention) differ
    by ~1e-6 before a quantizer, which now and then flips an INT8 rounding; a tiny random-weight
    model amplifies a flip, and how often it happens depends on the CPU's kernels. Cut at each
    layer, both sides quantize the same float tensor, so nothing but round-off remains.
    A split layer (two Convs + Add per module) is cut from its branch tensors (or, for a split
    conv1, the tensor its Slices read) to the Add. `arithmetic` is the ONNX Runtime Q/DQ
    arithmetic the cut layers run with (graph optimizations on, as the backend runs them);
    `dtype=torch.float16` checks an FP16 Q/DQ graph against the FP16 reference.
    `round_inputs=torch.float16` rounds each quantized layer's input to FP16 in the (FP32)
    reference and feeds the graph that FP16 tensor: the opset-17 FP16 graph, whose FP32 Q/DQ
    islands quantize an FP16 tensor with FP32 scales and FP32 arithmetic, as that reference does.
    """
    from collections import Counter

    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    from qdiff.calib.fake_quant import build_fake_quant_model
    from qdiff.export.graph_index import WEIGHTED_OPS, module_name
    from qdiff.export.onnx_export import example_inputs
    from qdiff.runtime.backends import session_options

    model = onnx.shape_inference.infer_shapes(onnx.load(str(qdq_path)))
    graph = gs.import_onnx(model)
    per_module = Counter(module_name(n) for n in graph.nodes if n.op in WEIGHTED_OPS)
    def made_by(tensor, suffix):
        """The tensor a Q/DQ pass's own Cast (an opset-17 FP32 island's, named `*suffix`) reads."""
        producer = tensor.inputs[0] if tensor.inputs else None
        return producer.inputs[0] if producer is not None and producer.op == "Cast" and producer.name.endswith(suffix) else tensor

    def quantized_input(node):
        """The float tensor a quantized node's activation Q/DQ reads, or None if not quantized
        (through the Casts of an opset-17 FP32 island: the FP16 tensor before them)."""
        source = made_by(node.inputs[0], "/CastToFloat16")
        dq = source.inputs[0] if source.inputs else None
        return made_by(dq.inputs[0].inputs[0].inputs[0], "/CastToFloat") if dq is not None and dq.op == "DequantizeLinear" else None

    cuts = {}
    for node in graph.nodes:
        name = module_name(node)
        if node.op not in WEIGHTED_OPS or name is None or quantized_input(node) is None:
            continue
        if per_module[name] == 1:
            cuts[name] = ([quantized_input(node).name], node.outputs[0].name, node.op)
        elif node.name.endswith("/ConvA"):  # split: ConvA and ConvB, their sum is the SplitAdd
            (add,) = [n for n in node.outputs[0].outputs if n.op == "Add" and n.name.endswith("/SplitAdd")]
            conv_b = next(n for n in add.inputs[1].inputs)
            branches = [quantized_input(node), quantized_input(conv_b)]
            if all(b.inputs and b.inputs[0].op == "Slice" for b in branches):  # split conv1
                branches = [branches[0].inputs[0].inputs[0]]
            cuts[name] = ([b.name for b in branches], add.outputs[0].name, "Split")
    reference = build_fake_quant_model(bundle.unet, table, recipe, dtype=dtype, weights=weights)
    seen: dict[str, tuple] = {}

    def hook(module, args, out, name):
        seen.setdefault(name, (args[0].detach(), out.detach(), getattr(module.layer, "bias", None)))

    handles = []
    if round_inputs is not None:
        handles += [reference.get_submodule(name).register_forward_pre_hook(lambda m, a: (a[0].to(round_inputs).to(a[0].dtype), *a[1:])) for name in cuts]
    handles += [reference.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name)) for name in cuts]
    inputs = {k: v.to(dtype) if k != "timestep" else v for k, v in example_inputs(bundle.unet, batch=2, seed=seed, tokens=3).items()}
    sample, t = inputs.pop("sample"), inputs.pop("timestep")
    kwargs = {"encoder_hidden_states": inputs.pop("encoder_hidden_states")} if "encoder_hidden_states" in inputs else {}
    if inputs:
        kwargs["added_cond_kwargs"] = inputs
    with torch.no_grad():
        reference(sample, t, **kwargs, return_dict=False)
    for h in handles:
        h.remove()
    extractor = onnx.utils.Extractor(model)
    errors = {}
    for name, (x_names, y_name, op) in cuts.items():
        x, expected, bias = seen[name]
        x = x if round_inputs is None else x.to(round_inputs)
        expected = expected.double()
        if op == "MatMul" and bias is not None:  # the exporter adds a Linear's bias after the MatMul
            expected = expected - bias.double()
        if len(x_names) == 2:  # the two branches of the concat the fake-quant module sees whole
            c = table.layers[name].split_channels
            feeds = {x_names[0]: x[:, :c].numpy(), x_names[1]: x[:, c:].numpy()}
        else:
            feeds = {x_names[0]: x.numpy()}
        layer = extractor.extract_model(list(x_names), [y_name])
        options = session_options(arithmetic=arithmetic)  # all optimizations on, as the backend runs
        got = ort.InferenceSession(layer.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        diff = np.asarray(got, np.float64) - expected.numpy()
        errors[name] = float(np.linalg.norm(diff) / max(np.linalg.norm(expected.numpy()), 1e-30))
    return errors
