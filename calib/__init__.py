"""Calibration: recipes, timestep-uniform activation statistics, the calibration table, and the
PyTorch fake-quant reference model that the ONNX Q/DQ graph must agree with."""
