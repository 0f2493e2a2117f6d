"""Converters: tf2onnx export with a TF-vs-ONNX parity check that writes model bundles."""
