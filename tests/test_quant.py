"""Block grids (exporter.compress.grid), GPTQ on Gram matrices (exporter.compress.gptq) and their packing into
MatMulNBits (exporter.graph.matmul_nbits): exact dequantization in ONNX Runtime, and an int4 graph whose
logits follow the quantized PyTorch model's tightly."""

import numpy as np
import pytest
import torch

from exporter.compress import grid as grid_module
from exporter.compress.gptq import gptq, gptq_shared
from exporter.compress.grid import QuantFormat, blocked, fit_blocks, round_to_nearest
from exporter.graph.matmul_nbits import (
    GridRegistry,
    block_hashes,
    dequantize_inputs,
    matmul_nbits_inputs,
    offset_inputs,
    pack_codes,
    unpack_codes,
)

FORMATS = [QuantFormat(bits, block, symmetric) for bits in (2, 4, 8) for block in (32, 64, 128)
           for symmetric in (True, False)] + [QuantFormat(4, 32, False, True), QuantFormat(4, 64, False, True)]


def _matmul_nbits(arrays: dict, fmt: QuantFormat, k: int, n: int, x: np.ndarray,
                  accuracy_level: int | None = None) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    attributes = {"K": k, "N": n, "bits": fmt.bits, "block_size": fmt.block_size}
    if accuracy_level is not None:
        attributes["accuracy_level"] = accuracy_level
    node = helper.make_node("MatMulNBits", ["x", *arrays], ["y"], domain="com.microsoft", **attributes)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(a, name) for name, a in arrays.items()])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    proto = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip(bits):
    codes = np.random.default_rng(0).integers(0, 1 << bits, (3, 5, 32), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 32 * bits // 8)
    assert np.array_equal(unpack_codes(packed, bits, 32), codes)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_packed_grid_dequantizes_exactly_in_onnxruntime(fmt):
    """160 inputs: blocks of 64 and 128 end in a padded block."""
    weight = np.random.default_rng(1).standard_normal((24, 160)).astype(np.float32)
    grid = round_to_nearest(weight, fmt)
    arrays, found = matmul_nbits_inputs(grid.dequantize(), fmt, GridRegistry([grid]))
    assert found == arrays["scales"].size  # every block came from the grid, none re-rounded
    assert ("zero_points" in arrays) == (not fmt.symmetric)
    if fmt.float_zero:  # a min-max grid refits a min-max source (llama.cpp's Q4_1) to float rounding
        np.testing.assert_allclose(round_to_nearest(grid.dequantize(), fmt).dequantize(), grid.dequantize(),
                                   rtol=0, atol=1e-6)
    assert np.array_equal(dequantize_inputs(arrays, fmt, 160), grid.dequantize())
    identity = _matmul_nbits(arrays, fmt, 160, 24, np.eye(160, dtype=np.float32))
    if fmt.float_zero:  # ONNX Runtime folds a float zero point into an offset: equal to float rounding
        np.testing.assert_allclose(identity.T, grid.dequantize(), rtol=1e-6, atol=1e-6)
    else:
        assert np.array_equal(identity.T, grid.dequantize())  # fp32 activations: bit-exact
    assert arrays["B"].nbytes + arrays["scales"].nbytes + arrays.get("zero_points", np.zeros(0)).nbytes \
        == fmt.matrix_bytes(24, 160)


def test_unclipped_symmetric_rtn_is_onnxruntime_quantizer():
    """The data-free fallback without its clipping search is ONNX Runtime's own MatMulNBits RTN."""
    pytest.importorskip("onnx_ir")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    weight = (torch.randn(24, 48, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 48)).numpy()
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 24])],
                              [numpy_helper.from_array(np.ascontiguousarray(weight.T), "w")])
    quantizer = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]),
                                     bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    session = ort.InferenceSession(quantizer.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"x": np.eye(48, dtype=np.float32)})[0].T
    ours = round_to_nearest(weight, QuantFormat(4, 32, True), clip=False).dequantize()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert np.abs(ours - weight).max() > 1e-2


