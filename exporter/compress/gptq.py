"""GPTQ (Frantar et al., 2022) on the exporter's own input Gram matrices.

Columns of W (out x in) are rounded one at a time, left to right; the error each rounding makes is
spread over the columns not yet rounded with the inverse Hessian of the layer's output error, H = X^T X
(the Gram the calibration pass accumulates), so the output W X moves as little as the grid allows.
Grids (exporter.compress.grid) are fitted per block when the block's first column is reached, on the
block's values as updated by then, with the same clipping search as round-to-nearest. With H = I the
updates vanish and GPTQ is round-to-nearest. The column loop runs on the compute device
(exporter.compress.compute); each block's grid is fitted on the host (exporter.compress.grid), once per block.
"""

from __future__ import annotations

import numpy as np
import torch

from exporter.compress import compute
from exporter.compress.grid import GridWeights, QuantFormat, block_codes, fit_blocks

DAMPING = 0.01  # of the mean diagonal, added to H: keeps the Cholesky factorization defined
LAZY_COLUMNS = 128  # columns updated in-block before one batched update of the rest (a multiple of block sizes)


def _inverse_hessian_factor(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of H^-1, dead columns): columns no input ever reached get H_ii = 1."""
    h = gram.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * damping * torch.diagonal(h).mean()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True), dead


@torch.no_grad()
def gptq(weight: torch.Tensor, gram: torch.Tensor, fmt: QuantFormat, clip: bool = False,
         damping: float = DAMPING) -> GridWeights:
    """The grid of `weight` (out x in) minimizing ||(W - Q) X|| greedily, with X^T X = `gram` (in x in)."""
    out_features, in_features = weight.shape
    block = fmt.block_size
    padded = in_features + (-in_features) % block
    device = compute.current()
    hinv, dead = _inverse_hessian_factor(gram.to(device), damping)
    hinv = hinv.float()
    w = torch.zeros(out_features, padded, device=device)
    w[:, :in_features] = weight.detach().to(device).float()
    w[:, :in_features][:, dead] = 0
    codes = torch.zeros((out_features, padded), dtype=torch.uint8, device=device)
    scales = np.zeros((out_features, padded // block), dtype=np.float32)
    zeros = np.zeros((out_features, padded // block), dtype=fmt.zero_dtype)
    lazy = max(block, LAZY_COLUMNS // block * block)
    for start in range(0, in_features, lazy):
        stop = min(start + lazy, in_features)
        chunk = w[:, start:stop].clone()
        errors = torch.zeros_like(chunk)
        for i in range(stop - start):
            column = start + i
            if column % block == 0:  # fit this block's grid on its current values (padding included)
                j = column // block
                values = w[:, column : column + block].clone()
                width = min(block, stop - column)
                values[:, :width] = chunk[:, i : i + width]
                if fmt.float_zero and column + block > in_features:  # padding outside a min-max grid's range
                    values[:, in_features - column :] = values[:, in_features - column - 1 : in_features - column]
                _, s, z = fit_blocks(values.cpu().numpy()[:, None, :], fmt, clip)
                scales[:, j], zeros[:, j] = s[:, 0], z[:, 0]
                s_t = torch.from_numpy(scales[:, j]).to(device)
                z_t = torch.from_numpy(zeros[:, j]).float().to(device)
                safe = torch.where(s_t == 0, 1.0, s_t)
            x = chunk[:, i]
            q = torch.clamp(torch.round(x / safe + z_t), 0, fmt.levels - 1)  # grid.block_codes, in torch
            codes[:, column] = q.to(torch.uint8)
            dequantized = (q - z_t) * s_t
            error = (x - dequantized) / hinv[column, column]
            chunk[:, i:] -= error[:, None] * hinv[column, column : stop][None, :]
            errors[:, i] = error
        w[:, stop:in_features] -= errors @ hinv[start:stop, stop:in_features]
    codes = codes.cpu().numpy()
    if padded > in_features:  # padding columns hold 0: their code is the block's zero point
        for j in range(in_features // block, padded // block):
            first = max(in_features, j * block)
            codes[:, first : (j + 1) * block] = block_codes(np.zeros((out_features, 1), np.float32),
                                                            scales[:, j], zeros[:, j], fmt)
    return GridWeights(fmt, codes, scales, zeros, in_features)
