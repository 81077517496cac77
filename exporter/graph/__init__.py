"""The ONNX graph: the fused decoder writer, rank levels and their schedule, the optimum fallback, genai_config.json, the ORT format."""
