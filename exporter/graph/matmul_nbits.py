"""MatMulNBits (and GatherBlockQuantized) from block grids, packed by the exporter itself.

The fused graph concatenates projections into first stages, stacks up factors and slices rank levels,
so one MatMul's B (K x N) holds rows of many nn.Linear weights. Every one of its columns is a row of some
linear, and blocks run along K from 0 in both, so each (column, block) of B is a block of a linear's row.
A `GridRegistry` indexes the blocks of every quantized linear (exporter.compress.quantize: `weight_grid`) by
a hash of their dequantized float32 values; `quantize_matmuls` finds each B block's grid there and packs its
codes, so the graph holds exactly the codes PyTorch dequantized (checked block by block: a block whose
stored grid does not reproduce it, or no grid was found for, is rounded to nearest instead, the data-free
fallback). One MatMul has one format (bits, block size, zero points): the one most of its blocks were
quantized with; where its rows sit wholly on grids of several formats (exporter.compress.grid.RowSplitGrid), one
MatMulNBits per format, their outputs concatenated and put back into row order (GatherElements); a split whose
output is a graph output (lm_head's logits, [batch, sequence, vocab]: the largest tensor) with few rows on its higher
format instead multiplies all its rows on the lower one and writes the others over theirs (ScatterElements), see
`quantize_matmuls`.

Layout (com.microsoft MatMulNBits): B uint8 [N, blocks, block_size * bits / 8], codes packed low bits first;
scales [N, blocks] in the activations' type; zero points uint8 [N, ceil(blocks * bits / 8)] packed the same
way, omitted for symmetric grids (the default zero point 2^(bits-1) is theirs).
"""

from __future__ import annotations

import numpy as np

from exporter.compress.grid import QuantFormat, block_codes, blocked, dequantize, fit_blocks, grid_parts, scattered

MS_DOMAIN = "com.microsoft"
_HASH_SEED = 20261202


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (..., n) along the last axis, low bits first: n * bits / 8 bytes."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    per_byte = 8 // bits
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), np.uint8)], axis=-1)
    grouped = codes.reshape(codes.shape[:-1] + (-1, per_byte))
    packed = np.zeros(grouped.shape[:-1], np.uint8)
    for i in range(per_byte):
        packed |= (grouped[..., i] << (i * bits)).astype(np.uint8)
    return packed


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[..., :count]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :count]


def block_hashes(blocks: np.ndarray, rows: int = 8192) -> np.ndarray:
    """A 64-bit hash of each float32 block (..., block_size) from its values' bits (equal values, equal hash).
    In chunks of `rows` blocks: whole-array uint64 temporaries made it 70x slower (7.7 s for 32M weights)."""
    size = blocks.shape[-1]
    multipliers = np.random.default_rng(_HASH_SEED + size).integers(1, 2**63, size, dtype=np.uint64) | np.uint64(1)
    flat = np.asarray(blocks, dtype=np.float32).reshape(-1, size)
    hashes = np.empty(len(flat), np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, len(flat), rows):
            # + 0 turns -0.0 into 0.0: a negative scale dequantizes zero codes to -0.0, padding is +0.0
            mixed = (flat[start:start + rows] + np.float32(0)).view(np.uint32).astype(np.uint64)
            mixed *= multipliers
            mixed ^= mixed >> np.uint64(29)
            mixed.sum(axis=-1, dtype=np.uint64, out=hashes[start:start + rows])
    return hashes.reshape(blocks.shape[:-1])


