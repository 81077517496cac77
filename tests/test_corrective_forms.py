"""CALR corrective branches in the ONNX graph, folded into the primary factors ([V; A], [U, B]) or written as
a separate branch (MatMul(x, A^T) -> MatMul(., B^T), added to the primary output): both forms give PyTorch's
logits and each other's, through the KV cache, at fp32, int4 and in rank-sliced levels."""

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from exporter.compress.corrective import attach_correctives
from exporter.compress.factorize import apply_ranks, decoder_projections, decompose_model, uniform_ranks
from exporter.compress.lowrank import CorrectedLinear
from exporter.graph.optimum_export import torch_greedy
from exporter.graph.writer import build_decoder, level_ranks, sliced_copy, write_decoder, write_levels
from exporter.runtime.generation import OrtDecoder

STEPS = 6  # the prefill, then 5 decode steps through the KV cache
FP32_TOL = 1e-4  # tiny-model logits span about +-7; the two forms differ by float summation order only
KEEP_DENSE = ("0.self_attn.k_proj", "1.mlp.up_proj")  # dense and corrected projections in one fused first stage


@pytest.fixture(scope="module")
def prompt(calib_ids):
    return calib_ids[0, :12].tolist()


def _corrected(tiny_models, calib_ids, family, ranks=None, keep_dense=KEEP_DENSE, rank=4):
    """Whitened SVD (uniform ratio 0.5, or `ranks`), every factorized projection wrapped in a rank-`rank`
    branch whose up factor B is random (non-zero, so the branch changes the logits)."""
    model = tiny_models.load(family)
    decompositions = decompose_model(model, "whitened", calib_ids[:4], progress=False)
    names = [p.name for p in decoder_projections(model)]
    ranks = ranks or uniform_ranks(decoder_projections(model), 0.5)
    apply_ranks(model, decompositions, {n: None if n.endswith(keep_dense) else ranks[n] for n in names})
    attach_correctives(model, decompositions, rank)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CorrectedLinear):
                module.corrective_up.weight.normal_(0, 0.1, generator=generator)
    return model


def _branches(model) -> int:
    return sum(isinstance(m, CorrectedLinear) for m in model.modules())


def _logits(path, prompt, ref_tokens):
    _, logits, _ = OrtDecoder(path, threads=1).greedy(prompt, STEPS, forced_tokens=ref_tokens)
    return logits


def _graph(path):
    return onnx.load(str(path), load_external_data=False).graph


