"""exporter.compress.grams and exporter.compress.factorize on tiny Llama and Qwen3 models."""

import pytest
import torch
from torch import nn

from exporter.compress.factorize import (
    apply_ranks,
    count_params,
    decoder_projections,
    decompose_model,
    effective_ranks,
    parameter_summary,
    uniform_ranks,
)
from exporter.compress.grams import iter_layer_grams
from exporter.compress.lowrank import LowRankLinear, break_even_rank
from exporter.errors import BudgetError

FAMILIES = ["llama", "qwen3"]
KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (out, in) of each projection: hidden 64, 4 heads x 16, 2 KV heads x 16, intermediate 128.
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
          "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_decoder_projections_finds_seven_per_layer(tiny_models, family):
    model = tiny_models.load(family)
    projections = decoder_projections(model)
    assert len(projections) == 2 * 7
    for i, p in enumerate(projections):
        layer, kind = divmod(i, 7)
        assert p.kind == KINDS[kind]
        assert p.name.startswith(f"model.layers.{layer}.") and p.name.endswith(KINDS[kind])
        assert (p.out_features, p.in_features) == SHAPES[p.kind]
        module = model.get_submodule(p.name)
        assert isinstance(module, nn.Linear) and tuple(module.weight.shape) == SHAPES[p.kind]
        assert p.params == module.weight.numel()
    assert "lm_head" not in {p.name for p in projections}


def dense_grams(model, ids) -> dict[str, torch.Tensor]:
    """X^T X of every decoder linear's input from hooks on one ordinary forward pass."""
    names = {p.name for p in decoder_projections(model)}
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name in names:
            def hook(_module, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                grams[name] = grams.get(name, 0) + x.T @ x
            handles.append(module.register_forward_pre_hook(hook))
    try:
        logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def test_layer_grams_are_shared_and_match_a_full_forward_pass(tiny_models, family, calib_ids):
    model = tiny_models.load(family)
    before = logits(model, calib_ids)
    expected = dense_grams(model, calib_ids)
    seen = {}
    # batch_size 3 over 8 samples: uneven batches must add up too.
    for index, layer, grams in iter_layer_grams(model, calib_ids, batch_size=3, progress=False):
        assert layer is model.model.layers[index]
        assert all(name.startswith(f"model.layers.{index}.") for name in grams)
        g = {name.rsplit(".", 1)[-1]: gram for name, gram in grams.items()}
        assert sorted(g) == sorted(KINDS)
        assert g["q_proj"] is g["k_proj"] is g["v_proj"]  # one accumulation for one input tensor
        assert g["gate_proj"] is g["up_proj"]
        assert len({id(t) for t in g.values()}) == 4  # qkv, o, gate/up, down
        for kind, gram in g.items():
            assert gram.dtype == torch.float64 and gram.shape == (SHAPES[kind][1],) * 2
            assert torch.allclose(gram, gram.T)
        seen.update(grams)
    assert sorted(seen) == sorted(expected)
    for name, gram in seen.items():
        assert rel(gram, expected[name]) < 1e-4, name
    # Statistics leave the model as it was: no hooks, same outputs.
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(logits(model, calib_ids), before)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.8])
def test_uniform_ranks_remove_the_ratio(tiny_models, family, ratio):
    model = tiny_models.load(family)
    projections = decoder_projections(model)
    total = count_params(model)
    ranks = uniform_ranks(projections, ratio)
    assert set(ranks) == {p.name for p in projections}
    for p in projections:  # each projection keeps at most (1 - ratio) of its parameters
        assert 1 <= ranks[p.name] and p.factor_params(ranks[p.name]) <= (1 - ratio) * p.params
    summary = parameter_summary(projections, ranks, total)
    # Rank granularity: one rank step is at most (out + in) / (out * in) < 5% of a projection here.
    assert ratio <= summary["projection_fraction_removed"] < ratio + 0.05
    removed = summary["projection_params_dense"] - summary["projection_params"]
    assert summary["total_params"] == total - removed
    assert summary["total_fraction_removed"] == pytest.approx(removed / total)
    assert summary["projection_params_dense"] == sum(p.params for p in projections)


