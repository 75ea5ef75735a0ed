"""TensorRT engines built from qdiff's ONNX graphs (FP16, or INT8/W4A8 from the Q/DQ graph).

- `compat`: the one place that imports TensorRT (lazily, so `import qdiff` works without it)
  and says which features the running version has.
- `profiles`: optimization-profile shapes, derived from the graph's inputs or given by hand,
  and the check that names the dimension a call would put out of range.
- `manifest`: what an engine was built from and for (graph, TensorRT, GPU), checked on load.
- `builder`: ONNX -> serialized engine with the TensorRT Python API.
- `inspector`: per-layer precision and timing, read from TensorRT's engine inspector and
  profiler, with INT8 coverage by MACs.
"""