def _first_stage_counts(graph):
    """MatMuls (or MatMulNBits) reading each norm output that feeds projections (attention, MLP input)."""
    norms = [n.output[0] for n in graph.node
             if n.op_type in ("RMSNormalization", "SkipSimplifiedLayerNormalization") and "/norm/" not in n.name
             and "_norm/" not in n.name]
    matmuls = Counter(n.input[0] for n in graph.node if n.op_type in ("MatMul", "MatMulNBits"))
    return [matmuls[name] for name in norms]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fp32_folded_and_separate_forms_give_the_same_outputs(tiny_models, calib_ids, prompt, tmp_path, family):
    model = _corrected(tiny_models, calib_ids, family)
    branches = _branches(model)
    assert branches == 14 - len(KEEP_DENSE)
    ref_tokens, ref_logits = torch_greedy(model, prompt, STEPS)
    # The branches matter: without them PyTorch's logits move far beyond the tolerance.
    plain = _corrected(tiny_models, calib_ids, family)
    with torch.no_grad():
        for module in plain.modules():
            if isinstance(module, CorrectedLinear):
                module.corrective_up.weight.zero_()
    ids = torch.tensor([prompt + ref_tokens[:-1]])
    with torch.no_grad():
        change = (plain(ids).logits - model(ids).logits)[0, len(prompt) - 1:].abs().max().item()
    assert change > 100 * FP32_TOL

    outs = {}
    for form, fuse in (("folded", True), ("separate", True), ("separate", False)):
        path = write_decoder(model, tmp_path / f"{form}-{fuse}", corrective_form=form, _fuse=fuse)
        outs[form, fuse] = logits = _logits(path, prompt, ref_tokens)
        assert np.abs(logits - ref_logits).max() <= FP32_TOL, (form, fuse)
        tokens, _, _ = OrtDecoder(path, threads=1).greedy(prompt, STEPS)  # free-running greedy, KV cache
        assert tokens == ref_tokens, (form, fuse)
        graph = _graph(path)
        names = [n.name for n in graph.node]
        separate_nodes = [n for n in names if "/corrective" in n]
        if form == "folded":
            assert not separate_nodes
            assert _first_stage_counts(graph) == [1, 1] * model.config.num_hidden_layers
        else:
            assert sum(n.endswith("/corrective_up/MatMul") for n in names) == branches
            if fuse:  # one more first-stage MatMul per group: the concatenated A^T of q/k/v, of gate/up
                assert _first_stage_counts(graph) == [2, 2] * model.config.num_hidden_layers
                assert sum(n.endswith("/corrective/MatMul") for n in names) == 4 * model.config.num_hidden_layers
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        assert props["corrective_form"] == form
    assert np.abs(outs["folded", True] - outs["separate", True]).max() <= FP32_TOL
    assert np.abs(outs["separate", False] - outs["separate", True]).max() <= FP32_TOL


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_int4_forms_agree(tiny_models, calib_ids, prompt, tmp_path, family):
    """Ranks that are not whole blocks (uniform ratio 0.5, block 32): folded U^T rows share MatMulNBits
    blocks (one scale) with B^T's, the separate form quantizes B^T on its own, so the two int4 graphs
    are two slightly different quantizations of the same model."""
    pytest.importorskip("onnx_ir")  # onnxruntime's MatMulNBitsQuantizer imports it
    model = _corrected(tiny_models, calib_ids, family)
    ref_tokens, ref_logits = torch_greedy(model, prompt, STEPS)
    outs, counts = {}, {}
    for form in ("folded", "separate"):
        path = write_decoder(model, tmp_path / form, weights="int4", block_size=32, accuracy_level=4,
                             corrective_form=form)
        ops = Counter(n.op_type for n in _graph(path).node)
        assert ops["MatMul"] == 0, form  # every branch MatMul is quantized too (B^T: K = r_c < 32, padded)
        counts[form] = ops["MatMulNBits"]
        outs[form] = logits = _logits(path, prompt, ref_tokens)
        # The single-form int4 test's tolerance against PyTorch (tests/test_graph_writer.py::test_int4).
        assert np.abs(logits - ref_logits).mean() <= 0.25, form
        assert np.mean(np.argmax(logits, axis=-1) == np.asarray(ref_tokens)) >= 0.75, form
    layers = model.config.num_hidden_layers
    assert counts["separate"] - counts["folded"] == _branches(model) + 4 * layers
    # Separate vs folded: measured 0.035-0.045 mean (max 0.26-0.38) on these models, where each form is
    # 0.07-0.09 mean from PyTorch; allowed 0.1 mean and 80% argmax agreement (measured 100%).
    assert np.abs(outs["folded"] - outs["separate"]).mean() <= 0.1
    assert np.mean(np.argmax(outs["folded"], -1) == np.argmax(outs["separate"], -1)) >= 0.8


@pytest.mark.parametrize("accuracy_level", [None, 4])
def test_int4_forms_are_the_same_quantization_with_block_aligned_ranks(tiny_models, calib_ids, prompt, tmp_path,
                                                                      accuracy_level):
    """Primary ranks in whole blocks (16, block 16; the pipeline rounds Fisher ranks to whole int4 blocks):
    B^T starts a block of its own in the folded [U, B]^T, and V^T / A^T are quantized per output column
    either way, so both forms hold exactly the same 4-bit weights and agree to float rounding."""
    pytest.importorskip("onnx_ir")
    names = [p.name for p in decoder_projections(tiny_models.load("qwen3"))]
    model = _corrected(tiny_models, calib_ids, "qwen3", ranks={n: 16 for n in names})
    ref_tokens, ref_logits = torch_greedy(model, prompt, STEPS)
    outs = {form: _logits(write_decoder(model, tmp_path / form, weights="int4", block_size=16,
                                        accuracy_level=accuracy_level, corrective_form=form), prompt, ref_tokens)
            for form in ("folded", "separate")}
    assert np.abs(outs["folded"] - ref_logits).mean() <= 0.25  # really quantized, yet close
    assert np.abs(outs["folded"] - ref_logits).max() > 100 * FP32_TOL
    assert np.abs(outs["folded"] - outs["separate"]).max() <= FP32_TOL  # measured 1.5e-6


