"""Checkpoint -> one self-describing ONNX model file (docs/model-format.md), checked against PyTorch."""

# Largest error accepted, |onnx - torch| / max(1, |torch|), on logits and state (see parity.py). float32
# recurrences drift ~1e-6 over a few hundred steps; a wrong gate order or activation is off by 1e-1
# or more. Here, free of torch, so that charrnn-export's parser needs none.
DEFAULT_TOLERANCE = 1e-4
