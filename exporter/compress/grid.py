"""Block grids: the integer codes, scales and zero points a quantized weight is stored as (numpy, torch-free).

A weight matrix (out x in, as nn.Linear holds it) is cut into blocks of `block_size` along `in`
(MatMulNBits' K; the last block zero-padded). Each block stores unsigned `bits`-bit codes q, a float32
scale s and a zero point z, and reads back as (q - z) * s, computed in float32 exactly as written here:
the PyTorch model holds these dequantized values, so the graph's MatMulNBits (exporter.graph.matmul_nbits)
computes with the very weights the PyTorch model was checked with.

Grids: symmetric (z = 2^(bits-1), the block's largest-magnitude value v mapped to code 0: s = v / -2^(bits-1),
ONNX Runtime's own RTN rule), asymmetric (min/max with 0 kept on the grid, z an integer code: MatMulNBits'
packed uint8 zero points) or min-max (z a float: the grid spans exactly the block's min to max, 0 need not be on
it; MatMulNBits takes such zero points in the scales' type). A min-max grid of 16 levels is llama.cpp's Q4_1
(scale and minimum per block of 32): weights dequantized from such a source sit on it again. ONNX Runtime's
CPU kernel runs float zero points ~20x slower, so a min-max grid is written as an offset grid (`-offset`): the
integer zero point round(z) and, per block, the remainder (round(z) - z) * s as an offset c added to every
value of the block, the offsets themselves on the asymmetric grid of the same bits and block size (they are
more K columns of the same MatMulNBits, multiplying the input's block sums: exporter.graph.matmul_nbits). Grids may shrink
the range (`clip`, off by default at 4 and 8 bits: it raised SmolLM2-135M's perplexity, docs/quantization.md): the
block keeps the shrink factor of a small search that minimizes its squared error, each column's error weighted by
its input's energy where that is known (GPTQ's H_ii). 2-bit grids always search, wider: with four levels a block's
few large values stretch the grid over the others.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
# 2-bit grids' range search, always on: on SmolLM2-135M's units it lowers int2-b64-asym's estimated loss by a quarter
# with GPTQ's column energies as weights (plain squared error shrank some ranges that carry large inputs: 2-6x worse)
LOW_BIT_SHRINKS = tuple(round(1.0 - 0.05 * k, 2) for k in range(11))  # 1.0 ... 0.5


@dataclass(frozen=True)
class QuantFormat:
    """One way of storing a weight matrix: `bits` (2, 4 or 8), `block_size` along the input, symmetric or not; an
    asymmetric grid's zero point an integer code or a float (`float_zero`: min-max grids), or an integer code plus
    a quantized offset per block (`offset`: a min-max grid as ONNX Runtime runs it fast)."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    float_zero: bool = False
    offset: bool = False

    def __post_init__(self):
        if (self.float_zero or self.offset) and self.symmetric:
            raise ValueError("float zero points and offsets are for asymmetric grids")
        if self.float_zero and self.offset:
            raise ValueError("an offset grid stores integer zero points")
        if self.bits not in (2, 4, 8):
            raise ValueError(f"{self.bits}-bit weights: MatMulNBits is written at 2, 4 or 8 bits")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size {self.block_size}: MatMulNBits needs a power of two >= 16")

    @property
    def name(self) -> str:
        return f"int{self.bits}-b{self.block_size}" + ("" if self.symmetric else "-minmax" if self.float_zero
                                                        else "-offset" if self.offset else "-asym")

    @classmethod
    def parse(cls, text: str) -> QuantFormat:
        """`int4-b32`, `int8-b128-asym`, `int4-b32-minmax`, `int4-b32-offset` (the inverse of `name`)."""
        match = re.fullmatch(r"int(\d+)-b(\d+)(-asym|-minmax|-offset)?", text)
        if not match:
            raise ValueError(f"quantization format {text!r}: expected int<bits>-b<block>[-asym|-minmax|-offset], "
                             "e.g. int4-b32")
        return cls(int(match[1]), int(match[2]), match[3] is None, match[3] == "-minmax", match[3] == "-offset")

    @property
    def integer(self) -> QuantFormat:
        """The asymmetric grid with integer zero points of the same bits and block size (an offset grid's codes
        and its offsets sit on it)."""
        return QuantFormat(self.bits, self.block_size, self.symmetric)

    @property
    def minmax(self) -> QuantFormat:
        """The min-max grid an offset grid writes."""
        return QuantFormat(self.bits, self.block_size, False, True)

    @property
    def zero_dtype(self):
        return np.float32 if self.float_zero else np.uint8

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def blocks(self, in_features: int) -> int:
        return math.ceil(in_features / self.block_size)

    def matrix_bytes(self, out_features: int, in_features: int, scale_bytes: int = 4) -> int:
        """Bytes of the MatMulNBits initializers for an out x in weight: packed codes, scales, packed zero points."""
        if self.offset:  # the offsets are more K columns of the same matrix
            return self.integer.matrix_bytes(out_features, in_features + self.blocks(in_features), scale_bytes)
        blocks = self.blocks(in_features)
        codes = out_features * blocks * self.block_size * self.bits // 8
        zeros = (0 if self.symmetric else out_features * blocks * scale_bytes if self.float_zero
                 else out_features * math.ceil(blocks * self.bits / 8))
        return codes + out_features * blocks * scale_bytes + zeros


