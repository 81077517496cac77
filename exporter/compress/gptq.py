"""GPTQ (Frantar et al., 2022) on the exporter's own input Gram matrices.

Columns of W (out x in) are rounded one at a time; the error each rounding makes is spread over the columns
not yet rounded with the inverse Hessian of the layer's output error, H = X^T X (the Gram the calibration pass
accumulates), so the output W X moves as little as the grid allows. By default the columns go in decreasing
order of H_ii (the inputs that carry the most energy first, "act order"), on block grids (exporter.compress.grid)
fitted up front on the unchanged weights ("static groups"), so MatMulNBits' contiguous blocks are kept; a grid's
range search (2-bit grids', or `clip`) weighs each column's error by H_ii.
`act_order=False` is the original order: left to right, each block's grid fitted when its first column is
reached, on its values as updated by then. Both fit as round-to-nearest does, the range search weighted; with
H = I the updates vanish and GPTQ is round-to-nearest. The column loop runs on the compute device
(exporter.compress.compute); each block's grid is fitted on the host (exporter.compress.grid), once per block.
"""

from __future__ import annotations

import numpy as np
import torch

from exporter.compress import compute
from exporter.compress.grid import GridWeights, QuantFormat, block_codes, blocked, fit_blocks, with_offsets

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
         damping: float = DAMPING, act_order: bool = True) -> GridWeights:
    """The grid of `weight` (out x in) minimizing ||(W - Q) X|| greedily, with X^T X = `gram` (in x in).
    `act_order`: columns in decreasing order of H_ii on grids fitted up front (measured better on SmolLM2:
    benchmarks/RESULTS.md); False: left to right, each block's grid fitted when the block is reached. An offset
    grid: the min-max grid's GPTQ, its zero points then split into integer codes and offsets (`with_offsets`)."""
    if fmt.offset:
        return with_offsets(gptq(weight, gram, fmt.minmax, clip, damping, act_order), fmt)
    if act_order:
        return gptq_shared([weight], gram, [fmt], clip, damping)[0]
    out_features, in_features = weight.shape
    block = fmt.block_size
    padded = in_features + (-in_features) % block
    device = compute.current()
    hinv, dead = _inverse_hessian_factor(gram.to(device), damping)
    w = torch.zeros(out_features, padded, device=device)
    w[:, :in_features] = weight.detach().to(device).float()
    w[:, :in_features][:, dead] = 0
    energy = _column_energy(torch.diagonal(gram), padded)
    codes = torch.zeros((out_features, padded), dtype=torch.uint8, device=device)
    scales = np.zeros((out_features, padded // block), dtype=np.float32)
    zeros = np.zeros((out_features, padded // block), dtype=fmt.zero_dtype)
    grid: tuple[torch.Tensor, ...] = ()

    def grid_of_column(column: int, chunk: torch.Tensor, i: int, stop: int) -> tuple[torch.Tensor, ...]:
        nonlocal grid
        if column % block == 0:  # fit this block's grid on its current values (padding included)
            j = column // block
            values = w[:, column : column + block].clone()
            width = min(block, stop - column)
            values[:, :width] = chunk[i : i + width].T
            if fmt.float_zero and column + block > in_features:  # padding outside a min-max grid's range
                values[:, in_features - column :] = values[:, in_features - column - 1 : in_features - column]
            _, s, z = fit_blocks(values.cpu().numpy()[:, None, :], fmt, clip, energy[column : column + block])
            scales[:, j], zeros[:, j] = s[:, 0], z[:, 0]
            s_t = torch.from_numpy(scales[:, j]).to(device)
            grid = (s_t, torch.from_numpy(zeros[:, j]).float().to(device), torch.where(s_t == 0, 1.0, s_t))
        return grid

    _round_columns(w, hinv.float(), in_features, max(block, LAZY_COLUMNS // block * block), fmt.levels - 1, codes,
                   grid_of_column)
    codes = codes.cpu().numpy()
    _pad_codes(codes, scales, zeros, in_features, fmt)
    return GridWeights(fmt, codes, scales, zeros, in_features)


def _column_energy(diagonal: torch.Tensor, padded: int) -> np.ndarray:
    """H_ii (`diagonal`) per input column, zeros for the padding: the weights of a grid's range search."""
    energy = np.zeros(padded, np.float32)
    energy[: diagonal.shape[0]] = diagonal.double().cpu().numpy()
    return energy


def _round_columns(w: torch.Tensor, hinv: torch.Tensor, in_features: int, lazy: int, top: float | torch.Tensor,
                   codes: torch.Tensor, grid_of_column) -> None:
    """GPTQ's column loop over w[:, :in_features] (read, not written), in lazy batches of `lazy` columns: each
    column is rounded on the grid `grid_of_column(column, chunk, i, stop)` gives (scale, zero point, scale safe to
    divide by, per row; chunk = the batch's current values, one row per column (columns x rows), i the column's
    index in it) and its error spread over the columns not yet rounded through `hinv`; the codes, at most `top`
    (one per row, or one for all), go to `codes[:, column]`. The loop runs on w transposed, so that each column's
    values and updates are contiguous (2.5-2.8x faster on the pricing's stacked rows than on w's own layout)."""
    top = torch.as_tensor(top, dtype=w.dtype, device=w.device)
    columns = w[:, :in_features].T.contiguous()
    rounded = torch.empty((in_features, w.shape[0]), dtype=codes.dtype, device=codes.device)
    for start in range(0, in_features, lazy):
        stop = min(start + lazy, in_features)
        chunk = columns[start:stop].clone()
        errors = torch.empty_like(chunk)
        for i in range(stop - start):
            column = start + i
            s, z, safe = grid_of_column(column, chunk, i, stop)
            x = chunk[i]
            q = torch.minimum(torch.round(x / safe + z).clamp_min(0), top)  # grid.block_codes, in torch
            rounded[column] = q.to(codes.dtype)
            error = (x - (q - z) * s) / hinv[column, column]
            chunk[i:].addr_(hinv[column, column:stop], error, alpha=-1)
            errors[i] = error
        columns[stop:] -= hinv[start:stop, stop:in_features].T @ errors
    codes[:, :in_features] = rounded.T


def _pad_codes(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, in_features: int, fmt: QuantFormat) -> None:
    """Padding columns beyond `in_features` hold 0: their code is the last block's zero point (in place)."""
    if codes.shape[1] > in_features:
        j = codes.shape[1] // fmt.block_size - 1
        codes[:, in_features:] = block_codes(np.zeros((codes.shape[0], 1), np.float32), scales[:, j], zeros[:, j],
                                             fmt)


@torch.no_grad()
def gptq_shared(weights: list[torch.Tensor], gram: torch.Tensor, formats: list[QuantFormat], clip: bool = False,
                damping: float = DAMPING) -> list[GridWeights]:
    """The act-order GPTQ grid (columns in decreasing order of H_ii, on grids fitted up front on the unchanged
    weights: "static groups", so the blocks stay contiguous as MatMulNBits reads them) of each of `weights`, all
    reading the input whose Gram is `gram`, each on its own format. GPTQ rounds every row on its own given H, so the
    weights' rows go through one column loop together: each gets the grid its own call would give, for one
    factorization of H^-1 and one loop (pricing a unit's whole menu: several times faster than a call per format)."""
    in_features = gram.shape[0]
    device = compute.current()
    diagonal = torch.diagonal(gram).double().cpu()  # H_ii: dead columns, the act order, the range search's weights
    dead = diagonal == 0
    perm = torch.argsort(diagonal, descending=True, stable=True)
    hinv, _ = _inverse_hessian_factor(gram.double().cpu()[perm][:, perm].to(device), damping)
    grid_formats = [fmt.minmax if fmt.offset else fmt for fmt in formats]  # an offset grid: its min-max grid's
    fitted, s_cols, z_cols, tops = [], [], [], []
    for weight, fmt in zip(weights, grid_formats):
        w0 = weight.detach().float().cpu().clone()
        w0[:, dead] = 0
        blocks = blocked(w0.numpy(), fmt.block_size, edge=fmt.float_zero)
        _, scales, zeros = fit_blocks(blocks, fmt, clip, _column_energy(diagonal, blocks.shape[1] * fmt.block_size))
        fitted.append((w0, scales, zeros))
        block_of = (torch.arange(in_features) // fmt.block_size)[perm]  # each permuted column's block
        s_cols.append(torch.from_numpy(scales)[:, block_of])
        z_cols.append(torch.from_numpy(zeros.astype(np.float32))[:, block_of])
        tops.append(torch.full((weight.shape[0],), float(fmt.levels - 1)))
    # every row's grid at each permuted column, contiguous per column: (column, row)
    s_col = torch.cat(s_cols).T.contiguous().to(device)
    z_col = torch.cat(z_cols).T.contiguous().to(device)
    safe_col = torch.where(s_col == 0, 1.0, s_col)
    del s_cols, z_cols
    top = torch.cat(tops).to(device)
    w = torch.cat([w0 for w0, _, _ in fitted]).to(device)[:, perm]
    permuted = torch.zeros(w.shape, dtype=torch.uint8, device=device)

    def grid_of_column(column, *_):
        return s_col[column], z_col[column], safe_col[column]

    _round_columns(w, hinv.float(), in_features, LAZY_COLUMNS, top, permuted, grid_of_column)
    permuted = permuted.cpu().numpy()
    found, start_row = [], 0
    for (w0, s, z), fmt, wanted in zip(fitted, grid_formats, formats):
        n = w0.shape[0]
        codes = np.zeros((n, in_features + (-in_features) % fmt.block_size), dtype=np.uint8)
        codes[:, perm.numpy()] = permuted[start_row : start_row + n]
        _pad_codes(codes, s, z, in_features, fmt)
        grid = GridWeights(fmt, codes, s, z, in_features)
        found.append(with_offsets(grid, wanted) if wanted.offset else grid)
        start_row += n
    return found
