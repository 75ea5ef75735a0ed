"""Export: torch -> ONNX with validation, and the ONNX graph passes (Q/DQ insertion)."""
