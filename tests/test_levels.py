"""Rank-sliced decoder levels (progressive low-rank decoding): every level matches PyTorch at its ranks,
all levels read one data file, the KV cache carries across levels, int4 levels run."""

import numpy as np
import pytest
import torch

from exporter.compress.factorize import apply_ranks, decoder_projections, decompose_model, uniform_ranks
from exporter.compress.lowrank import CorrectedLinear
from exporter.errors import ExporterError
from exporter.graph.optimum_export import torch_greedy
from exporter.graph.writer import level_ranks, sliced_copy, write_decoder, write_levels
from exporter.runtime.generation import OrtDecoder

PROMPT = [5, 17, 42, 9, 33, 2, 61, 7, 80, 12, 101, 44]
STEPS = 6
FRACTIONS = (1.0, 0.85, 0.6)


def _factorized(tiny_models, calib_ids, family="llama", keep_dense=(), correctives=False):
    """Whitened SVD at ratio 0.3; `keep_dense` name suffixes stay dense; `correctives` wraps q and down
    projections in a CALR branch of rank 3 with random (non-zero) factors."""
    model = tiny_models.load(family)
    decompositions = decompose_model(model, "whitened", calib_ids[:4], progress=False)
    ranks = uniform_ranks(decoder_projections(model), 0.3)
    apply_ranks(model, decompositions, {n: None if n.endswith(keep_dense) else r for n, r in ranks.items()})
    if correctives:
        generator = torch.Generator().manual_seed(0)
        for name, module in list(model.named_modules()):
            if name.endswith(("q_proj", "down_proj")):
                wrapped = CorrectedLinear(module, 3)
                with torch.no_grad():
                    wrapped.corrective_down.weight.normal_(0, 0.1, generator=generator)
                    wrapped.corrective_up.weight.normal_(0, 0.1, generator=generator)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, wrapped)
    return model


def _logits(path, ref_tokens):
    _, logits, _ = OrtDecoder(path, threads=1).greedy(PROMPT, STEPS, forced_tokens=ref_tokens)
    return logits


@pytest.mark.parametrize("family, keep_dense, correctives", [
    ("llama", (), False),
    ("qwen2", ("k_proj", "0.mlp.up_proj"), False),  # biases; dense and low-rank parts in one first stage
    ("qwen3", (), True),  # per-head q/k norms; corrective branches stay whole in every level
])
def test_fp32_levels_match_sliced_pytorch(tiny_models, calib_ids, tmp_path, family, keep_dense, correctives):
    model = _factorized(tiny_models, calib_ids, family, keep_dense, correctives)
    entries = write_levels(model, tmp_path, FRACTIONS, progress=False)
    assert [(e["name"], e["file"]) for e in entries] == [
        ("r100", "model.onnx"), ("r85", "model.r85.onnx"), ("r60", "model.r60.onnx")]
    ranks = level_ranks(model, FRACTIONS)
    params = [e["active_factor_params"] for e in entries]
    assert params[0] > params[1] > params[2]
    full_logits = None
    for entry, level in zip(entries, ranks):
        reference = sliced_copy(model, level)
        ref_tokens, ref_logits = torch_greedy(reference, PROMPT, STEPS)
        logits = _logits(tmp_path / entry["file"], ref_tokens)
        assert np.abs(logits - ref_logits).max() <= 1e-4 * max(1.0, np.abs(ref_logits).max()), entry["name"]
        if full_logits is None:
            full_logits = logits
    assert np.abs(logits - full_logits).max() > 1e-2  # the smallest level really is smaller