def test_fp32_levels_in_the_separate_form(tiny_models, calib_ids, prompt, tmp_path):
    model = _corrected(tiny_models, calib_ids, "qwen3")
    fractions = (1.0, 0.85, 0.6)
    folded = write_levels(model, tmp_path / "folded", fractions, progress=False)
    separate = write_levels(model, tmp_path / "separate", fractions, corrective_form="separate", progress=False)
    # fp32 level ranks are not rounded: the same in both forms
    assert level_ranks(model, fractions) == level_ranks(model, fractions, corrective_form="separate")
    small = None
    for entry_f, entry_s, ranks in zip(folded, separate, level_ranks(model, fractions)):
        assert entry_f["active_factor_params"] == entry_s["active_factor_params"]
        ref_tokens, ref_logits = torch_greedy(sliced_copy(model, ranks), prompt, STEPS)
        logits_f = _logits(tmp_path / "folded" / entry_f["file"], prompt, ref_tokens)
        small = logits_s = _logits(tmp_path / "separate" / entry_s["file"], prompt, ref_tokens)
        assert np.abs(logits_s - ref_logits).max() <= FP32_TOL, entry_s["name"]
        assert np.abs(logits_s - logits_f).max() <= FP32_TOL, entry_s["name"]
    full = _logits(tmp_path / "separate" / "model.onnx", prompt, torch_greedy(model, prompt, STEPS)[0])
    assert np.abs(full - small).max() > 1e-2  # the levels differ
    assert sorted(p.name for p in (tmp_path / "separate").glob("*.data")) == ["model.onnx.data"]


def test_int4_levels_in_the_separate_form(tiny_models, calib_ids, prompt, tmp_path):
    """int4 levels round the primary rank alone to whole blocks (the separate B^T has its own blocks), read
    prefixes of the full level's data file, and equal the single-level int4 writer on the sliced model."""
    pytest.importorskip("onnx_ir")
    model = _corrected(tiny_models, calib_ids, "llama")
    fractions = (1.0, 0.6)
    entries = write_levels(model, tmp_path, fractions, weights="int4", block_size=16, corrective_form="separate",
                           progress=False)
    levels = level_ranks(model, fractions, 16, corrective_form="separate")
    full = levels[0]
    assert all(r == full[n] or r % 16 == 0 for n, r in levels[1].items())
    assert any(r < full[n] for n, r in levels[1].items())
    assert levels != level_ranks(model, fractions, 16)  # folded rounds primary + corrective rank instead
    for entry, ranks in zip(entries, levels):
        reference = sliced_copy(model, ranks)
        ref_tokens, ref_logits = torch_greedy(reference, prompt, STEPS)
        logits = _logits(tmp_path / entry["file"], prompt, ref_tokens)
        direct = write_decoder(reference, tmp_path / f"direct-{entry['name']}", weights="int4", block_size=16,
                               corrective_form="separate")
        assert np.abs(logits - _logits(direct, prompt, ref_tokens)).max() <= 1e-4 * np.abs(ref_logits).max()
        assert np.abs(logits - ref_logits).mean() <= 0.25, entry["name"]
        # and close to the folded int4 graph of the same sliced model (measured 0.005-0.012 mean; 0.08-0.12
        # if the branches were dropped): only the blocks where U^T and B^T meet are quantized differently
        folded = write_decoder(reference, tmp_path / f"folded-{entry['name']}", weights="int4", block_size=16)
        assert np.abs(logits - _logits(folded, prompt, ref_tokens)).mean() <= 0.05, entry["name"]


def test_unknown_form_is_refused(tiny_models, tmp_path):
    model = tiny_models.load("llama")
    for call in (lambda: write_decoder(model, tmp_path, corrective_form="fused"),
                 lambda: write_levels(model, tmp_path, corrective_form="fused", progress=False),
                 lambda: build_decoder(model, corrective_form="fused")):
        with pytest.raises(ValueError, match="corrective_form"):
            call()
