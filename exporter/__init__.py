"""exporter: compress small causal LMs for edge devices and export them to ONNX with a KV cache."""

__version__ = "0.1.0"