def test_fp16_levels_match_sliced_pytorch(tiny_models, calib_ids, tmp_path):
    """fp16 levels (weights, activations, KV cache and logits in fp16) against the fp32 PyTorch model at each
    level's ranks, corrective branches included, within test_graph_writer's fp16 tolerance (2e-3 of the
    largest |logit|); they read one data file, at half the bytes of the fp32 levels."""
    model = _factorized(tiny_models, calib_ids, "qwen3", correctives=True)
    entries = write_levels(model, tmp_path / "fp16", FRACTIONS, weights="fp16", progress=False)
    assert sorted(p.name for p in (tmp_path / "fp16").glob("*.data")) == ["model.onnx.data"]
    for entry, level in zip(entries, level_ranks(model, FRACTIONS)):
        ref_tokens, ref_logits = torch_greedy(sliced_copy(model, level), PROMPT, STEPS)
        logits = _logits(tmp_path / "fp16" / entry["file"], ref_tokens)
        assert np.abs(logits - ref_logits).max() <= 2e-3 * np.abs(ref_logits).max(), entry["name"]
    fp32 = write_levels(model, tmp_path / "fp32", FRACTIONS, progress=False)
    for half, full in zip(entries, fp32):  # fp16 weights plus the same few int64 shape constants
        assert 0.5 * full["weight_bytes"] < half["weight_bytes"] < 0.51 * full["weight_bytes"]


def _external(path):
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    graph = onnx.load(str(path), load_external_data=False).graph
    return {t.name: ExternalDataInfo(t) for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}


def _inline_bytes(path):
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(len(t.raw_data) for t in graph.initializer)


@pytest.mark.parametrize("weights", ["fp32", "int4", "int8"])
def test_levels_share_one_data_file(tiny_models, calib_ids, tmp_path, weights):
    model = _factorized(tiny_models, calib_ids)
    entries = write_levels(model, tmp_path, FRACTIONS, weights=weights, block_size=16, progress=False)
    data = tmp_path / "model.onnx.data"
    assert sorted(p.name for p in tmp_path.glob("*.data")) == ["model.onnx.data"]
    # Weight storage: the data file plus small inline constants. (The graph itself, ~15 KB a level here, is
    # what dominates a tiny model's level files; on SmolLM2 it is 0.05% of the artifact.)
    inline = {p.name: _inline_bytes(p) for p in tmp_path.glob("model*.onnx")}
    assert sorted(inline) == sorted(e["file"] for e in entries)
    assert data.stat().st_size + sum(inline.values()) <= 1.05 * (data.stat().st_size + inline["model.onnx"])
    full = _external(tmp_path / "model.onnx")
    shorter = 0
    for entry in entries[1:]:
        refs = _external(tmp_path / entry["file"])
        assert refs and refs.keys() <= full.keys()
        for name, info in refs.items():
            assert info.location == "model.onnx.data" and info.offset == full[name].offset
            assert info.length <= full[name].length and info.offset + info.length <= data.stat().st_size
            shorter += info.length < full[name].length
    bytes_read = [e["weight_bytes"] for e in entries]  # int4/int8 at block 16: r85 rounds up to r100's ranks
    assert bytes_read == sorted(bytes_read, reverse=True) and bytes_read[-1] < bytes_read[0]
    assert shorter > 0  # rank-outer factors are read as prefixes


def test_kv_cache_carries_across_levels(tiny_models, calib_ids, tmp_path):
    """Prefill at full rank, then decode at the smallest level with the full level's cache: the same logits
    as PyTorch doing the same (its cache from the full model, the step from the sliced one)."""
    model = _factorized(tiny_models, calib_ids)
    entries = write_levels(model, tmp_path, FRACTIONS, progress=False)
    full, small = (OrtDecoder(tmp_path / entries[k]["file"], threads=1) for k in (0, -1))
    logits, cache = full.step(np.array([PROMPT]), full.empty_cache(1))
    _, small_cache = small.step(np.array([PROMPT]), small.empty_cache(1))
    assert {k: v.shape for k, v in cache.arrays().items()} == {k: v.shape for k, v in small_cache.arrays().items()}
    token = int(np.argmax(logits[0, -1]))
    step, _ = small.step(np.array([[token]]), cache)

    reference = sliced_copy(model, level_ranks(model, FRACTIONS)[-1])
    with torch.no_grad():
        out = model(torch.tensor([PROMPT]), use_cache=True)
        ref = reference(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True).logits
        same_level = model(torch.tensor([[token]]), past_key_values=model(torch.tensor([PROMPT]), use_cache=True)
                           .past_key_values, use_cache=True).logits
    assert np.abs(step[0, -1] - ref[0, -1].numpy()).max() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert (ref - same_level).abs().max().item() > 1e-2  # the step did run at the smaller level


