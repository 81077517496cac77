"""Simulated 4-bit block quantization of PyTorch weights, matching ONNX Runtime's MatMulNBits.

CALR correctives can then be trained against the primary path as the int4 graph will compute it, so
they recover quantization error as well as truncation error. The graph writer later quantizes the
same weights again; with the scheme below that is exact (a quantized block re-quantizes to itself),
provided the blocks line up, which is why int4 ranks are multiples of the block size.
"""

from __future__ import annotations

import torch
from torch import nn


def fake_quantize_int4(weight: torch.Tensor, block_size: int = 32) -> torch.Tensor:
    """Quantize-dequantize an nn.Linear weight (out x in) the way MatMulNBits stores B = W^T.

    Blocks of `block_size` run along `in` (MatMulNBits' K), zero-padded at the end. Symmetric, as
    ONNX Runtime's blockwise quantizer: the block's largest-magnitude value v maps to -8 (scale
    v / -8), the others round to the nearest of -8..7.
    """
    out_features, in_features = weight.shape
    pad = (-in_features) % block_size
    w = nn.functional.pad(weight.detach().float(), (0, pad)).view(out_features, -1, block_size)
    index = w.abs().argmax(dim=-1, keepdim=True)
    scale = w.gather(-1, index) / -8.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / safe), -8, 7)
    return (q * scale).view(out_features, -1)[:, :in_features].to(weight.dtype)


@torch.no_grad()
def fake_quantize_linears(modules: list[nn.Linear], block_size: int = 32) -> None:
    for module in modules:
        module.weight.copy_(fake_quantize_int4(module.weight, block_size))
