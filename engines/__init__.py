"""TensorRT engines built from the Q/DQ graph. Not built yet: the TensorRT issue adds the
builder, the engine manifest and the inspector here. TensorRT is always imported lazily, so
`import qdiff` works on machines without it."""
