"""Where a model comes from: local Hugging Face directories and GGUF files, their tokenizer, and calibration text."""
