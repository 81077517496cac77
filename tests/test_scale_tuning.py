"""End-to-end tuning of the grids' scales (exporter.compress.scale_tuning): codes and zero points stay, the
weights stay on their grids, the held-out KL falls (or the scales go back), and the graph packs the tuned
scales, so ONNX Runtime follows PyTorch as tightly as before."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exporter.compress.corrective import dense_teacher, kl_divergence
from exporter.compress.grid import QuantFormat
from exporter.compress.quantize import grid_of, quantize_model
from exporter.compress.scale_tuning import grid_modules, tune_scales

FMT = QuantFormat(4, 32, False)


def _quantized(tiny_models, tie: bool = False):
    model = tiny_models.load("llama")
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    teacher = dense_teacher(model)
    quantize_model(model, lambda _n: FMT, progress=False)  # round to nearest: a large error to tune away
    return model, teacher


def _grids(model) -> dict[str, tuple]:
    return {name: (g.codes.copy(), g.zeros.copy(), g.scales.copy())
            for name, m in model.named_modules() if (g := grid_of(m)) is not None}


def test_tuning_moves_only_the_scales_and_lowers_the_held_out_kl(tiny_models, calib_ids):
    model, teacher = _quantized(tiny_models)
    before = _grids(model)
    report = tune_scales(model, teacher, calib_ids, steps=30, lr=1e-2, holdout=2, progress=False)
    assert report.kept and report.kl_after < 0.9 * report.kl_before
    assert report.scales == sum(int(np.prod(s.shape)) for _c, _z, s in before.values())
    after = _grids(model)
    assert after.keys() == before.keys()
    moved = 0
    for name, (codes, zeros, scales) in before.items():
        new_codes, new_zeros, new_scales = after[name]
        assert np.array_equal(codes, new_codes) and np.array_equal(zeros, new_zeros)
        moved += int((new_scales != scales).sum())
        module = model.get_submodule(name)
        assert torch.equal(module.weight, torch.from_numpy(grid_of(module).dequantize()))  # exactly on the grid
    assert moved > report.scales // 2
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():  # the model now computes what its grids hold
        assert abs(float(kl_divergence(model, teacher, calib_ids[-2:])) - report.kl_after) < 1e-5


def test_bfloat16_steps_train_as_float32_steps_do(tiny_models, calib_ids):
    """The steps' student in bfloat16 (what a CPU with native bf16 runs): the held-out KL, measured in float32,
    falls about as far as with float32 steps, and the report says which ran."""
    reports = {}
    for precision in (None, torch.bfloat16):
        model, teacher = _quantized(tiny_models)
        reports[precision] = tune_scales(model, teacher, calib_ids, steps=30, lr=1e-2, holdout=2, progress=False,
                                         precision=precision)
    fp32, bf16 = reports[None], reports[torch.bfloat16]
    assert (fp32.precision, bf16.precision) == ("float32", "bfloat16")
    assert fp32.kl_before == bf16.kl_before and bf16.kept
    fall = fp32.kl_before - fp32.kl_after
    assert abs((bf16.kl_before - bf16.kl_after) - fall) < 0.1 * fall


def test_a_tied_embedding_reads_the_tuned_head(tiny_models, calib_ids):
    model, teacher = _quantized(tiny_models, tie=True)
    assert len(grid_modules(model)) == 2 * 7 + 1  # the head once: the embedding is the same weight
    report = tune_scales(model, teacher, calib_ids, steps=10, lr=1e-2, holdout=2, progress=False)
    assert report.kept
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert embedding.weight is head.weight
    assert torch.equal(embedding.weight, torch.from_numpy(grid_of(head).dequantize()))


def test_a_tuning_that_raises_the_kl_is_undone(tiny_models, calib_ids):
    model, teacher = _quantized(tiny_models)
    before = _grids(model)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    report = tune_scales(model, teacher, calib_ids, steps=3, lr=5.0, holdout=2, progress=False)  # far too large
    assert not report.kept and report.kl_after > report.kl_before
    for name, (_codes, _zeros, scales) in before.items():
        assert np.array_equal(grid_of(model.get_submodule(name)).scales, scales)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_the_graph_packs_the_tuned_scales(tiny_models, calib_ids, tokenizer, tmp_path):
    from exporter.graph.optimum_export import torch_greedy
    from exporter.graph.writer import write_decoder
    from exporter.runtime.generation import OrtDecoder

    model, teacher = _quantized(tiny_models)
    assert tune_scales(model, teacher, calib_ids, steps=10, lr=1e-2, holdout=2, progress=False).kept
    prompt = tokenizer("The engineer explains the last question", add_special_tokens=False)["input_ids"]
    ref_tokens, ref_logits = torch_greedy(model, prompt, 8)
    path = write_decoder(model, tmp_path, weights="int4", block_size=32, accuracy_level=None)
    _, logits, _ = OrtDecoder(path, threads=1).greedy(prompt, 8, forced_tokens=ref_tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-4, rtol=0)


def test_export_with_tuned_scales(llama_dir, calib_file, tmp_path):
    from exporter.cli import main

    out = tmp_path / "art"
    code = main(["export", "--model", str(llama_dir), "--calib", str(calib_file), "--calib-samples", "8",
                 "--calib-seq-len", "32", "--ratio", "0", "--device", "host", "--weights", "int4",
                 "--tune-scales", "6", "--no-progress", "--out", str(out)])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    tuning = manifest["method"]["scale_tuning"]
    assert tuning["steps"] == 6 and tuning["scales"] > 0 and "tune scales" in manifest["timings_s"]
    # up to 64 more windows of the file (--tune-windows' default; this short file holds fewer apart) beside the
    # calibration's 8, 2 of those held out as the calibration alone would hold out
    assert 6 + 32 <= tuning["windows"] <= 6 + 64
    assert manifest["parity"]["quantized"]["greedy_agreement"] >= 0.5

    code = main(["export", "--model", str(llama_dir), "--calib", str(calib_file), "--calib-samples", "8",
                 "--calib-seq-len", "32", "--ratio", "0", "--device", "host", "--weights", "int4",
                 "--tune-scales", "6", "--tune-windows", "0", "--no-progress", "--out", str(tmp_path / "only")])
    assert code == 0
    assert json.loads((tmp_path / "only" / "manifest.json").read_text())["method"]["scale_tuning"]["windows"] == 6


def test_the_default_rate_follows_the_held_out_kl(tiny_models, calib_ids):
    """Grids far from the dense model take larger steps: the rate is RATE_PER_KL times the KL before, bounded."""
    from exporter.compress.scale_tuning import RATE_PER_KL, RATE_RANGE

    model, teacher = _quantized(tiny_models)
    report = tune_scales(model, teacher, calib_ids, steps=2, holdout=2, progress=False)
    assert report.lr == min(max(RATE_PER_KL * report.kl_before, RATE_RANGE[0]), RATE_RANGE[1])
    assert report.to_dict()["lr"] == pytest.approx(report.lr, rel=1e-2)


def _decoder_rows(model) -> list[int]:
    """Rows (windows) each forward of `model`'s decoder runs, recorded."""
    rows = []
    model.model.register_forward_hook(lambda _m, args, kwargs, _out: rows.append(
        (args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True)
    return rows


@pytest.mark.parametrize("family, softcap", [("llama", None), ("gemma3_text", 30.0)])
def test_teacher_targets_run_each_window_once_and_equal_the_teacher(tiny_models, calib_ids, family, softcap):
    """KL steps draw windows again: TeacherTargets runs the teacher's decoder once per window and applies the head
    to what it kept, the log-probabilities the whole teacher computes; where the head's output is not the logits
    (Gemma's softcap), it runs the whole teacher every time."""
    from exporter.compress.corrective import TeacherTargets

    teacher = dense_teacher(tiny_models.load(family))
    teacher.config.final_logit_softcapping = softcap
    targets, rows = TeacherTargets(teacher), _decoder_rows(teacher)
    batches = [calib_ids[[0, 1]], calib_ids[[1, 2]], calib_ids[[0, 0]], calib_ids[[2, 1, 0]]]
    for batch in batches:
        with torch.no_grad():
            rows_before = len(rows)
            expected = torch.log_softmax(teacher(batch, use_cache=False).logits.float(), dim=-1)
            del rows[rows_before:]  # the reference pass is not the targets' work
            got = targets.log_probs(batch)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if softcap is None:
        assert targets.exact and sum(rows) == 3  # windows 0, 1, 2, each once
    else:
        assert targets.exact is False


@pytest.mark.parametrize("family, softcap", [("llama", None), ("gemma3_text", 30.0)])
def test_teacher_targets_read_the_gram_pass_head_inputs(tiny_models, calib_ids, family, softcap):
    """The pricing's Gram pass keeps the dense model's head inputs on the calibration windows; TeacherTargets
    given them runs the teacher on one window only (to check that the head's output is the logits) and gives
    the log-probabilities the whole teacher computes; where it is not (Gemma's softcap), it drops them."""
    from exporter.compress.corrective import TeacherTargets, window_key
    from exporter.compress.format_allocation import pricing_statistics

    teacher = dense_teacher(tiny_models.load(family))
    teacher.config.final_logit_softcapping = softcap
    statistics = pricing_statistics(teacher, calib_ids, calib_ids[:2], progress=False)
    assert statistics.head_inputs.shape == (*calib_ids.shape, teacher.config.hidden_size)
    known = {window_key(row): hidden for row, hidden in zip(calib_ids, statistics.head_inputs)}
    targets, rows = TeacherTargets(teacher, known), _decoder_rows(teacher)
    for batch in [calib_ids[[0, 1]], calib_ids[[2, 3]], calib_ids[[1, 0]]]:
        with torch.no_grad():
            rows_before = len(rows)
            expected = torch.log_softmax(teacher(batch, use_cache=False).logits.float(), dim=-1)
            del rows[rows_before:]
            got = targets.log_probs(batch)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert sum(rows) == (1 if softcap is None else 1 + 6)  # softcap: the check, then every batch whole
    assert targets.exact is (softcap is None)


def test_a_row_split_grid_tunes_both_parts(tiny_models, calib_ids):
    """A linear whose rows sit on two grids (RowSplitGrid) trains each part's scales; its codes stay, its rows
    stay on the grid each was on, and the model computes what the tuned grids hold."""
    from exporter.compress.grid import RowSplitGrid, round_to_nearest, split_rows
    from exporter.compress.quantize import set_grid

    model, teacher = _quantized(tiny_models)
    module = model.get_submodule("model.layers.0.mlp.down_proj")
    weight = teacher.get_submodule("model.layers.0.mlp.down_proj").weight.detach().numpy()
    low = round_to_nearest(weight, QuantFormat(2, 32, False))
    set_grid(module, split_rows(grid_of(module), low, np.arange(0, weight.shape[0], 3)))
    before = grid_of(module)
    report = tune_scales(model, teacher, calib_ids, steps=10, lr=1e-2, holdout=2, progress=False)
    assert report.kept
    after = grid_of(module)
    assert isinstance(after, RowSplitGrid) and np.array_equal(after.rows, before.rows)
    for old, new in zip(before.parts(), after.parts()):
        assert np.array_equal(old.codes, new.codes) and np.array_equal(old.zeros, new.zeros)
        assert (old.scales != new.scales).any()
    assert torch.equal(module.weight, torch.from_numpy(after.dequantize()))