@dataclass
class GridWeights:
    """A quantized out x in weight: codes (out x blocks*block_size, uint8, padding included), scales and zero
    points (out x blocks; zero points uint8, float32 for min-max grids); an offset grid's `offsets`, one per
    block (out x blocks), on their own grid (`fmt.integer`)."""

    fmt: QuantFormat
    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    in_features: int
    offsets: GridWeights | None = None

    def dequantize(self) -> np.ndarray:
        values = dequantize(self.codes, self.scales, self.zeros, self.fmt.block_size)
        if self.offsets is not None:
            values = values + np.repeat(self.offsets.dequantize(), self.fmt.block_size, axis=1)
        return values[:, : self.in_features]

    def first_rows(self, rows: int) -> GridWeights:
        """The grid of the weight's first `rows` rows (a grid's blocks run along rows)."""
        return GridWeights(self.fmt, self.codes[:rows], self.scales[:rows], self.zeros[:rows], self.in_features,
                           None if self.offsets is None else self.offsets.first_rows(rows))

    def take(self, rows: np.ndarray) -> GridWeights:
        """The grid of the weight's rows `rows` (indices), in that order."""
        return GridWeights(self.fmt, self.codes[rows], self.scales[rows], self.zeros[rows], self.in_features,
                           None if self.offsets is None else self.offsets.take(rows))


@dataclass
class RowSplitGrid:
    """A weight whose output rows sit on two grids of different formats: the rows `rows` (ascending indices) on
    `high`, the others on `low`. `high` and `low` are grids of the whole weight (GPTQ rounds each row on its own, so
    a row's codes do not depend on the other rows'); `parts` cuts them. ONNX Runtime multiplies by such a weight as
    one MatMulNBits per grid, their outputs put back in row order (exporter.graph.matmul_nbits)."""

    high: GridWeights
    low: GridWeights
    rows: np.ndarray

    @property
    def in_features(self) -> int:
        return self.high.in_features

    def mask(self) -> np.ndarray:
        mask = np.zeros(self.high.codes.shape[0], bool)
        mask[self.rows] = True
        return mask

    def parts(self) -> tuple[GridWeights, GridWeights]:
        """(the high rows' grid, the other rows' grid), each in row order."""
        mask = self.mask()
        return self.high.take(np.flatnonzero(mask)), self.low.take(np.flatnonzero(~mask))

    def dequantize(self) -> np.ndarray:
        mask = self.mask()
        values = self.low.take(np.flatnonzero(~mask)).dequantize()
        out = np.empty((len(mask), values.shape[1]), np.float32)
        out[~mask] = values
        out[mask] = self.high.take(np.flatnonzero(mask)).dequantize()
        return out


