"""ONNX graph -> serialized TensorRT engine, with the TensorRT Python API (no trtexec, no shell).

Precision is decided by the graph, not by a calibrator: an `int8`/`w4a8` engine is built from a
Q/DQ graph (explicit quantization: TensorRT takes every scale from the graph). Asking for INT8
from a graph without Q/DQ (or FP16 from one with Q/DQ) is an error, because TensorRT would
silently do something else (implicit INT8 with no calibrator, or fail late). How the float parts
get their precision depends on the TensorRT version (`compat.network_typing`):

- TensorRT >= 10: a strongly typed network. Every layer runs in the graph's own type, no
  precision flags are set, so the graph must be FP16 (`qdiff export --dtype fp16`, `qdiff
  quantize --dtype fp16`); an FP32 graph is refused, since it would build an FP32 engine.
- TensorRT 8.6: a weakly typed network with the FP16 (and INT8) builder flags, so whatever the
  graph leaves in float may run in FP16. Takes the FP32 graph and the FP16 graph alike.

The build is four steps that can be called alone, in the manner of polygraphy's loaders:
`parse_network` (graph -> network), `configure` (builder config: profile, flags, tactic sources,
optimization level, timing cache), `build_plan` (config -> serialized plan) and `publish` (plan +
manifest + inspector JSON, atomically). `build_engine` runs them in order.

Builds take minutes for a full-size UNet, so:
- with `--timing-cache FILE`, the cache is loaded before and merged back after every build, which
  makes a rebuild or a second precision of the same graph faster. It is opt-in: with TensorRT
  8.6, a cache holding another graph's fused-block (Myelin) entries made a build fail;
- the console shows a live elapsed-time bar (real phases on TensorRT >= 10's progress monitor);
- the plan, its manifest, its inspector JSON and the timing cache are each written atomically,
  so an interrupted build leaves the previous engine intact.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdiff.engines.compat import INT8_OPT_LEVEL_STRONG, Features, device_memory_bytes, features, import_tensorrt, make_logger, network_flags, parse_tactic_sources, tactic_source_mask, version_tuple
from qdiff.engines.graph_types import GraphTypes, graph_types
from qdiff.engines.manifest import ENGINE_FILE, ENGINE_KIND, current_platform
from qdiff.engines.precision import FLOAT_LAYER_PRECISIONS
from qdiff.engines.profiles import Profile, ShapeRange, check_shapes, profile_to_json
from qdiff.core.artifacts import CachedStage, Manifest, folder_lock, read_manifest, sha256_file, write_bytes_atomic, write_json_atomic
from qdiff.core.errors import EngineBuildError, OnnxModelError
from qdiff.core.progress import log, quiet

PRECISIONS = ("fp32", "fp16", "int8", "w4a8", "int4-weight-only")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class BuildSettings:
    precision: str = "fp16"
    profile: Profile = field(default_factory=dict)
    workspace_gib: float | None = None
    optimization_level: int | None = None  # TensorRT's default (3) when None
    tactic_sources: str | None = None  # comma-separated names; None: QDIFF_TRT_TACTIC_SOURCES or TensorRT's default
    strongly_typed: bool = False  # ask for it explicitly; on TensorRT >= 10 every build is strongly typed anyway
    timing_cache: Path | None = None  # a cache file to load and merge into; None: no cache
    float_layers: str | None = None  # "fp16": pin the float layers of a Q/DQ network (engines.precision; TensorRT < 10 only)
    verbose: bool = False

    def __post_init__(self) -> None:
        # Checked here, before TensorRT is imported, so a typo fails in a second, not after a parse.
        if self.float_layers is not None:
            if self.float_layers not in FLOAT_LAYER_PRECISIONS:
                raise EngineBuildError(f"float layers in {self.float_layers!r} are not supported", hint=f"use one of {', '.join(FLOAT_LAYER_PRECISIONS)}, or leave them to TensorRT")
            if self.strongly_typed:
                raise EngineBuildError("--float-layers applies to TensorRT < 10 only (weakly typed networks); a strongly typed network takes its precisions from the graph", hint="drop one of the two")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise EngineBuildError(f"builder optimization level {self.optimization_level} is outside 0..5")

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "profile": profile_to_json(self.profile),
            "workspace_gib": self.workspace_gib,
            "optimization_level": self.optimization_level,
            "tactic_sources": list(parse_tactic_sources(self.tactic_sources) or []) or "default",
            "strongly_typed": self.strongly_typed,
            "float_layers": self.float_layers,
        }


@dataclass
class BuildResult:
    engine_path: Path
    manifest: Manifest
    reused: bool = False


@dataclass(frozen=True)
class GraphFacts:
    """What the builder needs to know about the graph before TensorRT sees it."""

    qdq_nodes: int
    int4_dq_nodes: int
    opset: int
    weight_bits: int | None  # from the Q/DQ graph's manifest, when it has one
    unet_config: dict[str, Any] | None
    float16_inputs: bool = False  # any FP16 graph input (an FP16 export)
    types: GraphTypes = field(default_factory=GraphTypes)  # float types of initializers and values
    fp16_scale_qdq: tuple[tuple[str, str], ...] = ()  # (node, scale) of Q/DQ nodes whose scale is FLOAT16


def graph_facts(onnx_path: Path) -> GraphFacts:
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        raise OnnxModelError(f"{onnx_path}: not a readable ONNX model ({exc})") from exc
    qdq = sum(1 for n in model.graph.node if n.op_type in QDQ_OPS)
    int4 = 0
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input and n.input[0] in inits:
            if inits[n.input[0]].data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
                int4 += 1
    from qdiff.export.onnx_io import default_opset

    opset = default_opset(model)
    manifest = read_manifest(onnx_path)
    details = manifest.details if manifest is not None else {}
    bits = details.get("weight_bits")
    fp16_in = any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in model.graph.input)
    return GraphFacts(qdq, int4, opset, int(bits) if isinstance(bits, int) else None, manifest.unet_config if manifest is not None else None, fp16_in, graph_types(model), fp16_scale_qdq(model))


def fp16_scale_qdq(model: Any) -> tuple[tuple[str, str], ...]:
    """(node name, scale name) of every Q/DQ node whose scale is a FLOAT16 initializer or Constant."""
    import onnx

    fp16 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    fp16 |= {o for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value" and a.t.data_type == onnx.TensorProto.FLOAT16 for o in n.output}
    return tuple((n.name or f"#{i} {n.op_type}", n.input[1]) for i, n in enumerate(model.graph.node) if n.op_type in QDQ_OPS and len(n.input) > 1 and n.input[1] in fp16)


def check_parser_reads_scales(facts: GraphFacts, onnx_path: Path, major: int) -> None:
    """TensorRT < 10's ONNX parser reads every constant Q/DQ scale as float32 whatever its ONNX
    type (onnx-tensorrt 8.6, QuantDequantLinearHelper; 10.x checks the type). FP16 scales are
    misread: where the garbage is <= 0 it stops with "Scale coefficients must all be positive"
    (SD 1.5 on the H200, 2026-12-02, node 1510), and where it happens to be positive the engine
    would quantize with wrong scales and no error. Refuse such a graph before parsing."""
    if major >= 10 or not facts.fp16_scale_qdq:
        return
    node, scale = facts.fp16_scale_qdq[0]
    raise EngineBuildError(
        f"{onnx_path.name} has {len(facts.fp16_scale_qdq)} Q/DQ nodes with FLOAT16 scales (first: node {node!r}, scale {scale!r}); "
        f"TensorRT {major}.x's ONNX parser reads Q/DQ scales as float32, so it would misread them (refused, or worse, an engine with wrong scales)",
        hint="on TensorRT 8.6 build the FP32 Q/DQ graph (`qdiff quantize GRAPH.onnx --calib TABLE`, without --dtype fp16); FP16 Q/DQ graphs are for TensorRT >= 10",
    )


def check_strongly_typed(facts: GraphFacts, onnx_path: Path, precision: str = "fp16") -> None:
    """A strongly typed network runs each layer in the graph's own type (no FP16 flag applies),
    so from an FP32 graph it builds an FP32 engine: slower than the FP16 build asked for, and
    TensorRT says nothing. Refuse it, naming the float32 tensors found and the command that
    makes the FP16 graph. `--precision fp32` from an FP32 graph is what it says and passes."""
    if precision == "fp32" or not facts.types.is_fp32_graph:
        return
    quantized = facts.qdq_nodes > 0 or facts.int4_dq_nodes > 0
    remake = (
        "re-quantize it as an FP16 Q/DQ graph (`qdiff quantize FP16_GRAPH.onnx --calib TABLE --dtype fp16`, from `qdiff export MODEL -o OUT --dtype fp16`)"
        if quantized
        else "export an FP16 graph (`qdiff export MODEL -o OUT --dtype fp16`)"
    )
    raise EngineBuildError(
        f"{onnx_path.name} is an FP32 graph ({facts.types.float32_summary()}): a strongly typed network (TensorRT >= 10) runs every float layer in the graph's own type, so this {precision} engine would run in FP32",
        hint=f"{remake} and build that; or build this graph with TensorRT 8.6 (weakly typed: its float parts run in FP16), or ask for --precision fp32",
    )


def check_precision(precision: str, facts: GraphFacts, onnx_path: Path) -> str:
    """Return the manifest's label for the weights, or fail when graph and precision disagree."""
    if precision not in PRECISIONS:
        raise EngineBuildError(f"unknown precision {precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}")
    name = onnx_path.name
    if precision in ("fp32", "fp16"):
        if facts.qdq_nodes:
            raise EngineBuildError(
                f"{name} has {facts.qdq_nodes} QuantizeLinear/DequantizeLinear nodes, so TensorRT would build it in INT8, not {precision}",
                hint="build the float graph (the `qdiff export` output) for fp16/fp32, or use --precision int8 for this one",
            )
        return f"{precision.upper()} weights"
    if precision == "int4-weight-only":
        if not facts.int4_dq_nodes:
            raise EngineBuildError(f"{name} has no INT4 DequantizeLinear weights", hint="make one with `qdiff quantize --int4-weight-only` (opset 21)")
        return "INT4 block-quantized MatMul/Gemm weights (weight-only), activations FP16"
    if facts.int4_dq_nodes:
        raise EngineBuildError(
            f"{name} holds INT4 weight-only weights ({facts.int4_dq_nodes} INT4 DequantizeLinear), not {precision}",
            hint="use --precision int4-weight-only for this graph",
        )
    if not facts.qdq_nodes:
        raise EngineBuildError(
            f"{name} has no Q/DQ nodes; qdiff builds INT8 engines only from explicitly quantized graphs",
            hint="run `qdiff quantize` (or `qdiff run`) first and build its .w8a8.onnx / .w4a8.onnx output",
        )
    if precision == "int8" and facts.weight_bits == 4:
        raise EngineBuildError(f"{name} holds W4A8 weights (INT4 values in INT8 storage)", hint="use --precision w4a8 so the engine is labelled for what it holds")
    if precision == "w4a8" and facts.weight_bits not in (4, None):
        raise EngineBuildError(f"{name} holds {facts.weight_bits}-bit weights, not W4A8", hint="use --precision int8, or quantize with --recipe w4a8")
    if precision == "w4a8":
        return "INT4-valued weights stored as INT8 (W4A8: TensorRT runs INT8 kernels), INT8 activations"
    return "INT8 per-output-channel weights, INT8 activations"