def _correlated(rows: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=torch.Generator().manual_seed(99)) * 0.3 + torch.eye(width)
    return torch.randn(rows, width, generator=g) @ mix


@pytest.mark.parametrize("fmt", [QuantFormat(4, 32, True), QuantFormat(4, 64, False), QuantFormat(8, 128, True),
                                 QuantFormat(2, 32, False)], ids=lambda f: f.name)
def test_gptq_beats_round_to_nearest_on_held_out_inputs(fmt):
    weight = torch.randn(48, 192, generator=torch.Generator().manual_seed(2))
    calibration, held_out = _correlated(3000, 192, 3), _correlated(1000, 192, 4)
    gram = (calibration.T @ calibration).double()
    rtn = torch.from_numpy(round_to_nearest(weight.numpy(), fmt).dequantize())
    ours = torch.from_numpy(gptq(weight, gram, fmt).dequantize())

    def error(q):
        return ((weight - q) @ held_out.T).pow(2).sum().item()

    assert error(ours) < 0.8 * error(rtn)
    assert error(torch.from_numpy(gptq(weight, gram, fmt, act_order=False).dequantize())) < 0.8 * error(rtn)
    # with H = I nothing is spread: GPTQ is round-to-nearest, in either order
    for act_order in (True, False):
        identity = gptq(weight, torch.eye(192, dtype=torch.float64), fmt, damping=0.0, act_order=act_order)
        assert torch.equal(torch.from_numpy(identity.dequantize()), rtn)


def test_gptq_of_weights_sharing_an_input_is_each_ones_own_gptq():
    """One column loop over several weights' rows, each on its own format (4- and 8-bit, 2-bit, offset, a block
    that pads the row; an input no token reached): every grid is bit for bit the one its own call gives, and the
    grid of a weight's first rows is the first rows of its grid (what pricing a down factor's ranks reads)."""
    calibration = _correlated(2000, 192, 3)
    calibration[:, 7] = 0
    gram = (calibration.T @ calibration).double()
    formats = [QuantFormat.parse(n) for n in ("int4-b32-asym", "int8-b128", "int2-b64-asym", "int4-b32-offset",
                                              "int4-b128-asym", "int4-b64")]
    weights = [torch.randn(rows, 192, generator=torch.Generator().manual_seed(rows)) for rows in (40, 24, 8, 16, 33, 5)]

    def same(a, b):
        return (np.array_equal(a.codes, b.codes) and np.array_equal(a.scales, b.scales)
                and np.array_equal(a.zeros, b.zeros) and np.array_equal(a.dequantize(), b.dequantize()))

    shared = gptq_shared(weights, gram, formats)
    assert [g.fmt for g in shared] == formats and shared[3].offsets is not None
    assert all(same(g, gptq(w, gram, f)) for w, f, g in zip(weights, formats, shared))
    assert same(shared[0].first_rows(10), gptq(weights[0][:10], gram, formats[0]))


@pytest.mark.parametrize("fmt", [QuantFormat(4, 32, True), QuantFormat(4, 128, False)], ids=lambda f: f.name)
def test_act_order_beats_left_to_right_where_input_channels_differ_in_scale(fmt):
    """Decoder inputs have a few channels far larger than the rest; rounding those columns first, while every
    other column can still absorb their error, lowers the output error on held-out inputs. 200 columns: the
    last block is partly padding, whose codes dequantize to 0."""
    weight = torch.randn(64, 200, generator=torch.Generator().manual_seed(2)) * 0.05
    scale = torch.exp(torch.randn(200, generator=torch.Generator().manual_seed(7)))
    calibration, held_out = _correlated(3000, 200, 3) * scale, _correlated(1000, 200, 4) * scale
    gram = (calibration.T @ calibration).double()

    def error(act_order):
        grid = gptq(weight, gram, fmt, act_order=act_order)
        assert grid.codes.shape[1] == 200 + (-200) % fmt.block_size
        padding = (grid.codes[:, 200:].astype(np.float32) - grid.zeros[:, -1:].astype(np.float32)) * grid.scales[:, -1:]
        assert np.all(padding == 0)
        return ((weight - torch.from_numpy(grid.dequantize())) @ held_out.T).pow(2).sum().item()

    assert error(True) < 0.8 * error(False)


