"""Generation and evaluation over ONNX Runtime: numpy and onnxruntime only (no torch).

`from exporter.runtime import Runtime` is the library entry point for apps and services written in Python."""

from exporter.runtime.generation import OrtDecoder, Runtime, level_at

__all__ = ["OrtDecoder", "Runtime", "level_at"]