class _Heartbeat:
    """A console line that shows a build is alive: TensorRT 8.6 gives no progress callback."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeat:
        if not quiet():
            from qdiff.core.progress import progress

            def tick() -> None:
                # On a terminal the line ticks every second; in a log file, every minute.
                interval = 1.0 if sys.stderr.isatty() else 60.0
                with progress(total=None, desc=self.desc, unit="s", bar_format="{desc}: {elapsed}", mininterval=interval) as bar:
                    while not self._stop.wait(1.0):
                        bar.update(1)

            self._thread = threading.Thread(target=tick, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _progress_monitor(trt: Any) -> Any:
    """TensorRT >= 10: report build phases on the console."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if not quiet():
                log(f"build: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


@dataclass
class ParsedNetwork:
    """A TensorRT network parsed from an ONNX file, with the objects that must outlive it."""

    network: Any
    parser: Any  # the network's weights live in the parser: keep it alive until the build ends
    inputs: dict[str, tuple[int, ...]]
    typing: str  # "strong" or "weak"


def parse_network(trt: Any, builder: Any, logger: Any, onnx_path: Path, typing: str) -> ParsedNetwork:
    """Parse `onnx_path` into a strongly or weakly typed network (`compat.network_flags`)."""
    network = builder.create_network(network_flags(trt, typing))
    parser = trt.OnnxParser(network, logger)
    # By path, so external weight files next to the graph resolve. (With the 8.6 libraries
    # qdiff is tested on, `parser.set_flag` crashes, so no parser flags are set.)
    if not parser.parse_from_file(str(onnx_path)):
        lines = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node = err.node() if hasattr(err, "node") else -1
            node_name = err.node_name() if hasattr(err, "node_name") else ""
            where = f"node {node_name or node}" if node != -1 or node_name else "graph"
            lines.append(f"{where}: {err.desc()}")
        hint = "check the graph with `python -m onnx.checker`"
        if typing == "weak":
            hint += "; TensorRT 8.6's parser takes opset <= 17 and reads Q/DQ scales as float32 (on 8.6 build the FP32 Q/DQ graph)"
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: " + "; ".join(lines or ["no detail given"]), hint=hint)
    return ParsedNetwork(network, parser, _network_inputs(network), typing)


def _network_inputs(network: Any) -> dict[str, tuple[int, ...]]:
    return {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    data = b""
    if path is not None and path.exists():
        try:
            data = path.read_bytes()
        except OSError as exc:
            log(f"build: timing cache {path} unreadable ({exc}); starting an empty one")
    cache = config.create_timing_cache(data)
    if cache is None and data:  # a corrupt or foreign cache: TensorRT refuses it, we start over
        log(f"build: timing cache {path} was refused by TensorRT; starting an empty one")
        cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config: Any, cache: Any, path: Path) -> None:
    """Merge with whatever another build wrote meanwhile, then replace the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path.parent):
        if path.exists():
            try:
                other = config.create_timing_cache(path.read_bytes())
                if other is not None:
                    cache.combine(other, ignore_mismatch=True)
            except OSError:
                pass
        write_bytes_atomic(path, bytes(cache.serialize()))


def layer_information(trt: Any, engine: Any, profile: Profile) -> dict[str, Any]:
    """The engine inspector's JSON, with shapes set to the profile's opt so formats resolve."""
    context = engine.create_execution_context()
    for name, rng in profile.items():
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            context.set_input_shape(name, rng.opt)
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    # TensorRT puts raw control characters (newlines in layer names) inside JSON strings.
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON), strict=False)


@dataclass
class Configured:
    """A builder config ready to build, and what `configure` decided on the way."""

    config: Any
    timing_cache: Any
    timing_cache_path: Path | None
    optimization_level: int | None  # what the builder was given (None: TensorRT's default)
    tactic_sources_dropped: tuple[str, ...] = ()  # asked for, but this TensorRT has no such source
    pinned: Any = None  # precision.PinReport when --float-layers pinned layers


def default_optimization_level(settings: BuildSettings, typing: str) -> int | None:
    """The level to build at when none is given: INT8_OPT_LEVEL_STRONG for INT8/W4A8 on the
    strongly typed path (unmeasured on TensorRT >= 10 here: see compat), else TensorRT's own."""
    if settings.optimization_level is not None:
        return settings.optimization_level
    if typing == "strong" and settings.precision in ("int8", "w4a8"):
        return INT8_OPT_LEVEL_STRONG
    return None


def configure(trt: Any, builder: Any, parsed: ParsedNetwork, settings: BuildSettings, feats: Features) -> Configured:
    """The builder config for `parsed`: memory, optimization level, precision flags (weakly typed
    path only), float-layer pinning (TensorRT < 10 only), tactic sources (those this version has),
    profiling verbosity, progress monitor, the optimization profile and the timing cache."""
    config = builder.create_builder_config()
    if settings.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * (1 << 30)))
    level = default_optimization_level(settings, parsed.typing)
    if level is not None:
        feats.require("optimization_level", "set the builder optimization level")
        config.builder_optimization_level = level
    pinned = None
    if parsed.typing == "weak":
        # Deprecated in 10, gone in 11: only ever set on 8.6's weakly typed networks.
        if settings.precision in ("fp16", "int8", "w4a8", "int4-weight-only"):
            config.set_flag(trt.BuilderFlag.FP16)
        if settings.precision in ("int8", "w4a8"):
            config.set_flag(trt.BuilderFlag.INT8)
        if settings.float_layers == "fp16":
            from qdiff.engines.precision import pin_float_layers

            pinned = pin_float_layers(trt, parsed.network, config)
            log("build: " + pinned.summary())
    elif settings.float_layers is not None:
        raise EngineBuildError(
            f"--float-layers applies to TensorRT < 10 only; TensorRT {feats.version} builds strongly typed networks, whose precisions come from the graph",
            hint="drop --float-layers and build an FP16 graph (`qdiff export --dtype fp16`, `qdiff quantize --dtype fp16`)",
        )
    dropped: tuple[str, ...] = ()
    tactic_names = parse_tactic_sources(settings.tactic_sources)
    if tactic_names is not None:
        mask, dropped = tactic_source_mask(trt, tactic_names)
        if dropped:
            log(f"build: TensorRT {feats.version} has no tactic source {', '.join(dropped)}; using {', '.join(n for n in tactic_names if n not in dropped)}")
        config.set_tactic_sources(mask)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if feats.progress_monitor:
        config.progress_monitor = _progress_monitor(trt)
    profile = builder.create_optimization_profile()
    for name, rng in settings.profile.items():
        profile.set_shape(name, rng.min, rng.opt, rng.max)
    config.add_optimization_profile(profile)
    # Opt-in: with TensorRT 8.6, a cache holding another graph's Myelin entries made builds fail
    # ("myelinCache deserializeFromBuffer", then "could not find any implementation").
    cache_path = None if settings.timing_cache in (None, Path("")) else settings.timing_cache
    cache = _load_timing_cache(config, cache_path)
    return Configured(config, cache, cache_path, level, dropped, pinned)