@pytest.mark.parametrize("fmt", [QuantFormat(2, 64, False), QuantFormat(2, 32, False)], ids=lambda f: f.name)
def test_2_bit_grids_search_their_range_weighted_by_the_inputs_energy(fmt, monkeypatch):
    """Heavy-tailed weights (a decoder's) on four levels: each block's range shrinks where that lowers its error
    weighted by the input's energy per column (never above the unshrunk grid's), a 4-bit grid keeps its range, and
    GPTQ's output error on held-out inputs falls against the same GPTQ without the search."""
    torch.manual_seed(5)
    weight = torch.distributions.StudentT(3.0).sample((48, 192)) * 0.02
    scale = torch.exp(torch.randn(192))
    calibration, held_out = _correlated(3000, 192, 3) * scale, _correlated(1000, 192, 4) * scale
    gram = (calibration.T @ calibration).double()
    energy = torch.diagonal(gram).float().numpy()
    blocks = blocked(weight.numpy(), fmt.block_size)

    def weighted_errors(codes, scales, zeros):
        values = (codes.astype(np.float32) - zeros[..., None]) * scales[..., None]
        return (((values - blocks) ** 2) * energy.reshape(blocks.shape[1:])).sum(-1)

    searched = weighted_errors(*fit_blocks(blocks, fmt, column_weights=energy))
    monkeypatch.setattr(grid_module, "LOW_BIT_SHRINKS", (1.0,))
    plain = weighted_errors(*fit_blocks(blocks, fmt, column_weights=energy))
    assert np.all(searched <= plain) and searched.sum() < 0.8 * plain.sum()
    four = QuantFormat(4, fmt.block_size, False)
    assert all(np.array_equal(a, b) for a, b in zip(fit_blocks(blocks, four, column_weights=energy),
                                                    fit_blocks(blocks, four)))

    def output_error(grid):
        return ((weight - torch.from_numpy(grid.dequantize())) @ held_out.T).pow(2).sum().item()

    without = [output_error(gptq(weight, gram, fmt, act_order=order)) for order in (True, False)]
    monkeypatch.undo()
    searched = [output_error(gptq(weight, gram, fmt, act_order=order)) for order in (True, False)]
    assert all(s < 0.9 * w for s, w in zip(searched, without)), (searched, without)