# A row split of a graph output (lm_head's logits, [batch, sequence, vocab]) is written as a MatMulNBits of all its rows
# on the lower format with the higher rows' logits scattered over theirs (exporter.graph.matmul_nbits) while those rows
# are at most this share: their copy costs at most that share of the lower grid's bytes and saves one such tensor of
# peak memory; beyond it, it is reordered as any split (Concat, Expand, GatherElements: two such tensors, no copy).
SCATTER_MAX_SHARE = 1 / 16


def scattered(high_rows: int, rows: int) -> bool:
    """Whether a split of a graph output with `high_rows` of `rows` on its higher format takes the scatter form."""
    return high_rows <= rows * SCATTER_MAX_SHARE


def split_rows(high: GridWeights, low: GridWeights, rows: np.ndarray) -> GridWeights | RowSplitGrid:
    """`rows` of the weight on `high`, the others on `low` (both grids of the whole weight); one grid where either
    side has no rows."""
    rows = np.unique(np.asarray(rows, np.int64))
    if len(rows) == 0:
        return low
    if len(rows) == high.codes.shape[0]:
        return high
    return RowSplitGrid(high, low, rows)


def grid_parts(grid) -> tuple[GridWeights, ...]:
    """The plain grids a weight's grid is made of (a RowSplitGrid's two parts)."""
    return grid.parts() if isinstance(grid, RowSplitGrid) else (grid,)


def with_offsets(grid: GridWeights, fmt: QuantFormat) -> GridWeights:
    """The offset grid (`fmt`) of a min-max grid: its codes and scales, the zero points rounded to integer codes,
    and each block's remainder (round(z) - z) * s as an offset, the offsets rounded to nearest on `fmt.integer`."""
    if grid.fmt != fmt.minmax:
        raise ValueError(f"an offset grid {fmt.name} is made from a {fmt.minmax.name} grid, not {grid.fmt.name}")
    zeros = np.clip(np.round(grid.zeros), 0, fmt.levels - 1)
    remainders = ((zeros - grid.zeros) * grid.scales).astype(np.float32)
    return GridWeights(fmt, grid.codes, grid.scales, zeros.astype(np.uint8), grid.in_features,
                       round_to_nearest(remainders, fmt.integer))


def blocked(weight: np.ndarray, block_size: int, edge: bool = False) -> np.ndarray:
    """out x in -> out x blocks x block_size, zero-padded along in (`edge`: padded with the last value, which
    leaves a min-max grid's range as the real values' alone)."""
    out_features, in_features = weight.shape
    pad = (-in_features) % block_size
    if pad:
        weight = np.pad(weight, ((0, 0), (0, pad)), mode="edge" if edge else "constant")
    return weight.reshape(out_features, -1, block_size)


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block_size: int) -> np.ndarray:
    """(q - z) * s in float32, the one formula every reader of a grid uses."""
    out_features = codes.shape[0]
    q = codes.reshape(out_features, -1, block_size).astype(np.float32)
    return ((q - zeros[..., None].astype(np.float32)) * scales[..., None]).reshape(out_features, -1)