def test_uniform_ranks_ratio_zero_and_range(tiny_models):
    projections = decoder_projections(tiny_models.load("llama"))
    ranks = uniform_ranks(projections, 0.0)
    assert set(ranks.values()) == {None}
    summary = parameter_summary(projections, ranks, 1_000_000)
    assert summary["projection_fraction_removed"] == 0.0 and summary["total_params"] == 1_000_000
    assert set(uniform_ranks(projections, 0.999).values()) == {1}
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(BudgetError):
            uniform_ranks(projections, bad)


def test_count_params_counts_tied_weights_once(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_params(model) == sum(p.numel() for n, p in model.named_parameters(remove_duplicate=False)) \
        - model.lm_head.weight.numel()


def test_decompose_model_caps_at_break_even(tiny_models, family, calib_ids):
    model = tiny_models.load(family)
    projections = decoder_projections(model)
    for method, ids in (("svd", None), ("whitened", calib_ids)):
        decompositions = decompose_model(model, method, ids, progress=False)
        assert set(decompositions) == {p.name for p in projections}
        for p in projections:
            d = decompositions[p.name]
            assert d.max_rank == break_even_rank(p.out_features, p.in_features)
            assert d.up.shape == (p.out_features, d.max_rank) and d.down.shape == (d.max_rank, p.in_features)
    with pytest.raises(ValueError, match="unknown method"):
        decompose_model(model, "qr", calib_ids, progress=False)
    with pytest.raises(ValueError, match="calibration"):
        decompose_model(model, "whitened", None, progress=False)


def test_full_rank_factors_reproduce_the_model(tiny_models, calib_ids):
    """Uncapped whitened factors of every projection, swapped in, leave the outputs unchanged."""
    from exporter.compress.lowrank import decompose

    model = tiny_models.load("qwen2")  # q/k/v with biases
    before = logits(model, calib_ids)
    projections = decoder_projections(model)
    decompositions = {}
    for _index, _layer, grams in iter_layer_grams(model, calib_ids, progress=False):
        for name, gram in grams.items():
            linear = model.get_submodule(name)
            decompositions[name] = decompose(linear.weight, gram, bias=linear.bias)
    for p in projections:
        parent, _, child = p.name.rpartition(".")
        setattr(model.get_submodule(parent), child, decompositions[p.name].linear(min(p.out_features, p.in_features)))
    assert all(isinstance(model.get_submodule(p.name), LowRankLinear) for p in projections)
    assert model.get_submodule("model.layers.0.self_attn.q_proj").up.bias is not None
    assert rel(logits(model, calib_ids), before) < 1e-4


def test_apply_ranks_at_break_even_changes_logits_slightly(tiny_models, family, calib_ids):
    model = tiny_models.load(family)
    before = logits(model, calib_ids)
    projections = decoder_projections(model)
    decompositions = decompose_model(model, "whitened", calib_ids, progress=False)
    ranks = {name: d.max_rank for name, d in decompositions.items()}
    apply_ranks(model, decompositions, ranks)
    assert effective_ranks(model, projections) == ranks
    after = logits(model, calib_ids)
    # Break-even keeps only half the spectrum of a square matrix, so "slightly" is loose here.
    assert rel(after, before) < 0.15
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() >= 0.9
    summary = parameter_summary(projections, effective_ranks(model, projections), count_params(model))
    assert 0 < summary["projection_fraction_removed"] < 0.05  # break-even saves almost nothing


def test_apply_ranks_ratio_zero_leaves_model_unchanged(tiny_models, family, calib_ids):
    model = tiny_models.load(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = logits(model, calib_ids)
    projections = decoder_projections(model)
    decompositions = decompose_model(model, "svd", progress=False)
    apply_ranks(model, decompositions, uniform_ranks(projections, 0.0))
    assert set(effective_ranks(model, projections).values()) == {None}
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, calib_ids), before)


