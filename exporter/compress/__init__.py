"""Compression in PyTorch: calibration Grams, whitened SVD, Fisher importance, rank allocation, CALR correctives, simulated quantization."""