def block_params(blocks: np.ndarray, fmt: QuantFormat, shrink: float | np.ndarray = 1.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(scales, zero points) of `blocks` (... x block_size, float32), the range shrunk by `shrink`."""
    blocks = blocks.astype(np.float32)
    top = fmt.levels - 1
    if fmt.symmetric:
        index = np.abs(blocks).argmax(axis=-1)[..., None]
        peak = np.take_along_axis(blocks, index, axis=-1)[..., 0] * np.float32(shrink)
        scales = (peak / np.float32(-(fmt.levels // 2))).astype(np.float32)
        zeros = np.full(scales.shape, fmt.levels // 2, dtype=np.uint8)
        return scales, zeros
    if fmt.float_zero:  # the block's own range; a constant block c: s = |c|, z = -c / s
        low, high = blocks.min(axis=-1), blocks.max(axis=-1)
        middle = (low + high) / 2
        low, high = middle + (low - middle) * np.float32(shrink), middle + (high - middle) * np.float32(shrink)
        scales = ((high - low) / np.float32(top)).astype(np.float32)
        scales = np.where(scales == 0, np.where(low == 0, np.float32(1), np.abs(low)), scales).astype(np.float32)
        return scales, (-low / scales).astype(np.float32)
    low = np.minimum(blocks.min(axis=-1), 0) * np.float32(shrink)
    high = np.maximum(blocks.max(axis=-1), 0) * np.float32(shrink)
    scales = ((high - low) / np.float32(top)).astype(np.float32)
    safe = np.where(scales == 0, np.float32(1), scales)
    zeros = np.clip(np.round(-low / safe), 0, top).astype(np.uint8)
    return scales, zeros


def block_codes(blocks: np.ndarray, scales: np.ndarray, zeros: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    """The nearest codes of `blocks` on the grids (scales, zeros): round(w / s + z), clipped."""
    safe = np.where(scales == 0, np.float32(1), scales)[..., None]
    codes = np.round(blocks.astype(np.float32) / safe + zeros[..., None].astype(np.float32))
    return np.clip(codes, 0, fmt.levels - 1).astype(np.uint8)


def shrink_factors(fmt: QuantFormat, clip: bool) -> tuple[float, ...]:
    """The range shrinks a grid's fit tries: LOW_BIT_SHRINKS at 2 bits, CLIP_FACTORS with `clip`, else none."""
    return LOW_BIT_SHRINKS if fmt.bits == 2 else CLIP_FACTORS if clip else (1.0,)


def fit_blocks(blocks: np.ndarray, fmt: QuantFormat, clip: bool = False, column_weights: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales, zeros) of `blocks` (... x blocks x block_size): round to nearest on each block's grid, the
    grid's range shrunk where that lowers the block's squared error (`shrink_factors`), each column's error weighted
    by `column_weights` (blocks * block_size of them, padding included: the input's energy per column) if given."""
    blocks = blocks.astype(np.float32)
    shrinks = shrink_factors(fmt, clip)
    shrink = np.float32(shrinks[0])
    if len(shrinks) > 1:  # each block's best shrink first, then its grid once
        weights = None if column_weights is None else np.asarray(column_weights, np.float32).reshape(blocks.shape[-2:])
        work = np.empty_like(blocks)  # in place: lm_head's 28M values, eleven times, 1.5x faster
        best = None
        for factor in shrinks:
            scales, zeros = block_params(blocks, fmt, factor)
            zeros = zeros.astype(np.float32)[..., None]
            np.divide(blocks, np.where(scales == 0, np.float32(1), scales)[..., None], out=work)  # block_codes' ...
            np.add(work, zeros, out=work)
            np.clip(np.round(work, out=work), 0, fmt.levels - 1, out=work)  # ... codes, kept in float32
            np.subtract(work, zeros, out=work)
            np.multiply(work, scales[..., None], out=work)
            np.subtract(work, blocks, out=work)
            np.square(work, out=work)
            if weights is not None:
                np.multiply(work, weights, out=work)
            error = work.sum(axis=-1)
            if best is None:
                best, shrink = error, np.full(error.shape, np.float32(factor))
                continue
            better = error < best
            best, shrink = np.where(better, error, best), np.where(better, np.float32(factor), shrink)
    scales, zeros = block_params(blocks, fmt, shrink)
    return block_codes(blocks, scales, zeros, fmt), scales, zeros


def round_to_nearest(weight: np.ndarray, fmt: QuantFormat, clip: bool = False) -> GridWeights:
    """The data-free grid of an out x in weight (RTN; `clip=False` is ONNX Runtime's own symmetric RTN)."""
    if fmt.offset:
        return with_offsets(round_to_nearest(weight, fmt.minmax, clip), fmt)
    blocks = blocked(np.asarray(weight, dtype=np.float32), fmt.block_size, edge=fmt.float_zero)
    codes, scales, zeros = fit_blocks(blocks, fmt, clip)
    pad = (-weight.shape[1]) % fmt.block_size
    if pad:  # padding's codes: those of 0, as the graph's B is padded
        codes[:, -1, -pad:] = block_codes(np.zeros((weight.shape[0], 1), np.float32), scales[:, -1], zeros[:, -1], fmt)
    return GridWeights(fmt, codes.reshape(weight.shape[0], -1), scales, zeros, weight.shape[1])