@pytest.mark.parametrize("block", [32, 64])
def test_offset_grid_holds_a_min_max_source_and_packs_as_block_sum_columns(block):
    """A weight on min-max grids (llama.cpp's Q4_1 at block 32) is on its offset grid again to the offsets' own
    rounding, far closer than the integer-zero-point grid; packed with its offsets as K columns, MatMulNBits on
    [x, block means of x] multiplies by exactly the grid's weights; its bytes are the format's."""
    fmt, k, n = QuantFormat(4, block, False, offset=True), 1536, 24
    rng = np.random.default_rng(7)
    source = round_to_nearest(rng.standard_normal((n, k)).astype(np.float32), fmt.minmax).dequantize()
    grid = round_to_nearest(source, fmt)
    assert grid.fmt == fmt and grid.offsets.fmt == fmt.integer and grid.offsets.codes.shape[1] >= k // block
    offset_error = np.abs(grid.dequantize() - source).max()
    integer_error = np.abs(round_to_nearest(source, fmt.integer).dequantize() - source).max()
    assert offset_error < integer_error / 8
    torch_grid = gptq(torch.from_numpy(source), torch.eye(k, dtype=torch.float64), fmt)  # H = I: RTN
    assert np.array_equal(torch_grid.dequantize(), grid.dequantize())
    arrays = offset_inputs(grid.dequantize(), fmt, GridRegistry([grid]))
    assert arrays is not None
    assert sum(a.nbytes for a in arrays.values()) == fmt.matrix_bytes(n, k)
    x = rng.standard_normal((3, k)).astype(np.float32)
    means = x.reshape(3, -1, block).mean(axis=-1)
    y = _matmul_nbits(arrays, fmt.integer, k + k // block, n, np.concatenate([x, means], axis=1))
    np.testing.assert_allclose(y, x @ grid.dequantize().T, rtol=1e-5, atol=1e-4)
    assert offset_inputs(source + 1e-3, fmt, GridRegistry([grid])) is None  # blocks not registered: no offsets


def test_registry_finds_blocks_of_concatenated_and_sliced_weights():
    """A fused first stage concatenates linears along out; a rank level takes whole blocks of K."""
    fmt = QuantFormat(4, 32, True)
    rng = np.random.default_rng(5)
    a, b = (round_to_nearest(rng.standard_normal(s).astype(np.float32), fmt) for s in ((16, 96), (8, 96)))
    registry = GridRegistry([a, b])
    fused = np.concatenate([a.dequantize(), b.dequantize()])
    arrays, found = matmul_nbits_inputs(fused, fmt, registry)
    assert found == arrays["scales"].size and np.array_equal(dequantize_inputs(arrays, fmt, 96), fused)
    level = fused[:, :64]
    arrays, found = matmul_nbits_inputs(level, fmt, registry)
    assert found == arrays["scales"].size
    unknown = rng.standard_normal((4, 96)).astype(np.float32)  # not registered: round to nearest
    arrays, found = matmul_nbits_inputs(unknown, fmt, registry)
    assert found == 0
    assert np.array_equal(dequantize_inputs(arrays, fmt, 96), round_to_nearest(unknown, fmt).dequantize())


def test_block_hashes_are_the_same_in_any_chunking_and_ignore_the_sign_of_zero():
    blocks = np.random.default_rng(6).standard_normal((7, 5, 32)).astype(np.float32)
    whole = block_hashes(blocks)
    assert whole.shape == (7, 5) and len(np.unique(whole)) == 35
    assert np.array_equal(block_hashes(blocks, rows=3), whole)
    negative = blocks.copy()
    negative[..., 0] = -0.0
    blocks[..., 0] = 0.0
    assert np.array_equal(block_hashes(negative), block_hashes(blocks, rows=4))


@pytest.mark.parametrize("grids", ["symmetric", "asymmetric", "offset"])
def test_int4_graph_follows_the_quantized_pytorch_model(tiny_models, calib_ids, tokenizer, tmp_path, grids):
    """GPTQ in PyTorch, packed by the writer: with fp32 activations the int4 graph's logits follow PyTorch's
    (the same dequantized weights) as tightly as the fp32 graph's do, lm_head and tied embedding included;
    offset grids (the decoder's; lm_head asymmetric) through their block-sum columns."""
    from collections import Counter

    import onnx

    from exporter.compress.quantize import grid_linears, grid_of, quantize_model
    from exporter.graph.optimum_export import torch_greedy
    from exporter.graph.writer import write_decoder
    from exporter.runtime.generation import OrtDecoder

    model = tiny_models.load("llama")
    asymmetric = grids != "symmetric"
    fmt = QuantFormat(4, 32, not asymmetric, offset=grids == "offset")
    before = {name: m.weight.detach().clone() for name, m in grid_linears(model).items()}
    quantize_model(model, lambda name: fmt.integer if name == "lm_head" else fmt, calib_ids[:8], progress=False)
    assert all(grid_of(m) is not None and not torch.equal(m.weight, before[name])
               for name, m in grid_linears(model).items())
    prompt = tokenizer("The engineer explains the last question", add_special_tokens=False)["input_ids"]
    ref_tokens, ref_logits = torch_greedy(model, prompt, 8)
    path = write_decoder(model, tmp_path, weights="int4", block_size=32, accuracy_level=None)
    graph = onnx.load(str(path)).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["MatMul"] == 0 and ops["MatMulNBits"] > 0
    assert ops["GatherBlockQuantized"] == int(bool(model.config.tie_word_embeddings))
    zero_points = [n for n in graph.node if n.op_type == "MatMulNBits" and len(n.input) > 3]
    assert bool(zero_points) == asymmetric
    # every decoder MatMulNBits reads block sums (lm_head alone not): once per input its nodes share
    block_sums = [n for n in graph.node if n.op_type == "AveragePool" and "/BlockSums/" in n.name]
    assert len(block_sums) == (4 * model.config.num_hidden_layers if grids == "offset" else 0)
    _, logits, _ = OrtDecoder(path, threads=1).greedy(prompt, 8, forced_tokens=ref_tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-4, rtol=0)


def test_a_tied_head_on_blocks_its_rows_do_not_divide_is_a_one_line_error(tiny_models, tmp_path):
    """A tied embedding gathers lm_head's blocks, which must divide its rows: an int4 export at a block size that
    does not is refused before quantizing, naming those that do, and the writer refuses to leave the embedding whole
    in fp32 (beside its 4-bit copy in lm_head) where it cannot gather."""
    from exporter.errors import ExporterError
    from exporter.graph.writer import write_decoder
    from exporter.pipeline import ExportOptions, quantize_grids

    model = tiny_models.load("llama")  # hidden 64
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    with pytest.raises(ExporterError, match=r"--block-size 128: .* rows of 64, .*; use 16 or 32 or 64$"):
        quantize_grids(model, ExportOptions(device="host", weights="int4", block_size=128, quantizer="rtn"), None)
    with pytest.raises(ExporterError, match="cannot gather lm_head's blocks of 128 from rows of 64"):
        write_decoder(model, tmp_path, weights="int4", block_size=128, accuracy_level=None)


def test_an_int4_export_stores_an_untied_embedding_in_4_bits(llama_dir, calib_file, tmp_path):
    """Through the CLI: the untied embedding is put on its grid with the linears and stored as 4-bit blocks, so the
    weights on disk are what the int4 byte budget counted."""
    import json

    import onnx

    from exporter.artifact.report import bytes_by_part
    from exporter.cli import main

    out = tmp_path / "art"
    assert main(["export", "--device", "raspberry-pi-5", "--model", str(llama_dir), "--ratio", "0", "--weights",
                 "int4", "--calib", str(calib_file), "--calib-samples", "4", "--calib-seq-len", "32",
                 "--no-correctives", "--out", str(out), "--no-progress"]) == 0
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert "GatherBlockQuantized" in {n.op_type for n in graph.node}
    assert "model.embed_tokens.weight" not in {t.name for t in graph.initializer}
    config = json.loads((out / "config.json").read_text())
    assert not config["tie_word_embeddings"]
    fp32_tables = 2 * config["vocab_size"] * config["hidden_size"] * 4  # embedding and lm_head in fp32
    assert bytes_by_part(out / "model.onnx")["embedding and lm_head"] < 0.2 * fp32_tables
    assert json.loads((out / "manifest.json").read_text())["parity"]["quantized"]["passed"]


def test_head_gram_from_the_gram_pass_is_the_head_gram(tiny_models, calib_ids):
    """lm_head's Gram from the last layer's outputs the Gram pass kept equals the one a pass of its own gives."""
    from exporter.compress.grams import iter_layer_grams
    from exporter.compress.quantize import head_gram

    model = tiny_models.load("llama")
    last: list = []
    for _ in iter_layer_grams(model, calib_ids[:6], progress=False, last_outputs=last):
        pass
    assert len(last) == 2  # batches of 4
    assert torch.equal(head_gram(model, calib_ids[:6], last_outputs=last), head_gram(model, calib_ids[:6]))
