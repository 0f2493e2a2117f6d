"""Inference layer: model bundles (card + ONNX model), preprocessing and the ONNX runner."""
