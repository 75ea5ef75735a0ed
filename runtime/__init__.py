"""Runtime: denoiser backends (PyTorch, ONNX Runtime, TensorRT) behind one call signature, and
the sampling loop over diffusers schedulers that drives any of them."""