def out_of_memory_hint(settings: BuildSettings) -> str:
    """What to do when TensorRT ran out of GPU memory while timing tactics: the profile's
    largest shape decides how much the engine needs, and any other process on the GPU takes
    from it."""
    largest = ", ".join(f"{name} {'x'.join(map(str, rng.max))}" for name, rng in settings.profile.items())
    return (
        f"TensorRT ran out of GPU memory while timing tactics at the profile's largest shape ({largest}); "
        "end other work on this GPU (nvidia-smi lists it), or give the profile a smaller largest shape "
        "(qdiff build: --batch / --size / --shape), or cap the builder's workspace (--workspace-gib)"
    )


def build_plan(builder: Any, parsed: ParsedNetwork, configured: Configured, logger: Any, settings: BuildSettings, *, tensorrt: str = "?") -> tuple[bytes, float]:
    """Build the serialized plan; returns it and the build's wall seconds. Merges the timing cache
    back into its file when one was given."""
    started = time.perf_counter()
    with _Heartbeat(f"building {settings.precision} engine"):
        serialized = builder.build_serialized_network(parsed.network, configured.config)
    seconds = time.perf_counter() - started
    if serialized is None:
        detail = "; ".join(logger.errors[-5:]) or "TensorRT gave no reason"
        hint = "rerun with --verbose for TensorRT's log"
        if any("OutOfMemory" in e for e in logger.errors):  # all of them: the "could not find" lines that follow can push it out of the last five
            # Seen on the H200 with TensorRT 8.6: SD 1.5's INT8 engine (131 GiB of activations at
            # batch 8 x 128x128) beside torch work on the same GPU; the "could not find any
            # implementation" that follows is the tactics that did not fit, not a missing kernel.
            hint = out_of_memory_hint(settings)
        elif configured.pinned is not None and "Could not find any implementation" in detail:
            # Seen on the H200 with TensorRT 8.6 (cuBLAS/cuDNN tactics off): the GroupNorm+SiLU
            # fused blocks have no FP16 kernel once pinned (docs/int8-engines.md).
            hint = f"TensorRT {tensorrt} has no FP16 kernel for a fused block under --float-layers fp16; build without --float-layers"
        elif "convertMyelinWeightsToFp32" in detail:
            # Seen on the H200 with TensorRT 8.6: SD 1.5's FP16 graph with FP32 Q/DQ islands
            # (`quantize --dtype fp16 --opset 17`): Myelin, which compiles the attention blocks,
            # asserts on the INT8 weights it finds there (docs/int8-engines.md).
            hint = f"TensorRT {tensorrt}'s Myelin cannot take INT8 weights inside an FP16 graph's attention blocks; on 8.6 build the FP32 Q/DQ graph (`qdiff quantize` without --dtype fp16)"
        raise EngineBuildError(f"TensorRT failed to build ({settings.precision}): {detail}", hint=hint)
    if configured.timing_cache_path is not None:
        _save_timing_cache(configured.config, configured.timing_cache, configured.timing_cache_path)
    return bytes(serialized), seconds


