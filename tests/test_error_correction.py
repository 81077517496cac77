"""Whitened correction of the quantization error (exporter.compress.error_correction): the branch lowers each
group's output error on the calibration inputs, more with more rank; the closed form is the whitened SVD's
optimum; the corrected int4 graph (R folded into the first stage, one L per group) follows PyTorch exactly."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from exporter.compress.error_correction import correction_factors, quantize_with_correction, whitened_error
from exporter.compress.grid import QuantFormat
from exporter.compress.lowrank import CorrectedLinear

FMT, UP = QuantFormat(4, 32, True), QuantFormat(8, 16, True)


def test_the_closed_form_is_the_best_rank_k_fit_in_the_whitened_metric():
    torch.manual_seed(0)
    x = torch.randn(400, 48) @ torch.randn(48, 48)  # correlated inputs: whitening matters
    gram = (x.T @ x).double()
    error = torch.randn(24, 48)
    down, up, grid = correction_factors(error, gram, 6)
    assert grid is None and down.shape == (6, 48) and up.shape == (24, 6)
    best = whitened_error(error, up @ down, gram)
    for _ in range(5):  # random rank-6 factors, and the plain SVD's, fit worse
        other = torch.randn(24, 6) @ torch.randn(6, 48)
        assert best < whitened_error(error, other * 0.01, gram)
    u, s, vh = torch.linalg.svd(error.double(), full_matrices=False)
    assert best < whitened_error(error, (u[:, :6] * s[:6]) @ vh[:6], gram)
    # R on a grid, L refit to it: still far better than no correction
    down_q, up_q, grid = correction_factors(error, gram, 6, FMT)
    assert grid is not None and torch.equal(down_q, torch.from_numpy(grid.dequantize()))
    assert whitened_error(error, up_q @ down_q, gram) < 0.8 * whitened_error(error, torch.zeros_like(error), gram)


@pytest.mark.parametrize("rank", [0, 16, 32])
def test_correction_lowers_the_output_error(tiny_models, calib_ids, rank):
    model = tiny_models.load("llama")
    report = quantize_with_correction(model, calib_ids[:8], lambda _n: FMT, lambda _n: rank, UP, progress=False)
    corrected = [m for m in model.modules() if isinstance(m, CorrectedLinear)]
    if rank == 0:
        assert report == {} and corrected == []
        return
    assert corrected and all(m.corrective_rank == rank and m.rank is None for m in corrected)
    assert all(r["error_after"] < r["error_before"] for r in report.values())
    test_correction_lowers_the_output_error.ratios[rank] = np.mean(
        [r["error_after"] / r["error_before"] for r in report.values()])
    if 16 in test_correction_lowers_the_output_error.ratios and 32 in test_correction_lowers_the_output_error.ratios:
        assert test_correction_lowers_the_output_error.ratios[32] < test_correction_lowers_the_output_error.ratios[16]


test_correction_lowers_the_output_error.ratios = {}


def test_corrected_int4_graph_follows_pytorch(tiny_models, calib_ids, tokenizer, tmp_path):
    import onnx

    from exporter.compress.quantize import quantize_model
    from exporter.graph.optimum_export import torch_greedy
    from exporter.graph.writer import write_decoder
    from exporter.runtime.generation import OrtDecoder

    model = tiny_models.load("llama")
    quantize_with_correction(model, calib_ids[:8], lambda _n: FMT, lambda _n: 16, UP, progress=False)
    quantize_model(model, lambda _n: FMT, progress=False)  # lm_head
    prompt = tokenizer("The engineer explains the last question", add_special_tokens=False)["input_ids"]
    ref_tokens, ref_logits = torch_greedy(model, prompt, 8)
    path = write_decoder(model, tmp_path, weights="int4", block_size=32, accuracy_level=None)
    graph = onnx.load(str(path)).graph
    ops = Counter(n.op_type for n in graph.node)
    layers = model.config.num_hidden_layers
    assert ops["MatMul"] == 0
    # per layer: 4 first stages (qkv, o, gate/up, down) with R folded in, and one L per input group
    assert ops["MatMulNBits"] == 8 * layers + int(not model.config.tie_word_embeddings)
    _, logits, _ = OrtDecoder(path, threads=1).greedy(prompt, 8, forced_tokens=ref_tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-4, rtol=0)


def test_export_with_error_correction(llama_dir, calib_file, tmp_path):
    import json

    from exporter.cli import main

    out = tmp_path / "art"
    code = main(["export", "--model", str(llama_dir), "--calib", str(calib_file), "--calib-samples", "8",
                 "--calib-seq-len", "32", "--ratio", "0", "--device", "host", "--weights", "int4",
                 "--error-correction", "16", "--no-progress", "--out", str(out)])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    correction = manifest["method"]["error_correction"]
    assert correction["rank"] == 16 and correction["groups"] == 4 * 2  # 4 input groups x 2 layers
    assert 0 < correction["output_error_kept"] < 1
    assert [level["name"] for level in manifest["levels"]] == ["r100"]
    assert manifest["parity"]["quantized"]["greedy_agreement"] >= 0.5
    assert "int8-b16" in manifest["onnx"]["quantization"]["matmul_nbits"]


@pytest.mark.parametrize("extra, message", [
    (["--error-correction", "10", "--ratio", "0"], "positive multiple of 16"),
    (["--error-correction", "16", "--ratio", "0.3"], "dense int4 weights"),
    (["--error-correction", "16", "--ratio", "0", "--quantizer", "rtn"], "--quantizer gptq"),
])
def test_error_correction_bad_options_are_one_line(llama_dir, calib_file, tmp_path, capsys, extra, message):
    from exporter.cli import main

    code = main(["export", "--model", str(llama_dir), "--calib", str(calib_file), "--calib-samples", "8",
                 "--calib-seq-len", "32", "--device", "host", "--weights", "int4", "--no-progress",
                 "--out", str(tmp_path / "art"), *extra])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and last.startswith("exporter: error:") and message in last
    assert not (tmp_path / "art").exists()


def test_fisher_weighted_correction_fits_the_weighted_error_better():
    torch.manual_seed(1)
    x = torch.randn(300, 32) @ torch.randn(32, 32)
    gram = (x.T @ x).double()
    error = torch.randn(40, 32)
    channels = torch.rand(40) ** 4 * 50  # a few channels matter most, as Fisher finds
    plain_down, plain_up, _ = correction_factors(error, gram, 4)
    down, up, _ = correction_factors(error, gram, 4, channels=channels)
    weighted = whitened_error(error, up @ down, gram, channels)
    assert weighted < whitened_error(error, plain_up @ plain_down, gram, channels)
    assert whitened_error(error, up @ down, gram) >= whitened_error(error, plain_up @ plain_down, gram) - 1e-6


def test_the_auto_menu_offers_corrections_and_the_graph_follows_the_choice(tiny_models, calib_ids, tokenizer,
                                                                             tmp_path):
    """--weights auto --error-correction 16: each decoder unit's int4 formats also come with a rank-16 correction,
    dearer and estimated better; a choice of them is installed and written exactly."""
    from exporter.compress.format_allocation import apply_choices, price_units
    from exporter.graph.optimum_export import torch_greedy
    from exporter.graph.writer import write_decoder
    from exporter.runtime.generation import OrtDecoder

    model = tiny_models.load("llama")
    units = price_units(model, calib_ids[:8], calib_ids[:4], progress=False, corrections=(16,))
    corrected = 0
    for unit in units:
        for k, rank in enumerate(unit.corrections):
            if rank:
                plain = k - 1  # the same format without correction comes just before
                assert unit.options[plain] == unit.options[k] and unit.corrections[plain] == 0
                assert unit.bytes[k] > unit.bytes[plain] and unit.loss[k] < unit.loss[plain]
                corrected += 1
    assert corrected > 0
    for unit in units:  # the corrected int4-b32-asym option where there is one, else the first option
        unit.choice = next((k for k, (f, r) in enumerate(zip(unit.options, unit.corrections))
                            if r and f.name == "int4-b32-asym"), 0)
    apply_choices(model, units)
    assert sum(isinstance(m, CorrectedLinear) for m in model.modules()) == 7 * model.config.num_hidden_layers
    prompt = tokenizer("The engineer explains the last question", add_special_tokens=False)["input_ids"]
    ref_tokens, ref_logits = torch_greedy(model, prompt, 8)
    path = write_decoder(model, tmp_path, weights="int4", block_size=32, accuracy_level=None)
    _, logits, _ = OrtDecoder(path, threads=1).greedy(prompt, 8, forced_tokens=ref_tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-4, rtol=0)


def test_calr_trains_branches_beside_a_dense_quantized_base(tiny_models, calib_ids):
    """CALR's training (block-wise least squares on the functional residual, then KL) on error-correction
    branches: the base stays on its grid, a group keeps one shared R, and the held-out error does not grow."""
    from exporter.compress.corrective import train_correctives
    from exporter.settings import CorrectiveOptions

    teacher = tiny_models.load("llama")
    model = tiny_models.load("llama")
    quantize_with_correction(model, calib_ids[:8], lambda _n: FMT, lambda _n: 16, UP, progress=False)
    bases = {id(m): m.base.weight.detach().clone() for m in model.modules() if isinstance(m, CorrectedLinear)}
    report = train_correctives(model, teacher, calib_ids[:8], CorrectiveOptions(rank=16, kl_steps=2), progress=False)
    corrected = [m for m in model.modules() if isinstance(m, CorrectedLinear)]
    assert all(torch.equal(m.base.weight, bases[id(m)]) for m in corrected)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.corrective_down is attention.k_proj.corrective_down is attention.v_proj.corrective_down
    assert report.kl_after <= report.kl_before


def test_fisher_channels_reach_the_correction(tiny_models, calib_ids):
    """quantize_with_correction(fisher_channels=True) fits (and reports) the Fisher-weighted error: another R."""
    runs = []
    for fisher in (False, True):
        model = tiny_models.load("llama")
        report = quantize_with_correction(model, calib_ids[:8], lambda _n: FMT, lambda _n: 16, UP, progress=False,
                                          fisher_channels=fisher)
        runs.append((report, model.model.layers[0].self_attn.q_proj.corrective_down.weight.detach().clone()))
    (plain, plain_down), (weighted, weighted_down) = runs
    assert not torch.equal(plain_down, weighted_down)
    assert all(plain[g]["error_before"] != weighted[g]["error_before"] for g in plain)
    assert all(r["error_after"] < r["error_before"] for r in weighted.values())