class GridRegistry:
    """The grids of a model's quantized linears, indexed by the hash of each dequantized block. An offset grid's
    blocks also keep their offset: its value, its code and its own block's scale and zero point."""

    def __init__(self, grids=()):
        pending: dict[QuantFormat, list] = {}
        for grid in (part for whole in grids for part in grid_parts(whole)):  # padding as the graph's B pads: zeros
            values = blocked(grid.dequantize(), grid.fmt.block_size)
            part = [block_hashes(values).ravel(), grid.scales.ravel(), grid.zeros.ravel()]
            if grid.fmt.offset:
                offsets, size = grid.offsets, grid.fmt.block_size
                count = grid.scales.shape[1]
                part += [offsets.dequantize().ravel(), offsets.codes[:, :count].ravel(),
                         np.repeat(offsets.scales, size, axis=1)[:, :count].ravel(),
                         np.repeat(offsets.zeros, size, axis=1)[:, :count].ravel()]
            pending.setdefault(grid.fmt, []).append(part)
        self.tables = {}
        for fmt, parts in pending.items():
            columns = [np.concatenate(p) for p in zip(*parts)]
            order = np.argsort(columns[0], kind="stable")
            self.tables[fmt] = tuple(c[order] for c in columns)

    @classmethod
    def from_model(cls, model) -> GridRegistry:
        from exporter.compress.quantize import grid_of

        grids = {id(g): g for m in model.modules() if (g := grid_of(m)) is not None}
        return cls(grids.values())

    @property
    def formats(self) -> list[QuantFormat]:
        return list(self.tables)

    def lookup(self, fmt: QuantFormat, blocks: np.ndarray, width: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found, scales, zeros) for blocks (M x block_size) of `fmt`: a grid whose codes reproduce the block
        exactly (found False elsewhere); only the first `width` values count (the rest: padding)."""
        return self.lookup_offsets(fmt, blocks, width)[:3]

    def lookup_offsets(self, fmt: QuantFormat, blocks: np.ndarray, width: int | None = None) -> tuple:
        """`lookup`, and for an offset grid each block's offset (value, code, scale and zero point of its grid)."""
        count = blocks.shape[0]
        scales, zeros = np.zeros(count, np.float32), np.zeros(count, fmt.zero_dtype)
        offsets = [np.zeros(count, np.float32), np.zeros(count, np.uint8), np.zeros(count, np.float32),
                   np.zeros(count, np.uint8)] if fmt.offset else []
        table = self.tables.get(fmt)
        if table is None or count == 0:
            return (np.zeros(count, bool), scales, zeros, *offsets)
        hashes, table_scales, table_zeros, *table_offsets = table
        wanted = block_hashes(blocks)
        order = np.argsort(wanted)  # sorted queries: numpy's search starts each from the last (6x faster here)
        where = np.empty(count, np.int64)
        where[order] = np.minimum(np.searchsorted(hashes, wanted[order]), len(hashes) - 1)
        hit = hashes[where] == wanted
        scales[hit], zeros[hit] = table_scales[where[hit]], table_zeros[where[hit]]
        for mine, theirs in zip(offsets, table_offsets):
            mine[hit] = theirs[where[hit]]
        shift = offsets[0][:, None] if fmt.offset else np.float32(0)
        codes = block_codes(blocks - shift, scales, zeros, fmt)
        values = dequantize(codes, scales[:, None], zeros[:, None], fmt.block_size)
        if fmt.offset:
            values = values + shift
        exact = (values == blocks)[:, :width].all(axis=-1)
        return (hit & exact, scales, zeros, *offsets)


