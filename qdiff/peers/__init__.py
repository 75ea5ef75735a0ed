"""Other quantizers run on qdiff's own inputs, so qdiff's results can be read against theirs.

A peer takes the same exported FP32 graph and the same calibration denoiser calls that
`qdiff.calibrate` observes (`qdiff.calib.trajectories`), quantizes with its own tool and
calibrators, and writes a Q/DQ graph that qdiff's backends and reports run unchanged. Only the
quantizer differs, so a gap in quality is the quantizer's.
"""

from qdiff.peers.modelopt_int8 import ModelOptInt8Settings, quantize_with_modelopt  # imports modelopt only when called
from qdiff.peers.onnxruntime_static import ORT_METHODS, PeerResult, quantize_with_onnxruntime

__all__ = ["ORT_METHODS", "ModelOptInt8Settings", "PeerResult", "quantize_with_modelopt", "quantize_with_onnxruntime"]