def test_apply_ranks_keeps_dense_above_break_even(tiny_models, calib_ids):
    model = tiny_models.load("llama")
    projections = decoder_projections(model)
    decompositions = decompose_model(model, "svd", progress=False)
    ranks = {p.name: decompositions[p.name].max_rank + 1 for p in projections}
    ranks[projections[0].name] = 3
    apply_ranks(model, decompositions, ranks)
    effective = effective_ranks(model, projections)
    assert effective[projections[0].name] == 3
    assert all(effective[p.name] is None for p in projections[1:])


def test_whitened_beats_plain_svd_on_calibration_data(tiny_models, family, calib_ids):
    reference = tiny_models.load(family)
    dense = logits(reference, calib_ids)
    ranks = uniform_ranks(decoder_projections(reference), 0.3)
    errors = {}
    for method in ("whitened", "svd"):
        model = tiny_models.load(family)
        decompositions = decompose_model(model, method, calib_ids if method == "whitened" else None, progress=False)
        apply_ranks(model, decompositions, ranks)
        assert effective_ranks(model, decoder_projections(reference)) == ranks
        errors[method] = rel(logits(model, calib_ids), dense)
    assert 0 < errors["whitened"] < errors["svd"], errors


def test_same_seed_gives_identical_factors(tiny_models, family, calib_ids):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(decompose_model(tiny_models.load(family), "whitened", calib_ids, batch_size=4, progress=False))
    first, second = runs
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name].up, second[name].up)
        assert torch.equal(first[name].down, second[name].down)
        assert torch.equal(first[name].sigma, second[name].sigma)


def test_calibration_windows_are_seeded(tokenizer, calib_text):
    from exporter.source.calibration import windows_from_texts

    a = windows_from_texts([calib_text], tokenizer, 4, 16, seed=0)
    b = windows_from_texts([calib_text], tokenizer, 4, 16, seed=0)
    c = windows_from_texts([calib_text], tokenizer, 4, 16, seed=1)
    assert a.shape == (4, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tuning_windows_stay_apart_from_the_calibrations_and_each_other(tokenizer, calib_text):
    """Scale tuning's extra windows must not overlap the calibration's text windows (its held-out windows are
    among those) nor each other; fewer come back where the text has no room."""
    from exporter.source.calibration import _window_starts, starts_apart, tuning_windows

    taken = _window_starts(5000, 40, 6, seed=0)
    starts = starts_apart(5000, 40, 30, seed=1, taken=taken)
    assert len(starts) == 30 and starts == starts_apart(5000, 40, 30, seed=1, taken=taken)
    assert all(abs(s - t) >= 40 for s in starts for t in taken)
    assert all(abs(a - b) >= 40 for i, a in enumerate(starts) for b in starts[i + 1:])
    assert len(starts_apart(200, 40, 30, seed=1, taken=[])) <= 5  # at most 200 / 40 windows fit

    from exporter.source.calibration import windows_from_texts

    windows = tuning_windows([calib_text], tokenizer, 8, 16, seed=0, calibration_windows=4)
    assert windows.shape == (8, 16) and windows.dtype == torch.long
    # where each window sits in the text: the tuning's none within a window's length of the calibration's
    text = tokenizer(calib_text, add_special_tokens=False)["input_ids"]

    def position(window) -> int:
        body = window.tolist()[-12:]
        return next(i for i in range(len(text)) if text[i : i + 12] == body)

    calibration = windows_from_texts([calib_text], tokenizer, 4, 16, seed=0)
    assert all(abs(position(w) - position(c)) >= 15 for w in windows for c in calibration)  # body: 15 or 16
    assert tuning_windows([calib_text], tokenizer, 0, 16, seed=0, calibration_windows=4).shape == (0, 16)
