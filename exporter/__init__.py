"""Checkpoint -> one self-describing ONNX model file (docs/model-format.md), checked against PyTorch."""