@pytest.mark.parametrize("weights, tolerance", [("int4", 0.25), ("int8", 0.02)])
def test_grid_levels_run(tiny_models, calib_ids, tmp_path, weights, tolerance):
    model = _factorized(tiny_models, calib_ids)
    fractions = (1.0, 0.6)
    entries = write_levels(model, tmp_path, fractions, weights=weights, block_size=16, progress=False)
    assert all(e["rank_multiple"] == 16 for e in entries)
    full_ranks = level_ranks(model, (1.0,))[0]
    small = level_ranks(model, fractions, multiple=16)[1]
    # rounded up to whole blocks of 16, or the allocated rank where that is smaller
    assert all(r == full_ranks[n] or r % 16 == 0 for n, r in small.items())
    assert any(r < full_ranks[n] for n, r in small.items())
    for entry, level in zip(entries, level_ranks(model, fractions, multiple=16)):
        reference = sliced_copy(model, level)
        ref_tokens, ref_logits = torch_greedy(reference, PROMPT, STEPS)
        logits = _logits(tmp_path / entry["file"], ref_tokens)
        # The level is the quantized model at its ranks: the same logits as the single-level writer on the
        # sliced copy (same blocks, same scales; only the first stage's row order differs).
        direct = write_decoder(reference, tmp_path / f"direct-{entry['name']}", weights=weights, block_size=16)
        assert np.abs(logits - _logits(direct, ref_tokens)).max() <= 1e-4 * np.abs(ref_logits).max()
        # Against PyTorch, the single-level tests' tolerances: 4-bit blocks on 64-wide tiny layers move
        # logits spanning about +-7 by about 0.1 on average, 8-bit ones by about 1/16 of that.
        assert np.abs(logits - ref_logits).mean() <= tolerance, entry["name"]


@pytest.mark.parametrize("fractions", [(0.85, 0.7), (1.0, 0.7, 0.85), (1.0, 0.0), (1.0, 1.2), (1.0, 0.851, 0.849)])
def test_bad_fractions_are_refused(tiny_models, tmp_path, fractions):
    with pytest.raises(ExporterError, match="rank levels must start at 1.0"):
        write_levels(tiny_models.load("llama"), tmp_path, fractions, progress=False)


def test_unknown_level_weights_are_refused(tiny_models, tmp_path):
    with pytest.raises(ExporterError, match="fp32, fp16, int4, int8, not 'int2'"):
        write_levels(tiny_models.load("llama"), tmp_path, weights="int2", progress=False)
    assert level_ranks(tiny_models.load("llama"), (1.0, 0.5)) == [{}, {}]  # a dense model has nothing to slice


def test_shared_weights_sessions(tiny_models, calib_ids, tmp_path):
    """Sessions reading one memory map of the data file give the plain sessions' logits; quantized graphs
    are left unshared (MatMulNBits needs prepacking)."""
    pytest.importorskip("onnx_ir")
    import onnxruntime as ort

    from exporter.runtime.shared_weights import SharedWeights

    model = _factorized(tiny_models, calib_ids)
    entries = write_levels(model, tmp_path / "fp32", FRACTIONS, progress=False)
    shared = SharedWeights()
    for entry in entries:
        path = tmp_path / "fp32" / entry["file"]
        options = shared.session_options(path)
        assert options.get_session_config_entry("session.disable_prepacking") == "1"
        assert not options.enable_cpu_mem_arena
        tokens, plain, _ = OrtDecoder(path, threads=1).greedy(PROMPT, STEPS)
        _, logits, _ = OrtDecoder(path, threads=1, session_options=options).greedy(PROMPT, STEPS,
                                                                                  forced_tokens=tokens)
        assert np.abs(logits - plain).max() <= 1e-5
    assert len(shared._maps) == 1  # one map of model.onnx.data for every level
    write_levels(model, tmp_path / "int4", (1.0, 0.6), weights="int4", block_size=16, progress=False)
    options = shared.session_options(tmp_path / "int4" / "model.onnx", ort.SessionOptions())
    with pytest.raises(Exception):  # no config entry was set
        options.get_session_config_entry("session.disable_prepacking")
