"""Weight formats and the activation types each is written with: the one table the graph writer, the cost model
and the export's option checks read. Torch-free."""

from __future__ import annotations

# The activation (and KV cache, logits) types each weight format can be written with; the first is the default.
ACTIVATIONS = {"fp32": ("fp32",), "fp16": ("fp16",), "int8": ("fp32",), "int4": ("fp32", "fp16")}
WEIGHT_FORMATS = tuple(ACTIVATIONS)
# Formats stored as block grids (MatMulNBits, the embedding gathered from blocks): their bits per code. int8 is
# weight-only like int4 (per-block scales, not quantize_dynamic's per-tensor activations: 26.25 against 40.07
# perplexity on SmolLM2, benchmarks/RESULTS.md).
GRID_BITS = {"int4": 4, "int8": 8}


def check_activations(weights: str, activations: str | None) -> str:
    """`activations` for `weights` (None: the default, ACTIVATIONS' first); ValueError for a pair not written."""
    if weights not in ACTIVATIONS:
        raise ValueError(f"unknown weights {weights!r}; expected one of {WEIGHT_FORMATS}")
    allowed = ACTIVATIONS[weights]
    if activations is None:
        return allowed[0]
    if activations not in allowed:
        raise ValueError(f"{weights} weights are written with {' or '.join(allowed)} activations, not {activations}")
    return activations