def publish(trt: Any, logger: Any, plan: bytes, out_dir: Path, manifest: Manifest, profile: Profile) -> Any:
    """Write plan, manifest (with the plan's sha256 and activation memory) and the inspector JSON
    into `out_dir`, each atomically, the plan and manifest first (a build takes minutes, the
    inspector is a report). Returns the deserialized engine."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineBuildError("TensorRT built the plan but cannot load it: " + "; ".join(logger.errors[-3:]), hint="rerun with --verbose for TensorRT's log")
    target = out_dir / ENGINE_FILE
    out_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(out_dir):
        (out_dir / "layers.json").unlink(missing_ok=True)  # it described the previous plan
        write_bytes_atomic(target, plan)
        io = {engine.get_tensor_name(i): str(engine.get_tensor_dtype(engine.get_tensor_name(i))) for i in range(engine.num_io_tensors)}
        CachedStage(target, manifest).record({"plan_bytes": len(plan), "device_memory_bytes": device_memory_bytes(engine), "io": io})
        try:
            write_json_atomic(out_dir / "layers.json", layer_information(trt, engine, profile))
        except Exception as exc:  # noqa: BLE001  (a report must not cost the engine)
            log(f"build: the engine inspector failed ({type(exc).__name__}: {exc}); `qdiff inspect` will retry on a GPU")
    return engine


def build_engine(onnx_path: str | Path, out_dir: str | Path, settings: BuildSettings, *, force: bool = False) -> BuildResult:
    """Build `out_dir/engine.plan` (+ manifest, inspector JSON) from `onnx_path`:
    checks, then parse_network -> configure -> build_plan -> publish."""
    trt = import_tensorrt()
    feats: Features = features(trt)
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.exists():
        raise OnnxModelError(f"no ONNX file at {onnx_path}")
    facts = graph_facts(onnx_path)
    weights_label = check_precision(settings.precision, facts, onnx_path)
    if settings.precision == "int4-weight-only":
        feats.require("int4", "build INT4 weight-only engines")
    if settings.strongly_typed:
        feats.require("strongly_typed", "build strongly typed networks")
    check_parser_reads_scales(facts, onnx_path, feats.major)
    typing = feats.typing
    if typing == "strong":
        check_strongly_typed(facts, onnx_path, settings.precision)
    if typing == "strong" and settings.float_layers is not None:  # before minutes of parsing
        raise EngineBuildError(
            f"--float-layers applies to TensorRT < 10 only; TensorRT {feats.version} builds strongly typed networks, whose precisions come from the graph",
            hint="drop --float-layers and build an FP16 graph (`qdiff export --dtype fp16`, `qdiff quantize --dtype fp16`)",
        )
    platform = current_platform()
    target = out_dir / ENGINE_FILE
    wanted = Manifest(
        kind=ENGINE_KIND,
        inputs={"onnx_sha256": sha256_file(onnx_path), **platform.to_inputs()},
        settings=settings.to_json(),
    )
    if (have := CachedStage(target, wanted, log_as="build", why="same graph, settings, TensorRT and GPU").reusable(force)) is not None:
        return BuildResult(target, have, reused=True)

    logger = make_logger(trt, settings.verbose)
    builder = trt.Builder(logger)
    parsed = parse_network(trt, builder, logger, onnx_path, typing)
    _check_profile(parsed.inputs, settings.profile, onnx_path)
    configured = configure(trt, builder, parsed, settings, feats)
    log(f"build: {onnx_path.name} -> {target} ({settings.precision}, {typing}ly typed, TensorRT {platform.tensorrt}, {platform.gpu})")
    try:
        plan, seconds = build_plan(builder, parsed, configured, logger, settings, tensorrt=platform.tensorrt)
    except EngineBuildError as exc:
        raise EngineBuildError(f"{onnx_path.name}: {exc.message}", hint=exc.hint) from exc

    wanted.details = {
        "onnx_path": str(onnx_path),
        "weights": weights_label,
        "typing": typing,
        "tensorrt": platform.tensorrt,
        "optimization_level": configured.optimization_level,
        "tactic_sources_dropped": list(configured.tactic_sources_dropped),
        "build_seconds": round(seconds, 1),
        "timing_cache": str(configured.timing_cache_path) if configured.timing_cache_path else None,
        "graph_fp32_weight_share": round(facts.types.fp32_weight_share, 4),
        "unet_config": facts.unet_config,
        "trt_warnings": len(logger.warnings),
    }
    if configured.pinned is not None:
        pinned = configured.pinned
        wanted.details["float_layers_pinned"] = {"pinned": pinned.pinned, "fp16_outputs": pinned.output_types_set, "left_to_tensorrt": dict(pinned.skipped)}
    wanted.versions = {**wanted.versions, "tensorrt": platform.tensorrt}
    publish(trt, logger, plan, out_dir, wanted, settings.profile)
    activations = wanted.details["device_memory_bytes"]
    log(f"build: {settings.precision} engine ({typing}ly typed) in {seconds:.0f} s, {len(plan) / 2**20:.0f} MiB plan, {activations / 2**20:.0f} MiB activations -> {target}")
    if settings.precision in ("int8", "w4a8") and typing == "weak" and version_tuple(platform.tensorrt)[:1] < (10,):
        # Measured, not assumed: on TensorRT 8.6 every INT8 SD 1.5 engine was slower than FP16.
        log("build: note: with TensorRT < 10, INT8 UNet engines with attention ran slower than FP16 on the H200 (docs/int8-engines.md); time both with `qdiff inspect --profile` before deploying")
    return BuildResult(target, wanted)


def _check_profile(inputs: dict[str, tuple[int, ...]], profile: Profile, onnx_path: Path) -> None:
    """Every network input has a profile range, every range names an input, and the graph's
    static dims agree with the profile at min, opt and max."""
    missing = [n for n in inputs if n not in profile]
    if missing:
        raise EngineBuildError(f"no profile shapes for input(s) {', '.join(missing)} of {onnx_path.name}", hint="give --batch/--size/--tokens or --shape NAME=MIN:OPT:MAX")
    for name, rng in profile.items():
        if name not in inputs:
            raise EngineBuildError(f"the profile names input {name!r}, which {onnx_path.name} does not have", hint=f"its inputs are {', '.join(inputs)}")
        for label, shape in (("min", rng.min), ("opt", rng.opt), ("max", rng.max)):
            check_shapes({name: _static_range(inputs[name])}, {name: shape}, where=f"{onnx_path.name} (profile {label})")


def _static_range(dims: tuple[int, ...]) -> ShapeRange:
    """A ShapeRange that accepts any value in dynamic (-1) dims and only the value in static ones."""
    big = 1 << 30
    lo = tuple(1 if d < 0 else d for d in dims)
    hi = tuple(big if d < 0 else d for d in dims)
    return ShapeRange(lo, lo, hi)