def grid_matrix(weight: np.ndarray, fmt: QuantFormat, registry: GridRegistry | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(codes N x blocks x block_size, scales N x blocks, zeros N x blocks, blocks found in the registry) of an
    out x in weight (a MatMul's B transposed): registered grids where they reproduce a block, RTN elsewhere."""
    blocks = blocked(np.asarray(weight, np.float32), fmt.block_size)
    n, count, size = blocks.shape
    flat = blocks.reshape(-1, size)
    found = np.zeros(len(flat), bool)
    scales, zeros = np.zeros(len(flat), np.float32), np.zeros(len(flat), fmt.zero_dtype)
    if registry is not None:
        found, scales, zeros = (a.reshape(-1) for a in _lookup_rows(registry, fmt, blocks, weight.shape[1]))
    codes = np.zeros(flat.shape, np.uint8)
    codes[found] = block_codes(flat[found], scales[found], zeros[found], fmt)
    if not found.all():
        c, s, z = fit_blocks(flat[~found], fmt)
        codes[~found], scales[~found], zeros[~found] = c, s, z
    return codes.reshape(n, count, size), scales.reshape(n, count), zeros.reshape(n, count), int(found.sum())


def choose_format(weight: np.ndarray, registry: GridRegistry | None, default: QuantFormat) -> QuantFormat:
    """The registered format most of this weight's blocks were quantized with (`default` where none)."""
    best, best_found = default, 0
    for fmt in registry.formats if registry else []:
        flat = blocked(np.asarray(weight, np.float32), fmt.block_size).reshape(-1, fmt.block_size)
        sample = flat[:: max(1, len(flat) // 4096)]  # a strided sample decides; grid_matrix checks them all
        found = int(registry.lookup(fmt, sample)[0].sum())
        if found > best_found:
            best, best_found = fmt, found
    return best


def _lookup_rows(registry: GridRegistry, fmt: QuantFormat, blocks: np.ndarray, in_features: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`registry.lookup` of blocks (N x blocks x block_size), the last block of each row compared on its first
    values only (the rest: padding): (found, scales, zeros), each N x blocks."""
    n, count, size = blocks.shape
    whole = registry.lookup(fmt, blocks[:, :-1].reshape(-1, size))
    last = registry.lookup(fmt, blocks[:, -1], in_features - (count - 1) * size)
    return tuple(np.concatenate([a.reshape(n, count - 1), b[:, None]], axis=1) for a, b in zip(whole, last))


def rows_found(weight: np.ndarray, fmt: QuantFormat, registry: GridRegistry) -> np.ndarray:
    """Which rows of an out x in weight the registry holds wholly on `fmt` (every block reproduced)."""
    blocks = blocked(np.asarray(weight, np.float32), fmt.block_size)
    return _lookup_rows(registry, fmt, blocks, weight.shape[1])[0].all(axis=1)


def row_formats(weight: np.ndarray, chosen: QuantFormat, registry: GridRegistry | None
                ) -> list[tuple[QuantFormat, np.ndarray]] | None:
    """A weight whose rows sit on grids of several formats (exporter.compress.grid.RowSplitGrid): [(format, its
    rows)], the chosen (most frequent) format first; None where `chosen` holds every row, or the registered formats
    do not cover them all (RTN then rounds the rest, as for any block without a grid)."""
    if registry is None or chosen.offset:
        return None
    left = np.flatnonzero(~rows_found(weight, chosen, registry))
    if len(left) == 0:
        return None
    parts = [(chosen, np.setdiff1d(np.arange(weight.shape[0]), left))]
    for fmt in registry.formats:
        if fmt == chosen or fmt.offset or len(left) == 0:
            continue
        mine = left[rows_found(weight[left], fmt, registry)]
        if len(mine):
            parts.append((fmt, mine))
            left = np.setdiff1d(left, mine)
    return parts if len(left) == 0 and len(parts) > 1 else None


def matmul_nbits_inputs(weight: np.ndarray, fmt: QuantFormat, registry: GridRegistry | None = None,
                        scale_dtype=np.float32) -> tuple[dict[str, np.ndarray], int]:
    """({"B", "scales", "zero_points" (asymmetric only)}, blocks found in the registry) for an out x in weight."""
    codes, scales, zeros, found = grid_matrix(weight, fmt, registry)
    return _packed(codes, scales, zeros, fmt, scale_dtype), found


def _packed(codes, scales, zeros, fmt: QuantFormat, scale_dtype) -> dict[str, np.ndarray]:
    arrays = {"B": pack_codes(codes, fmt.bits), "scales": scales.astype(scale_dtype)}
    if fmt.float_zero:  # unpacked, in the scales' type
        arrays["zero_points"] = zeros.astype(scale_dtype)
    elif not fmt.symmetric:
        arrays["zero_points"] = pack_codes(zeros, fmt.bits)
    return arrays


def offset_inputs(weight: np.ndarray, fmt: QuantFormat, registry: GridRegistry, scale_dtype=np.float32
                  ) -> dict[str, np.ndarray] | None:
    """The MatMulNBits inputs (at `fmt.integer`) of an out x in weight on offset grids, K = in + blocks: each row's
    codes, then its blocks' offsets as more columns, their scales times the block size (multiplying the input's block
    means: block_sums_nodes); None unless the registry holds every block."""
    size = fmt.block_size
    if weight.shape[1] % size:
        return None
    blocks = blocked(np.asarray(weight, np.float32), size)
    n, count, _ = blocks.shape
    found, scales, zeros, values, offset_codes, offset_scales, offset_zeros = (
        a.reshape(n, count) for a in registry.lookup_offsets(fmt, blocks.reshape(-1, size)))
    if not found.all():
        return None
    codes = block_codes(blocks - values[..., None], scales, zeros, fmt)
    extra = fmt.blocks(count)
    tail = np.repeat(offset_zeros[:, ::size], size, axis=1)[:, : extra * size]  # padding: the code of 0
    tail[:, :count] = offset_codes
    codes = np.concatenate([codes, tail.reshape(n, extra, size)], axis=1)
    scales = np.concatenate([scales, offset_scales[:, ::size] * np.float32(size)], axis=1)  # a power of two: exact
    zeros = np.concatenate([zeros, offset_zeros[:, ::size]], axis=1)
    return _packed(codes, scales, zeros, fmt.integer, scale_dtype)


def dequantize_inputs(arrays: dict[str, np.ndarray], fmt: QuantFormat, in_features: int) -> np.ndarray:
    """The out x in float32 weight a MatMulNBits with these inputs multiplies by (the inverse of packing)."""
    n, count, _ = arrays["B"].shape
    codes = unpack_codes(arrays["B"], fmt.bits, fmt.block_size).reshape(n, count * fmt.block_size)
    if fmt.float_zero:
        zeros = arrays["zero_points"].astype(np.float32)
    elif "zero_points" in arrays:
        zeros = unpack_codes(arrays["zero_points"], fmt.bits, count)
    else:
        zeros = np.full((n, count), fmt.levels // 2, np.uint8)
    return dequantize(codes, arrays["scales"].astype(np.float32), zeros, fmt.block_size)[:, :in_features]


def quantize_matmuls(proto, default: QuantFormat, registry: GridRegistry | None = None,
                     accuracy_level: int | None = None) -> dict:
    """Replace every MatMul by a constant 2-D float B with MatMulNBits (in place). Returns a summary:
    {"formats": {initializer: format name}, "blocks": total, "registered": blocks found in the registry}.
    A MatMul on offset grids reads its input with the input's block means appended (AveragePool, Concat; once per
    input), the offsets (times the block size) being B's last columns. A MatMul whose rows sit on grids of several formats
    (`row_formats`) becomes one MatMulNBits per format, a Concat, and a GatherElements (axis -1; its indices
    expanded to the Concat's shape) into row order. Where its output is the graph's (the logits) and the rows off
    the format with the fewest bytes per row are few (exporter.compress.grid.scattered), one MatMulNBits of all its
    rows on that format, and each other part's MatMulNBits written over its rows there (ScatterElements, axis -1;
    the rows' indices expanded to the part's shape): the gather's Concat and [batch, sequence, vocab] int32 order
    raise peak memory by two logits' sizes (55 MB at a 128-token prefill, benchmarks/RESULTS.md), the scatter's copy
    by one, for its rows' copy's bytes.
    Each split expands its order against its own Shape: one [batch, sequence, 1] shape shared by all (a node less per
    split) raised peak RSS by 45 MB at 52 MB for a decode within noise (RESULTS, 2026-12-07), ONNX Runtime planning
    less reuse for the Expand outputs of a computed shape."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    summary = {"formats": {}, "blocks": 0, "registered": 0}
    graph_outputs = {o.name for o in graph.output}
    augmented: dict[tuple[str, int], str] = {}  # (input, block size) -> the input with its block means
    written = []

    def emit(x: str, k: int, arrays: dict, fmt: QuantFormat, stem: str, output: str, name: str) -> None:
        names = []
        for key in ("B", "scales", "zero_points"):
            if key in arrays:
                names.append(f"{stem}_Q{fmt.bits}" if key == "B" else f"{stem}_{key}")
                graph.initializer.append(numpy_helper.from_array(arrays[key], names[-1]))
        attributes = {"K": k, "N": arrays["scales"].shape[0], "bits": fmt.bits, "block_size": fmt.block_size}
        if accuracy_level is not None:
            attributes["accuracy_level"] = accuracy_level
        written.append(helper.make_node("MatMulNBits", [x, *names], [output], domain=MS_DOMAIN, **attributes,
                                        name=name + (OFFSET_SUFFIX if fmt.offset else "")))
        summary["blocks"] += arrays["scales"].size

    for node in list(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            written.append(node)
            continue
        tensor = initializers[node.input[1]]
        b = numpy_helper.to_array(tensor)
        if b.ndim != 2 or b.dtype not in (np.float32, np.float16):
            written.append(node)
            continue
        k = b.shape[0]
        weight = b.T.astype(np.float32)
        fmt = choose_format(weight, registry, default)
        x, stem = node.input[0], node.input[1]

        arrays = offset_inputs(weight, fmt, registry, b.dtype) if fmt.offset else None
        if arrays is not None:
            found, key = weight.size // fmt.block_size, (x, fmt.block_size)
            if key not in augmented:
                written.extend(block_sums_nodes(x, fmt.block_size, f"{node.name}/BlockSums"))
                augmented[key] = written[-1].output[0]
            emit(augmented[key], k + fmt.blocks(k), arrays, fmt, stem, node.output[0], f"{node.name}_Q{fmt.bits}")
            summary["formats"][stem] = fmt.name
        else:
            fmt = fmt.integer if fmt.offset else fmt  # not every block on its offset grid: RTN at integer zeros
            arrays, found = matmul_nbits_inputs(weight, fmt, registry, b.dtype)
            split = row_formats(weight, fmt, registry) if found < arrays["scales"].size else None
            base = split and min((f for f, _ in split), key=lambda f: f.matrix_bytes(1, k))  # fewest bytes a row
            if split is None:
                emit(x, k, arrays, fmt, stem, node.output[0], f"{node.name}_Q{fmt.bits}")
                summary["formats"][stem] = fmt.name
            elif node.output[0] in graph_outputs and scattered(
                    sum(len(rows) for f, rows in split if f != base), weight.shape[0]):
                # the base holds every row: the whole weight's inputs above where it is the chosen format
                whole = (arrays, found) if base == fmt else matmul_nbits_inputs(weight, base, registry, b.dtype)
                nodes, found = _scattered_split(graph, node, x, k, weight, split, base, whole, registry, b.dtype, emit)
                written += nodes
                summary["formats"][stem] = "/".join(f.name for f, _ in split)
            else:  # rows on grids of several formats: one MatMulNBits each, then Concat and GatherElements
                outputs, found = [], 0
                for part, (part_fmt, rows) in enumerate(split):
                    arrays, part_found = matmul_nbits_inputs(weight[rows], part_fmt, registry, b.dtype)
                    outputs.append(f"{node.output[0]}/rows{part}")
                    emit(x, k, arrays, part_fmt, f"{stem}.rows{part}", outputs[-1],
                         f"{node.name}/rows{part}_Q{part_fmt.bits}")
                    found += part_found
                # GatherElements, not Gather: ONNX Runtime's Gather along the last axis took 24 us for 3072 values
                # (2.3 us here, Shape and Expand of the order included: benchmarks/RESULTS.md, "Row splits")
                order = np.argsort(np.concatenate([rows for _, rows in split]), kind="stable").astype(np.int32)
                graph.initializer.append(numpy_helper.from_array(order.reshape(1, 1, -1), f"{stem}.row_order"))
                written += row_order_nodes(outputs, f"{stem}.row_order", node.output[0], node.name)
                summary["formats"][stem] = "/".join(f.name for f, _ in split)
        consumers[stem] -= 1
        if consumers[stem] == 0:
            graph.initializer.remove(tensor)
        summary["registered"] += found
    del graph.node[:]
    graph.node.extend(written)
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return summary


def _scattered_split(graph, node, x: str, k: int, weight: np.ndarray, split, base: QuantFormat, whole: tuple,
                     registry, scale_dtype, emit) -> tuple[list, int]:
    """A row split in the scatter form (`quantize_matmuls`): the base MatMulNBits of all rows on the split's format
    `base` (`whole`: the weight's MatMulNBits inputs on it and the blocks found; the other parts' rows there are
    rounded to nearest: written over), then per other part its MatMulNBits, the Shape and Expand of its rows' indices "{stem}.rows{j}.indices" [1, 1, rows],
    and a ScatterElements over the base's output. Returns (the nodes besides the MatMulNBits, which `emit` writes;
    the blocks found in the registry)."""
    from onnx import helper, numpy_helper

    stem, out = node.input[1], node.output[0]
    arrays, found = whole
    current = f"{out}/base"
    emit(x, k, arrays, base, f"{stem}.base", current, f"{node.name}/base_Q{base.bits}")
    others = [(fmt, rows) for fmt, rows in split if fmt != base]
    nodes = []
    for part, (fmt, rows) in enumerate(others, start=1):
        arrays, part_found = matmul_nbits_inputs(weight[rows], fmt, registry, scale_dtype)
        found += part_found
        rows_out, key = f"{out}/rows{part}", f"{node.name}/rows{part}"
        emit(x, k, arrays, fmt, f"{stem}.rows{part}", rows_out, f"{key}_Q{fmt.bits}")
        indices = f"{stem}.rows{part}.indices"
        graph.initializer.append(numpy_helper.from_array(rows.astype(np.int32).reshape(1, 1, -1), indices))
        written = out if part == len(others) else f"{out}/scattered{part}"
        nodes += [helper.make_node("Shape", [rows_out], [f"{rows_out}/shape"], name=f"{key}/Shape"),
                  helper.make_node("Expand", [indices, f"{rows_out}/shape"], [f"{rows_out}/indices"],
                                   name=f"{key}/IndicesExpand"),
                  helper.make_node("ScatterElements", [current, f"{rows_out}/indices", rows_out], [written],
                                   name=f"{key}/RowScatter", axis=-1)]
        current = written
    return nodes, found


OFFSET_SUFFIX = "_offset"  # the MatMulNBits of offset grids (graph_formats reads it back)
BLOCK_SUM_NODES = 2  # what block_sums_nodes adds per input read by offset grids (--latency-aware prices them)
# what a row split adds: a second MatMulNBits, Concat, and Shape, Expand, GatherElements (lm_head's scatter form: a
# second MatMulNBits, Shape, Expand, ScatterElements, and a tied embedding's selection)
ROW_SPLIT_NODES = 5
# what a tied embedding adds to gather from a two-part lm_head (exporter.graph.writer._select_reordered: the token's
# place and, per part, its clamped index, a gather and its two reshapes beyond the first, and the selection)
TIED_SPLIT_NODES = 14


def row_order_nodes(parts: list[str], order: str, output: str, prefix: str) -> list:
    """Nodes putting a row split's part outputs `parts` (along the last axis) back into row order as `output`: their
    Concat, and a GatherElements by the initializer `order` (each row's place; of the outputs' rank, ones but the last)
    expanded to the Concat's shape."""
    from onnx import helper

    rows = f"{output}/rows"
    return [helper.make_node("Concat", parts, [rows], name=f"{prefix}/RowConcat", axis=-1),
            helper.make_node("Shape", [rows], [f"{rows}/shape"], name=f"{prefix}/RowShape"),
            helper.make_node("Expand", [order, f"{rows}/shape"], [f"{rows}/order"], name=f"{prefix}/RowOrderExpand"),
            helper.make_node("GatherElements", [rows, f"{rows}/order"], [output], name=f"{prefix}/RowOrder", axis=-1)]


def block_sums_nodes(x: str, size: int, prefix: str) -> list:
    """Nodes appending to x (batch x sequence x K) the means of its blocks of `size` along K: [x, means] (an
    AveragePool over K, then a Concat; the offsets' scales carry the factor `size`, a power of two, so that means
    times it are the sums exactly). Two nodes where a Reshape, a ReduceSum and a Concat took three: the offset grid at
    1.20x int4-b32's decode time in the format table against 1.25x (benchmarks/RESULTS.md)."""
    from onnx import helper

    return [helper.make_node("AveragePool", [x], [f"{prefix}/means"], name=f"{prefix}/AveragePool",
                             kernel_shape=[size], strides=[size]),
            helper.make_node("Concat", [x, f"{prefix}/means"], [f"{prefix}/output"], name=f"{prefix}/Concat",
                             axis=-1)]


def graph_formats(onnx_path) -> dict[str, int]:
    """{format name: MatMulNBits nodes} of a saved graph (GatherBlockQuantized counted as `gather <format>`)."""
    import onnx
    from onnx import helper

    counts: dict[str, int] = {}
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    types = {t.name: t.data_type for t in graph.initializer}
    for node in graph.node:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        zero_points = node.input[3] if len(node.input) > 3 else ""
        float_zero = bool(zero_points) and types.get(zero_points) != onnx.TensorProto.UINT8
        offset = node.name.endswith(OFFSET_SUFFIX)
        name = QuantFormat(attributes["bits"], attributes["block_size"], not zero_points, float_zero, offset).name
        key = name if node.op_type == "MatMulNBits" else f"gather {name}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
